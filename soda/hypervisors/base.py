"""The hypervisor driver interface and the registry of drivers.

Owns what every driver promises the Agent: a pure `build_argv`, an
idempotent `start` and `stop`, a `list` rebuilt from the driver's state dir
(so a restarted Agent adopts the guests it finds instead of starting them
again), readiness, what its guests can do (`capabilities`, declared by the
driver and registered with the Master, which decides from them and never
from driver names) and whether it works on this host at all
(`fingerprint`, run at Agent start). Also owns the registry from a
hypervisor name to its class: the built-in drivers, and any a separate
distribution offers through the `soda.hypervisors` entry-point group.

A driver knows nothing about the Master, phases or images: the Agent's
reconciler decides what to run and hands a driver a finished `GuestSpec`.
Drivers must not import grpc.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib.metadata
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from soda.errors import InvalidSpec, WrongState
from soda.model.names import NODE_NAME_MAX, check_dns_label, check_hypervisor_name
from soda.model.spec import Resources
from soda.model.state import DriverCapabilities

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "soda.hypervisors"
TUN_DEVICE = "/dev/net/tun"          # TAPs, for drivers whose guests have a network

Clock = Callable[[], float]

RUNNING = "running"
EXITED = "exited"


@dataclass(frozen=True)
class GuestSpec:
    """Everything a driver needs to boot one virtual node."""
    name: str
    service: str
    image_path: str              # verified, cached, read-only base image
    image_digest: str
    resources: Resources
    address: str
    prefix_length: int
    gateway: str
    port: int
    hypervisor: str
    # Persisted by the driver and echoed in GuestInfo so that a restarted
    # Agent can tell whether an adopted guest still matches the desired spec.
    generation: int = 0
    # Set by the Agent for real guests (the fake driver ignores them):
    tap: str = ""                    # TAP device, already created and on the bridge
    netns: str = ""                  # network namespace the TAP lives in ("" = the host's)
    cgroups: tuple[str, ...] = ()    # cgroup directories (one per controller) made by the Daemon
    init: str = "/sbin/init"         # the image's init program
    # The uid (and gid) the VMM runs as, with no capabilities and
    # no_new_privs (soda.hypervisors.launch): its service's on this node
    # (soda.agent.uids); 0 = root, as the fake driver and unit tests have it.
    uid: int = 0
    open_files: int = 0              # the VMM's RLIMIT_NOFILE; 0 = the Agent's own


def contract_arguments(spec: GuestSpec) -> list[str]:
    """The kernel command line arguments of the guest image contract
    (README.rst, "Guest images"): `ip=` for the kernel's IP autoconfig (or
    the QEMU initramfs, which reads it the same way), so that any image's
    eth0 is up with its address and default route before its init runs,
    then the guest's identity as `soda.*`."""
    cidr = f"{spec.address}/{spec.prefix_length}"
    argv = []
    if spec.tap:
        mask = ipaddress.IPv4Network(cidr, strict=False).netmask
        argv.append(f"ip={spec.address}::{spec.gateway}:{mask}:{spec.name}:eth0:off")
    return argv + [f"soda.ip={cidr}", f"soda.gw={spec.gateway}",
                   f"soda.name={spec.name}", f"soda.service={spec.service}"]


@dataclass(frozen=True)
class Fingerprint:
    """Whether a driver works on this host, and what it found here."""
    usable: bool
    reason: str = ""                 # why not, when it is not usable
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GuestInfo:
    """A guest as its driver finds it."""
    name: str
    state: str                   # RUNNING | EXITED
    pid: int | None = None
    started_at: float = 0.0      # wall-clock seconds (it must survive an Agent restart)
    ready: bool = False
    exit_reason: str = ""
    generation: int = 0          # GuestSpec.generation it was started with; 0 = unknown
    frozen: bool = False         # paused in place by freeze(); never ready while so


@dataclass(frozen=True)
class NoConfig:
    """The config section of a driver that has nothing to configure."""


