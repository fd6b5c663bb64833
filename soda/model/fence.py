"""The Daemon's fence of one virtual node (cgroups, TAP shaping) and the
kernel values it writes; shared by the Daemon and its clients."""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class Limits:
    """Concrete kernel values of one virtual node's fence."""
    cpu_shares: int = 0
    cpu_quota_us: int = -1     # -1 = no cap
    cpu_period_us: int = 0
    memory_bytes: int = 0
    pids_max: int = 0          # 0 = unlimited
    rate_bit: int = 0          # 0 = not shaped
    burst_bytes: int = 0


@dataclass(frozen=True)
class Fence:
    """A fenced virtual node: the guest process joins every dir in `cgroups`
    (writes its pid to <dir>/cgroup.procs) before it execs the hypervisor."""
    name: str
    cgroups: tuple[str, ...]
    cgroup_version: str
    limits: Limits
    tap: str = ""
    ifb: str = ""
    frozen: bool = False        # its processes are held by the cgroup freezer


@dataclass(frozen=True)
class Released:
    name: str
    existed: bool
    killed: int = 0
