"""The hypervisor driver interface and the registry of drivers.

Owns what every driver promises the Agent: a pure `build_argv`, an
idempotent `start` and `stop`, a `list` rebuilt from the driver's state dir
(so a restarted Agent adopts the guests it finds instead of starting them
again), and readiness. Also owns `DRIVERS`, the one explicit map from a
hypervisor name to its class, and `make_driver`.

A driver knows nothing about the Master, phases or images: the Agent's
reconciler decides what to run and hands a driver a finished `GuestSpec`.
Drivers must not import grpc.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from soda.errors import InvalidSpec
from soda.model import NODE_NAME_MAX, Resources, check_dns_label

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


class HypervisorDriver(abc.ABC):
    """One way of running guests. Subclasses keep all their state under
    `state_dir/<name>/` and find their guests again from it."""

    name: str = ""

    def __init__(self, state_dir: str, runner: Any = None, clock: Clock = time.time):
        self.state_dir = state_dir
        self.runner = runner
        self.clock = clock

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

    # Whether guests boot from a root disk over the image (soda.agent.images
    # sizes one to the virtual node's disk); the fake driver never reads it.
    uses_disk = True
    # MiB each guest's hypervisor process needs above the guest's memory.
    # The Agent registers it with the Master (placement counts it) and hands
    # it to the Daemon (the memory limit adds it).
    memory_overhead = 0

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
        hypervisors a new generation instead, `soda.model.MEMORY_CHANGES_LIVE`);
        raises when the guest cannot give the memory back now."""
        return False


def check_guest_name(name: str) -> str:
    # Guest names become file names under the state dir: a DNS label cannot
    # climb out of it.
    return check_dns_label("virtual node", name, NODE_NAME_MAX)


def write_json_atomic(path: str, data: Any) -> None:
    """Replace `path` with `data` so that a reader (or a restarted Agent)
    sees either the old file or the new one, never half of it."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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
        _drivers = {
            "fake": FakeDriver,
            "uml": UmlDriver,
            "qemu": QemuDriver,
        }
    return _drivers


def __getattr__(name: str) -> Any:
    # `base.DRIVERS` reads like a plain module constant (PEP 562).
    if name == "DRIVERS":
        return drivers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_driver(name: str, state_dir: str, **options: Any) -> HypervisorDriver:
    registry = drivers()
    try:
        cls = registry[name]
    except KeyError:
        raise InvalidSpec(f"unknown hypervisor driver {name!r} "
                          f"(available: {', '.join(sorted(registry))})") from None
    return cls(state_dir, **options)


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
