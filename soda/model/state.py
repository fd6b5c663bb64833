"""The cluster's state as the Master keeps it: services, their virtual
nodes and phases, physical nodes and what their drivers can do, images."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Mapping

from soda.errors import InvalidSpec
from soda.model.spec import DEFAULT_PORT, Resources, ServiceSpec
from soda.model.usage import Usage

if TYPE_CHECKING:
    from soda.model.switching import SwitchVnodeStats

class Phase(enum.IntEnum):
    """Lifecycle of a virtual node as its Agent observes it."""
    UNSPECIFIED = 0
    PENDING = 1
    PULLING = 2
    BOOTING = 3
    RUNNING = 4
    FAILED = 5
    STOPPING = 6
    STOPPED = 7
    FROZEN = 8          # paused in place: memory kept, no CPU, no traffic
    THAWING = 9         # resuming; RUNNING again once its port answers


@dataclass(frozen=True)
class VnodeMove:
    """Why a virtual node runs where it does when it did not start there:
    the node it (or the virtual node it replaces) ran on before, when it
    was placed again (wall clock) and why. Kept in the store, so that what
    happened to a service outlasts the Master's memory and the Agents'
    later reports, which overwrite `VirtualNode.reason`."""
    from_node: str
    at: float
    why: str


@dataclass(frozen=True)
class VirtualNode:
    name: str
    service: str
    index: int
    resources: Resources
    node: str = ""
    address: str = ""
    prefix_length: int = 0
    gateway: str = ""
    weight: float = 0.0
    image_digest: str = ""
    hypervisor: str = ""
    port: int = DEFAULT_PORT
    phase: Phase = Phase.PENDING
    reason: str = ""
    boot_seconds: float = 0.0
    deleting: bool = False
    generation: int = 1
    cpu_cap: bool = False
    boot_timeout: float = 0.0       # seconds to its port answering; 0 = its driver's default
    frozen: bool = False            # desired: paused in place (sodactl service freeze)
    # A move (sodactl service move, a drain) pairs two virtual nodes: the
    # replacement names the one it `replaces`; the one leaving stays until
    # the replacement is ready. A move that carries the disk freezes the one
    # leaving and sets its `moving_to` (the target node), so that its Agent
    # sends the guest's disk as a layer over `disk_base`; the replacement has
    # no image_digest until that disk has arrived (then: the disk's image).
    replaces: str = ""
    moving_to: str = ""
    disk_base: str = ""
    last_move: VnodeMove | None = None   # the last time it was placed again, and why
    usage: Usage | None = None      # observed, kept by the Master in memory only
    switch_stats: "SwitchVnodeStats | None" = None   # what the Switch measured; Master memory only

    @property
    def awaits_disk(self) -> bool:
        """A replacement waiting for the disk of the virtual node it replaces."""
        return bool(self.replaces) and not self.image_digest

    def with_status(self, phase: Phase, reason: str = "", boot_seconds: float | None = None) -> "VirtualNode":
        return replace(self, phase=phase, reason=reason,
                       boot_seconds=self.boot_seconds if boot_seconds is None else boot_seconds)


@dataclass(frozen=True)
class Service:
    spec: ServiceSpec
    image_digest: str
    vnodes: tuple[VirtualNode, ...] = ()
    deleting: bool = False
    created_at: float = 0.0
    owner: str = ""                 # the tenant that created it; "" = the operators' (soda.model.tenancy)

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class DriverCapabilities:
    """What one hypervisor driver of a node declares it can do, and what its
    fingerprint found on that node. The Agent registers one per driver it
    offers; the Master's admission and placement read these, never driver
    names: a rule that depends on what a hypervisor can do is one field
    here, set by the driver."""
    hypervisor: str
    min_memory: int = 0             # MiB: the smallest guest it boots (its kernel sets it)
    kernel: str = ""                # which kernel, as the node names it
    memory_overhead: int = 0        # MiB per guest above its memory (placement, the Daemon's limit)
    live_memory: bool = False       # memory changes while the guest runs (up to its boot size)
    freeze: bool = False            # a guest can be paused and resumed in place
    disk_bound: bool = False        # guests boot a root disk of the virtual node's size
    plumbing: bool = False          # guests need a TAP on the node bridge and the Daemon's fence
    migration: str = ""             # how a guest moves between nodes; "" = it cannot
    attributes: Mapping[str, str] = field(default_factory=dict)   # the fingerprint's findings


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    capacity: Resources
    hypervisors: tuple[str, ...]
    subnet: str = ""
    gateway: str = ""
    uplink: str = ""              # host end of its uplink (the Master's IPAM decides all three)
    state: str = "READY"          # READY | LOST
    allocated: Resources = Resources()
    vnodes: int = 0
    last_heartbeat: float = 0.0
    usage: Usage | None = None      # sum over its virtual nodes that reported usage
    # Its image cache as its last heartbeat said: Master memory only, like usage.
    image_cache: "ImageCacheState | None" = None
    limits: tuple[DriverCapabilities, ...] = ()
    # Capacity fields the node could not measure and assumed a default for.
    assumed: tuple[str, ...] = ()
    # Its operator's KEY=VALUE labels (soda.model.labels), e.g. {"zone": "a"}.
    labels: Mapping[str, str] = field(default_factory=dict)
    # Drained by an operator: nothing new is placed here and what runs here
    # is moved elsewhere (independent of state).
    draining: bool = False

    def limit(self, hypervisor: str) -> DriverCapabilities | None:
        return next((lim for lim in self.limits if lim.hypervisor == hypervisor), None)

    def memory_overhead(self, hypervisor: str) -> int:
        """MiB a guest under `hypervisor` costs this node beyond its memory."""
        limit = self.limit(hypervisor)
        return limit.memory_overhead if limit is not None else 0


@dataclass(frozen=True)
class Image:
    digest: str
    size: int
    names: tuple[str, ...] = ()
    created_at: float = 0.0
    init: str = "/sbin/init"
    owners: tuple[str, ...] = ()    # tenants that pushed it (soda.model.tenancy)
    public: bool = False            # an operator made every tenant see it
    # A layered image (soda.layers) is kept as its layer over its parent.
    parent: str = ""                # digest of the image it is layered on
    layer: str = ""                 # digest of its layer
    layer_size: int = 0             # bytes of its layer

    @property
    def stored_size(self) -> int:
        """Bytes it takes in the Master's store (and on the wire, raw)."""
        return self.layer_size if self.layer else self.size