class HypervisorDriver(abc.ABC):
    """One way of running guests. Subclasses keep all their state under
    `state_dir/<name>/` and find their guests again from it."""

    name: str = ""
    # This driver's section of the Agent's config (`drivers: {<name>: ...}`),
    # owned here: a frozen dataclass whose fields are keyword arguments of
    # the constructor, built and checked (unknown keys are errors) when the
    # Agent loads its config.
    Config: type = NoConfig
    # What this driver's guests can do. Every rule that depends on it reads
    # these, here in the Agent and at the Master from what the node
    # registered (`capabilities()`): a new rule is one edit in the driver.
    live_memory = False     # set_memory works while the guest runs
    can_freeze = False      # freeze(name)/thaw(name) pause a guest in place
    disk_bound = True       # guests boot a root disk of the virtual node's size
    plumbing = True         # guests need a TAP on the node bridge and the Daemon's fence
    # How a guest moves to another node: "copy" (frozen, its disk carried
    # by export_disk, booted there from it: what it wrote survives, not its
    # memory); "" = it cannot (a move boots its image afresh, if asked to).
    migration = ""
    # MiB each guest's hypervisor process needs above the guest's memory.
    # The Agent registers it with the Master (placement counts it) and hands
    # it to the Daemon (the memory limit adds it).
    memory_overhead = 0
    min_memory = 0          # MiB: the smallest guest it boots
    kernel_label = ""       # which kernel its guests boot, as node list shows it
    # Seconds from a guest's start to its service port answering, past
    # which the Agent fails it (and retries with backoff), unless the
    # service names its own boot_timeout: sized to what this driver boots.
    boot_timeout = 60.0

    def console_path(self, name: str) -> str:
        """The file guest `name`'s console is written to; "" when its
        guests have none."""
        return ""

    def __init__(self, state_dir: str, runner: Any = None, clock: Clock = time.time):
        self.state_dir = state_dir
        self.runner = runner
        self.clock = clock
        # freezer(name, frozen): freezes or thaws the guest's fence (the
        # Daemon's cgroup freezer), for drivers whose VMM cannot pause
        # itself; the Agent hands it over with its plumbing. None: no fence.
        self.freezer: Callable[[str, bool], None] | None = None

    @abc.abstractmethod
    def build_argv(self, spec: GuestSpec) -> list[str]:
        """The command line that boots `spec`; pure, so it can be golden-tested."""

    @abc.abstractmethod
    def start(self, spec: GuestSpec) -> GuestInfo:
        """Boot a guest and return without waiting for readiness. Starting a
        guest that is already running returns it untouched; starting one that
        exited boots it again."""

    @abc.abstractmethod
    def stop(self, name: str, timeout: float) -> None:
        """Ask the guest to halt, force it after `timeout` seconds, and forget
        it. Stopping a guest that does not exist succeeds."""

    @abc.abstractmethod
    def list(self) -> dict[str, GuestInfo]:
        """Every guest this driver knows of, running or exited, found from
        the state dir (not from memory) so that it works after a restart."""

    @abc.abstractmethod
    def is_ready(self, name: str) -> bool:
        """True once the guest has booted to its service."""

    def info(self, name: str) -> GuestInfo | None:
        """One guest; drivers may override this with something cheaper."""
        return self.list().get(name)

    def freeze(self, name: str) -> None:
        """Pause a running guest in place (its memory kept, no CPU), so that
        list() and info() say frozen, after an Agent restart too. Freezing a
        frozen guest does nothing. Drivers with can_freeze override it."""
        raise WrongState(f"the {self.name} driver cannot freeze guests")

    def thaw(self, name: str) -> None:
        """Resume a frozen guest where it was paused; thawing a running
        guest does nothing."""
        raise WrongState(f"the {self.name} driver cannot freeze guests")

    def sync_disk(self, name: str) -> None:
        """Ask the running guest to write what it holds for its disk (its
        page cache) to the disk, before a move copies it. Drivers that
        cannot leave it to the guest's own writeback (a copy is then as
        after a power cut: what the guest synced is there)."""

    def export_disk(self, name: str, path: str) -> None:
        """Write the whole disk that guest `name` sees (its image and what
        it wrote over it) as a new sparse raw file at `path`, for a move
        that carries it (`migration`). The guest is frozen or stopped
        meanwhile: what it wrote during the copy would tear it."""
        raise WrongState(f"the {self.name} driver cannot carry a guest's disk to another node")

    def fingerprint(self) -> Fingerprint:
        """Whether this driver can run guests on this host (its binary and
        kernel are there, ...) and what it found. Run once at Agent start."""
        return Fingerprint(usable=True)

    def capabilities(self, fingerprint: Fingerprint | None = None) -> DriverCapabilities:
        """What the Agent registers for this driver."""
        return DriverCapabilities(
            hypervisor=self.name, min_memory=int(self.min_memory), kernel=self.kernel_label,
            memory_overhead=int(self.memory_overhead), live_memory=self.live_memory,
            freeze=self.can_freeze, disk_bound=self.disk_bound, plumbing=self.plumbing,
            migration=self.migration, attributes=dict(fingerprint.attributes if fingerprint else {}))

    def guest_oom_kills(self, name: str) -> int | None:
        """How many processes the guest's own kernel killed for want of
        memory since it booted (its /proc/vmstat oom_kill), or None when the
        driver cannot tell or the guest is not running. The host's memory
        cgroup never sees these: the guest ran out of its RAM, not the
        VMM out of its limit."""
        return None

    def set_memory(self, name: str, memory_mib: int) -> bool:
        """Give a running guest `memory_mib` MiB of RAM without restarting
        it. False when that takes a new boot (more than the guest booted
        with, or a driver that cannot: this default; the Master gives such
        hypervisors a new generation instead: their `live_memory` is False);
        raises when the guest cannot give the memory back now."""
        return False


