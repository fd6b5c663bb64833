"""What the kernel says about SODA's virtual node cgroups, for system tests,
on either layout: v1 (a hierarchy per controller, <root>/<controller>/
<parent>/<vnode>) or v2 (one tree, <root>/<parent>/<vnode>). The layout is
the mounted tree's (a cgroup2 root has cgroup.controllers), as the Daemon
probes it; tests ask by meaning (CPU weight, CPU time, memory limit, OOM
kills) and never name a v1 or v2 file themselves. Only kernel files are
read: nothing of SODA's code decides a value seen here."""

from __future__ import annotations

import os

ROOT = "/sys/fs/cgroup"
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "cpuset")


def unified(root: str = ROOT) -> bool:
    return os.path.exists(os.path.join(root, "cgroup.controllers"))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _keyed(path: str) -> dict[str, int]:
    try:
        text = _read(path)
    except FileNotFoundError:
        return {}
    return {k: int(v) for k, v in (line.split() for line in text.splitlines()) if v.lstrip("-").isdigit()}


class VnodeCgroups:
    """The cgroups of the virtual nodes below one cgroup parent."""

    def __init__(self, parent: str, root: str = ROOT):
        self.parent = parent
        self.root = root
        self.v2 = unified(root)

    # ---- where --------------------------------------------------------------
    def _dir(self, controller: str, vnode: str = "") -> str:
        parts = [self.root] + ([] if self.v2 else [controller]) + [self.parent] + ([vnode] if vnode else [])
        return os.path.join(*parts)

    def file(self, controller: str, vnode: str, v1_name: str, v2_name: str) -> str:
        return os.path.join(self._dir(controller, vnode), v2_name if self.v2 else v1_name)

    def dirs(self, vnode: str = "") -> list[str]:
        """Every directory of `vnode` (or of the parent) that exists."""
        candidates = [self._dir("", vnode)] if self.v2 else [self._dir(c, vnode) for c in V1_CONTROLLERS]
        return [d for d in candidates if os.path.isdir(d)]

    def names(self, controller: str = "cpu") -> list[str]:
        """The virtual nodes with a directory below the parent."""
        top = self._dir(controller)
        if not os.path.isdir(top):
            return []
        return sorted(d for d in os.listdir(top) if os.path.isdir(os.path.join(top, d)))

    def leftovers(self) -> list[str]:
        """The parent's directories in every hierarchy (none once all is removed)."""
        if self.v2:
            return [self._dir("")] if os.path.isdir(self._dir("")) else []
        return [os.path.join(self.root, c, self.parent) for c in os.listdir(self.root)
                if os.path.isdir(os.path.join(self.root, c, self.parent))]

    # ---- what ---------------------------------------------------------------
    def procs(self, vnode: str, controller: str = "") -> set[int]:
        """The processes in the virtual node's cgroup (of one v1 controller,
        or of all of them)."""
        dirs = [self._dir(controller, vnode)] if controller and not self.v2 else self.dirs(vnode)
        out: set[int] = set()
        for d in dirs:
            out.update(int(p) for p in _read(os.path.join(d, "cgroup.procs")).split())
        return out

    def cpu_weight(self, vnode: str) -> int:
        """v1 cpu.shares or v2 cpu.weight: compare weights as ratios."""
        return int(_read(self.file("cpu", vnode, "cpu.shares", "cpu.weight")))

    def cpu_seconds(self, vnode: str) -> float:
        if self.v2:
            return _keyed(self.file("cpu", vnode, "", "cpu.stat"))["usage_usec"] / 1e6
        return int(_read(self.file("cpuacct", vnode, "cpuacct.usage", ""))) / 1e9

    def cpu_quota(self, vnode: str) -> tuple[int, int]:
        """(quota, period) in microseconds; quota -1 = no cap."""
        if self.v2:
            quota, period = _read(self.file("cpu", vnode, "", "cpu.max")).split()
            return (-1 if quota == "max" else int(quota)), int(period)
        return (int(_read(self.file("cpu", vnode, "cpu.cfs_quota_us", ""))),
                int(_read(self.file("cpu", vnode, "cpu.cfs_period_us", ""))))

    def memory_limit(self, vnode: str) -> int:
        return int(_read(self.file("memory", vnode, "memory.limit_in_bytes", "memory.max")))

    def memory_usage(self, vnode: str) -> int:
        return int(_read(self.file("memory", vnode, "memory.usage_in_bytes", "memory.current")))

    def oom_kills(self, vnode: str) -> int:
        return _keyed(self.file("memory", vnode, "memory.oom_control", "memory.events")).get("oom_kill", 0)

    def pids_max(self, vnode: str) -> str:
        return _read(self.file("pids", vnode, "pids.max", "pids.max"))

    def cpus(self, vnode: str) -> str:
        """The CPUs a v1 cpuset confines the virtual node to."""
        return _read(self.file("cpuset", vnode, "cpuset.cpus", "cpuset.cpus.effective"))