@dataclass(frozen=True)
class ImageCacheState:
    """A node's image cache as its Agent reports it with each heartbeat."""
    bytes: int = 0                  # what its files take on disk
    limit: int = 0                  # its bound; 0 = none
    images: tuple[str, ...] = ()    # digests of the images it holds (whole or composed)


@dataclass(frozen=True)
class HeartbeatAnswer:
    """The Master's answer to a heartbeat."""
    heartbeat_seconds: int = 0
    prime: tuple[str, ...] = ()     # images to pull ahead of need (sodactl image prime)


def check_disk_holds_image(disk_mib: int, image: Image) -> None:
    """A virtual node's disk is the disk its guest sees, and the image is
    laid on it (soda.agent.images): a disk smaller than the image is refused."""
    if disk_mib * (1 << 20) < image.size:
        raise InvalidSpec(f"disk {disk_mib} MiB cannot hold image {image.digest[:19]} "
                          f"({image.size} bytes): give at least "
                          f"{math.ceil(image.size / (1 << 20))} MiB (--disk)")


@dataclass(frozen=True)
class VirtualNodeStatus:
    """What an Agent reports about one virtual node."""
    name: str
    phase: Phase
    reason: str = ""
    boot_seconds: float = 0.0
    generation: int = 0
    usage: Usage | None = None      # real guests only: what the Daemon measured


# How an Agent ends the reason of a virtual node it will start again:
# "(retry in 2s)", or "(temporary, retry in 2s)" when the cause is expected
# to pass by itself (the Daemon or the Master out of reach, a timeout) rather
# than lie with the guest (one that exited while booting fails the same way
# next time).
_TEMPORARY_RETRY = "(temporary, retry in "


def retry_note(delay: float, temporary: bool = False) -> str:
    """The end of the reason of a virtual node retried after `delay` seconds."""
    return f"({'temporary, ' if temporary else ''}retry in {delay:g}s)"


def retries_temporary_failure(vnode: VirtualNode) -> bool:
    """Whether `vnode` FAILED for a temporary cause that its Agent retries."""
    return (vnode.phase == Phase.FAILED and _TEMPORARY_RETRY in vnode.reason
            and vnode.reason.endswith("s)"))