def check_guest_name(name: str) -> str:
    # Guest names become file names under the state dir: a DNS label cannot
    # climb out of it.
    return check_dns_label("virtual node", name, NODE_NAME_MAX)


def spec_as_dict(spec: GuestSpec) -> dict:
    return dataclasses.asdict(spec)


_drivers: dict[str, type[HypervisorDriver]] | None = None


def drivers() -> dict[str, type[HypervisorDriver]]:
    """The registry (Ganeti's _HYPERVISOR_MAP): hypervisor name -> driver class."""
    global _drivers
    if _drivers is None:
        # Imported on first use, not at import time: every driver module
        # imports this one for HypervisorDriver, and importing a driver
        # module first must work too.
        from soda.hypervisors.fake import FakeDriver
        from soda.hypervisors.qemu import QemuDriver
        from soda.hypervisors.uml import UmlDriver
        builtin: dict[str, type[HypervisorDriver]] = {
            "fake": FakeDriver,
            "uml": UmlDriver,
            "qemu": QemuDriver,
        }
        _drivers = {**builtin, **_plugin_drivers(builtin)}
    return _drivers


def __getattr__(name: str) -> Any:
    # `base.DRIVERS` reads like a plain module constant (PEP 562).
    if name == "DRIVERS":
        return drivers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_driver(name: str, state_dir: str, config: Any = None) -> HypervisorDriver:
    """Driver `name` on `state_dir`, configured by `config` (an instance of
    its `Config`; None = that section's defaults)."""
    cls = driver_class(name)
    return cls(state_dir, **dataclasses.asdict(config if config is not None else cls.Config()))


def driver_class(name: str) -> type[HypervisorDriver]:
    registry = drivers()
    try:
        return registry[name]
    except KeyError:
        raise InvalidSpec(f"unknown hypervisor driver {name!r} "
                          f"(available: {', '.join(sorted(registry))})") from None


def _plugin_drivers(builtin: Mapping[str, type[HypervisorDriver]]) -> dict[str, type[HypervisorDriver]]:
    """Drivers other distributions offer (entry points in ENTRY_POINT_GROUP,
    `name = module:Class`). A plugin that cannot be loaded is left out with
    a warning: one broken package must not stop a node's other drivers."""
    found: dict[str, type[HypervisorDriver]] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            check_hypervisor_name(ep.name)
            if ep.name in builtin:
                raise InvalidSpec(f"{ep.name!r} is a built-in driver")
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, HypervisorDriver)):
                raise InvalidSpec(f"{ep.value} is not a HypervisorDriver")
        except Exception as exc:            # whatever a third-party import raises
            log.warning("hypervisor driver plugin %s (%s) left out: %s", ep.name, ep.value, exc)
            continue
        found[ep.name] = cls
    return found


def guest_mac(address: str) -> str:
    """The guest's MAC, made from its IPv4 address (locally administered,
    02:50:a:b:c:d). Without it UML picks a random MAC on every boot, and a
    new guest at a reused address stays unreachable from peers that still
    hold the old guest's MAC (the host's neighbour entry on the node's
    uplink, so the Switch) until their entry fails: 5 to 60 s of "no
    route to host" after create --wait said RUNNING. Every driver uses it."""
    try:
        octets = [int(part) for part in address.split(".")]
    except ValueError:
        octets = []
    if len(octets) != 4 or not all(0 <= o <= 255 for o in octets):
        raise InvalidSpec(f"guest address {address!r} is not an IPv4 address")
    return "02:50:" + ":".join(f"{o:02x}" for o in octets)
