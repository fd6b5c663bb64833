"""The SODA Daemon's configuration: one frozen dataclass with its defaults.

Loaded from YAML in `soda.daemon.main` with soda.config's `load` and
`with_overrides` (unknown keys are an error). Nothing here reads files or
touches the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DaemonConfig:
    socket: str = "/run/soda/daemon.sock"
    # Every virtual node's cgroup is <cgroup_root>/<controller>/<cgroup_parent>/<vnode>
    # (v1); a Daemon finds its virtual nodes again by listing cgroup_parent.
    cgroup_parent: str = "soda"
    cgroup_root: str = "/sys/fs/cgroup"
    # Under systemd (a unit with Delegate=yes): cgroup_parent lies below the
    # Daemon's own cgroup, read from /proc/self/cgroup, not below the root.
    delegated: bool = False
    # CPUs (cpuset syntax, e.g. "0" or "0-1") every guest is confined to;
    # "" = no cpuset (v1: the cpuset hierarchy joins the guest's cgroups;
    # v2: the cpuset controller, cpuset.cpus in each guest's cgroup).
    cpuset: str = ""
    # Network namespace the TAPs live in; "" = the Daemon's own.
    netns: str = ""
    pids_max: int = 512
    cpu_period_us: int = 100_000
    # HTB burst: this much time at the shaped rate, and at least burst_min_bytes.
    burst_ms: float = 10.0
    burst_min_bytes: int = 32 * 1024
    # How long ReleaseLimits keeps killing before it gives up.
    kill_timeout_seconds: float = 10.0
    max_workers: int = 8
    log_level: str = "INFO"
