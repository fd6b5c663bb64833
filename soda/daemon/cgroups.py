"""cgroup backends: where a virtual node's CPU, memory and pids limits live.

Owns one interface, `CgroupBackend`, and its two implementations: v1
(separate hierarchies per controller under <root>/<controller>/) and v2 (one
unified tree: cpu.weight, cpu.max, memory.max, pids.max, cgroup.kill);
`open_backend` picks by probing the mounted tree. Under systemd
(`delegated`), the parent lies below the Daemon's own delegated cgroup, read
from /proc/self/cgroup (`delegated_base`).

Every virtual node's directories are named <parent>/<vnode>, so a restarted
Daemon finds its virtual nodes by listing <parent>: no state is kept in
memory. A backend writes files and signals only processes that are in the
virtual node's cgroup; it decides no values (plan.py does) and never
touches the network.
"""

from __future__ import annotations

import abc
import errno
import os
import signal
import time
from typing import Callable, Iterator

from soda import errors
from soda.model.fence import Limits
from soda.model.names import NODE_NAME_MAX, check_dns_label
from soda.model.usage import VnodeUsage

V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")
# Files whose presence proves that a v1 controller is mounted and usable
# (the root of the pids hierarchy has no pids.* files, only its children do).
V1_PROBE_FILES = ("cpu/cpu.shares", "cpuacct/cpuacct.usage", "memory/memory.limit_in_bytes",
                  "pids/cgroup.procs")
V2_NEEDED = ("cpu", "memory", "pids")
# The v1 freezer is optional: a host without it fences as before, and
# freezing a guest there is refused with the reason.
V1_FREEZER = "freezer"
# How long a freeze may take to hold every task (a task in the kernel, in
# an uninterruptible sleep, is held when it comes out) before it is undone.
FREEZE_TIMEOUT_SECONDS = 5.0
FREEZE_POLL_SECONDS = 0.005
# cgroup v2's default cpu.weight is 100 where v1's default cpu.shares is
# 1024: map linearly, so that ratios of shares stay ratios of weights.
V2_WEIGHT_MIN, V2_WEIGHT_MAX = 1, 10_000
V1_DEFAULT_SHARES, V2_DEFAULT_WEIGHT = 1024, 100
# Under a delegated v2 cgroup the Daemon's own process moves to this leaf:
# v2 lets a cgroup with processes enable no controllers for its children.
V2_DAEMON_LEAF = "daemon"


def shares_to_weight(shares: int) -> int:
    weight = round(shares * V2_DEFAULT_WEIGHT / V1_DEFAULT_SHARES)
    return max(V2_WEIGHT_MIN, min(V2_WEIGHT_MAX, weight))


def weight_to_shares(weight: int) -> int:
    return round(weight * V1_DEFAULT_SHARES / V2_DEFAULT_WEIGHT)


def os_error(exc: OSError, what: str) -> errors.SodaError:
    """A kernel refusal as a SodaError, chosen by errno (never by message)."""
    return errors.from_errno(exc.errno, f"{what}: {exc.strerror or exc}")


def write_file(path: str, value: str | int) -> None:
    # Inside `with`: the kernel reports a rejected value on write or close,
    # and a bare open().write() can lose that error.
    try:
        with open(path, "w") as f:
            f.write(str(value))
    except OSError as exc:
        raise os_error(exc, f"cannot write {value!r} to {path}") from None


def read_file(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise os_error(exc, f"cannot read {path}") from None


def read_int(path: str, default: int | None = None) -> int:
    """An integer file; `default` when the file does not exist (an older
    kernel) and a default was given."""
    try:
        text = read_file(path).strip()
    except errors.NotFound:
        if default is None:
            raise
        return default
    if text == "max":
        return 0
    try:
        return int(text)
    except ValueError:
        raise errors.SodaError(f"unexpected content {text!r} in {path}") from None


def read_keyed(path: str) -> dict[str, int]:
    """A "key value" per line file (cpu.stat, memory.oom_control); {} if absent."""
    try:
        text = read_file(path)
    except errors.NotFound:
        return {}
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def check_parent(parent: str) -> str:
    """The cgroup parent is a relative path (nested parents are allowed for
    a systemd-delegated subtree) that cannot climb out of the hierarchy."""
    parts = parent.split("/") if isinstance(parent, str) else [""]
    if not parent or parent.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise errors.InvalidSpec(f"invalid cgroup parent {parent!r}: use a relative path "
                                 "like 'soda' or 'soda.slice/guests'")
    return parent


def pidfd_signal(pid: int, sig: int, still_ours: Callable[[], bool]) -> bool:
    """Signal `pid` only if `still_ours()` holds once the pid is pinned by a
    pidfd: the check and the signal then refer to one and the same process,
    even if the number is reused meanwhile. False if it was gone or not ours."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError as exc:
        raise os_error(exc, f"cannot open pid {pid}") from None
    try:
        if not still_ours():
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


class CgroupBackend(abc.ABC):
    """One cgroup layout. Names are virtual node names (DNS labels)."""

    version: str = ""

    def __init__(self, root: str, parent: str, proc_root: str = "/proc"):
        self.root = root
        self.parent = check_parent(parent)
        self.proc_root = proc_root

    @abc.abstractmethod
    def paths(self, name: str) -> tuple[str, ...]:
        """The directories a guest process must join, one per hierarchy."""

    @abc.abstractmethod
    def create(self, name: str) -> tuple[str, ...]:
        """Make the directories (and the parent); existing ones are kept."""

    @abc.abstractmethod
    def set_limits(self, name: str, limits: Limits) -> None:
        """Write the CPU, memory and pids limits; works live on a running guest."""

    @abc.abstractmethod
    def read_limits(self, name: str) -> Limits:
        """The limits in force, read back from the kernel (rate fields 0)."""

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Every virtual node with at least one directory under the parent."""

    @abc.abstractmethod
    def pids(self, name: str) -> set[int]:
        """Every process in any of the virtual node's cgroups."""

    def contains(self, name: str, pid: int) -> bool:
        """Whether the kernel says `pid` is in the virtual node's cgroups
        (from /proc/<pid>/cgroup, not from our own listing)."""
        try:
            text = read_file(os.path.join(self.proc_root, str(pid), "cgroup"))
        except errors.NotFound:
            return False
        ours = f"/{self.parent}/{name}"
        return any(path == ours or path.startswith(ours + "/") for path in self._cgroup_paths(text))

    @abc.abstractmethod
    def _cgroup_paths(self, proc_pid_cgroup: str) -> Iterator[str]:
        """The paths a /proc/<pid>/cgroup text gives in this layout's hierarchies."""

    @abc.abstractmethod
    def remove(self, name: str) -> bool:
        """Remove the directories; True if any existed. They must be empty."""

    @abc.abstractmethod
    def usage(self, name: str) -> VnodeUsage:
        """The cgroup counters (the traffic ones are the Shaper's and stay 0);
        NotFound if the virtual node has no cgroups."""

    def exists(self, name: str) -> bool:
        return any(os.path.isdir(p) for p in self.paths(name))

    def prepare(self) -> None:
        """Make the parent ready for guests' cgroups, at the Daemon's start
        (so that a tree it cannot use is said at once, not at the first guest)."""

    can_freeze = False

    def freeze(self, name: str, frozen: bool) -> None:
        """Hold (or let go) every process in the virtual node's cgroups;
        returns once the kernel says all are held (or undoes the freeze and
        raises TemporaryError when some are not within
        FREEZE_TIMEOUT_SECONDS). NotFound when it has no cgroups."""
        raise errors.WrongState(f"this host's cgroups ({self.version}) have no freezer")

    def frozen(self, name: str) -> bool:
        """Whether the virtual node's cgroups are frozen (or freezing)."""
        return False

    def _wait_frozen(self, name: str, state: Callable[[], bool], undo: Callable[[], None]) -> None:
        deadline = time.monotonic() + FREEZE_TIMEOUT_SECONDS
        while not state():
            if time.monotonic() >= deadline:
                undo()
                raise errors.TemporaryError(f"the freezer did not hold every process of virtual node "
                                            f"{name} within {FREEZE_TIMEOUT_SECONDS:g}s; thawed it again")
            self.sleep(FREEZE_POLL_SECONDS)

    def kill(self, name: str, pid: int, sig: int = signal.SIGKILL) -> bool:
        """Send `sig` to `pid` if it is in this virtual node's cgroups."""
        return pidfd_signal(pid, sig, lambda: self.contains(name, pid))

    def kill_all(self, name: str) -> bool:
        """SIGKILL every process in the virtual node's cgroups at once, the
        kernel's way; False when this layout has no such way (v1)."""
        return False

    def _remove_dir(self, path: str) -> bool:
        """rmdir one empty cgroup directory; False if it was not there. Uses
        the `rmdir` and `sleep` each layout is given."""
        for attempt in range(50):
            try:
                self.rmdir(path)
                return True
            except FileNotFoundError:
                return False
            except OSError as exc:
                # EBUSY right after the last process died: the kernel
                # lets go of an exiting task's cgroup asynchronously.
                if exc.errno == errno.EBUSY and attempt < 49:
                    self.sleep(0.02)
                    continue
                raise os_error(exc, f"cannot remove cgroup {path}") from None
        return False


class CgroupV1(CgroupBackend):
    """cgroup v1: cpu, cpuacct, memory and pids are separate hierarchies,
    each mounted at <root>/<controller>; a guest joins all four, and the
    freezer's too where it is mounted (`freezer=True`)."""

    version = "v1"

    def __init__(self, root: str = "/sys/fs/cgroup", parent: str = "soda",
                 proc_root: str = "/proc", controllers: tuple[str, ...] = V1_CONTROLLERS,
                 sleep: Callable[[float], None] = time.sleep,
                 rmdir: Callable[[str], None] = os.rmdir, cpuset: str = "",
                 freezer: bool = False):
        super().__init__(root, parent, proc_root)
        # With a cpuset every guest also joins the cpuset hierarchy, confined
        # to those CPUs (and to the memory nodes the root allows).
        self.cpuset = cpuset
        if cpuset and "cpuset" not in controllers:
            controllers = tuple(controllers) + ("cpuset",)
        if freezer and V1_FREEZER not in controllers:
            controllers = tuple(controllers) + (V1_FREEZER,)
        self.controllers = controllers
        self.can_freeze = V1_FREEZER in controllers
        self.sleep = sleep
        # Injected for tests: a fake tree's directories hold real files,
        # which cgroupfs directories only appear to.
        self.rmdir = rmdir

    def _dir(self, controller: str, name: str) -> str:
        check_dns_label("virtual node", name, NODE_NAME_MAX)
        return os.path.join(self.root, controller, self.parent, name)

    def _file(self, controller: str, name: str, filename: str) -> str:
        return os.path.join(self._dir(controller, name), filename)

    def paths(self, name: str) -> tuple[str, ...]:
        return tuple(self._dir(c, name) for c in self.controllers)

    def create(self, name: str) -> tuple[str, ...]:
        paths = self.paths(name)
        for path in paths:
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise os_error(exc, f"cannot create cgroup {path}") from None
        if self.cpuset:
            self._fill_cpusets(name)
        return paths

    def _fill_cpusets(self, name: str) -> None:
        """A v1 cpuset cgroup takes no process until cpuset.cpus and
        cpuset.mems are set, and a child's CPUs must be its parent's: set
        every level from the root's child down to the virtual node."""
        top = os.path.join(self.root, "cpuset")
        mems = read_file(os.path.join(top, "cpuset.mems")).strip() or "0"
        level = top
        for part in self.parent.split("/") + [name]:
            level = os.path.join(level, part)
            cpus_file = os.path.join(level, "cpuset.cpus")
            try:
                current = read_file(cpus_file).strip()
            except errors.NotFound:
                current = ""
            if current != self.cpuset:
                write_file(cpus_file, self.cpuset)
            mems_file = os.path.join(level, "cpuset.mems")
            try:
                has_mems = bool(read_file(mems_file).strip())
            except errors.NotFound:
                has_mems = False
            if not has_mems:
                write_file(mems_file, mems)

    def set_limits(self, name: str, limits: Limits) -> None:
        self.create(name)
        write_file(self._file("cpu", name, "cpu.shares"), limits.cpu_shares)
        # Period before quota: the kernel checks the quota against the
        # period in force, and -1 (no cap) is valid with any period.
        write_file(self._file("cpu", name, "cpu.cfs_period_us"), limits.cpu_period_us)
        write_file(self._file("cpu", name, "cpu.cfs_quota_us"), limits.cpu_quota_us)
        try:
            write_file(self._file("memory", name, "memory.limit_in_bytes"), limits.memory_bytes)
        except errors.WrongState as exc:
            # EBUSY: the kernel could not reclaim down to the new limit.
            raise errors.WrongState(f"cannot lower the memory limit of {name} to "
                                    f"{limits.memory_bytes >> 20} MiB, it uses more now "
                                    f"({exc.message})") from None
        write_file(self._file("pids", name, "pids.max"), limits.pids_max or "max")

    def read_limits(self, name: str) -> Limits:
        return Limits(
            cpu_shares=read_int(self._file("cpu", name, "cpu.shares")),
            cpu_quota_us=read_int(self._file("cpu", name, "cpu.cfs_quota_us")),
            cpu_period_us=read_int(self._file("cpu", name, "cpu.cfs_period_us")),
            memory_bytes=read_int(self._file("memory", name, "memory.limit_in_bytes")),
            pids_max=read_int(self._file("pids", name, "pids.max")),
            rate_bit=0, burst_bytes=0)

    def names(self) -> list[str]:
        found = set()
        for controller in self.controllers:
            base = os.path.join(self.root, controller, self.parent)
            try:
                entries = os.scandir(base)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise os_error(exc, f"cannot list {base}") from None
            with entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False) and _is_vnode_name(entry.name):
                        found.add(entry.name)
        return sorted(found)

    def pids(self, name: str) -> set[int]:
        found = set()
        for path in self.paths(name):
            try:
                text = read_file(os.path.join(path, "cgroup.procs"))
            except errors.NotFound:
                continue
            found.update(int(p) for p in text.split())
        return found

    def _cgroup_paths(self, proc_pid_cgroup: str) -> Iterator[str]:
        for line in proc_pid_cgroup.splitlines():
            # hierarchy-id:controller[,controller...]:path
            parts = line.split(":", 2)
            if len(parts) == 3 and set(parts[1].split(",")) & set(self.controllers):
                yield parts[2]

    def freeze(self, name: str, frozen: bool) -> None:
        if not self.can_freeze:
            return super().freeze(name, frozen)
        state = self._file(V1_FREEZER, name, "freezer.state")
        if not os.path.isdir(self._dir(V1_FREEZER, name)):
            raise errors.NotFound(f"virtual node {name} has no freezer cgroup here")
        write_file(state, "FROZEN" if frozen else "THAWED")
        if frozen:
            # FREEZING until every task is held.
            self._wait_frozen(name, lambda: read_file(state).strip() == "FROZEN",
                              lambda: write_file(state, "THAWED"))

    def frozen(self, name: str) -> bool:
        if not self.can_freeze:
            return False
        try:
            return read_file(self._file(V1_FREEZER, name, "freezer.state")).strip() != "THAWED"
        except errors.NotFound:
            return False

    def remove(self, name: str) -> bool:
        existed = False
        for path in self.paths(name):
            existed = self._remove_dir(path) or existed
        return existed

    def usage(self, name: str) -> VnodeUsage:
        if not self.exists(name):
            raise errors.NotFound(f"virtual node {name} has no cgroups here")
        cpu_stat = read_keyed(self._file("cpu", name, "cpu.stat"))
        oom = read_keyed(self._file("memory", name, "memory.oom_control"))
        return VnodeUsage(
            name=name,
            cpu_seconds=read_int(self._file("cpuacct", name, "cpuacct.usage"), 0) / 1e9,
            cpu_throttled_seconds=cpu_stat.get("throttled_time", 0) / 1e9,
            memory_bytes=read_int(self._file("memory", name, "memory.usage_in_bytes"), 0),
            memory_peak_bytes=read_int(self._file("memory", name, "memory.max_usage_in_bytes"), 0),
            memory_limit_bytes=read_int(self._file("memory", name, "memory.limit_in_bytes"), 0),
            memory_failcnt=read_int(self._file("memory", name, "memory.failcnt"), 0),
            oom_kills=oom.get("oom_kill", 0),
            pids=read_int(self._file("pids", name, "pids.current"), 0),
            pids_refused=read_keyed(self._file("pids", name, "pids.events")).get("max", 0),
        )


class CgroupV2(CgroupBackend):
    """cgroup v2: one unified tree at <root>; a guest joins one directory,
    <root>/<parent>/<vnode>. The controllers a guest needs are enabled in
    cgroup.subtree_control of every level from `base` (the root, or the
    Daemon's delegated cgroup, whose own parent enabled them) down to the
    parent. Releasing uses cgroup.kill when the kernel has it."""

    version = "v2"

    def __init__(self, root: str = "/sys/fs/cgroup", parent: str = "soda",
                 proc_root: str = "/proc", base: str = "",
                 sleep: Callable[[float], None] = time.sleep,
                 rmdir: Callable[[str], None] = os.rmdir, cpuset: str = ""):
        full = f"{base}/{parent}" if base else parent
        super().__init__(root, full, proc_root)
        self.base = base
        # With a cpuset, the cpuset controller joins the enabled ones and
        # each guest's cgroup gets cpuset.cpus (v2 children inherit the
        # memory nodes and need no value on the levels between).
        self.cpuset = cpuset
        self.needed = V2_NEEDED + (("cpuset",) if cpuset else ())
        self.sleep = sleep
        self.rmdir = rmdir

    def _dir(self, name: str) -> str:
        check_dns_label("virtual node", name, NODE_NAME_MAX)
        return os.path.join(self.root, self.parent, name)

    def _file(self, name: str, filename: str) -> str:
        return os.path.join(self._dir(name), filename)

    def paths(self, name: str) -> tuple[str, ...]:
        return (self._dir(name),)

    def prepare(self) -> None:
        self._enable_controllers()

    def _enable_controllers(self) -> None:
        """+cpu +memory +pids in subtree_control from base down to the parent."""
        levels = [self.base] if self.base else [""]
        rel = self.base
        for part in self.parent[len(self.base):].strip("/").split("/"):
            rel = f"{rel}/{part}" if rel else part
            levels.append(rel)
        for level in levels[:-1] + [self.parent]:
            directory = os.path.join(self.root, level) if level else self.root
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise os_error(exc, f"cannot create cgroup {directory}") from None
            control = os.path.join(directory, "cgroup.subtree_control")
            try:
                enabled = {c.lstrip("+") for c in read_file(control).split()}
            except errors.NotFound:
                enabled = set()
            missing = [c for c in self.needed if c not in enabled]
            if missing:
                write_file(control, " ".join(f"+{c}" for c in missing))

    def create(self, name: str) -> tuple[str, ...]:
        self._enable_controllers()
        path = self._dir(name)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, f"cannot create cgroup {path}") from None
        if self.cpuset:
            write_file(os.path.join(path, "cpuset.cpus"), self.cpuset)
        return (path,)

    def set_limits(self, name: str, limits: Limits) -> None:
        self.create(name)
        # v1 answers EBUSY to a limit below what the group uses; v2 takes it
        # and OOM-kills the group (the guest's VMM) when reclaim falls short.
        # A live change must never kill the guest: refuse it like v1 does
        # when the working set (what reclaim cannot easily drop: all but the
        # inactive page cache, as kubelet counts it) is above the new limit.
        in_use = (read_int(self._file(name, "memory.current"), default=0)
                  - read_keyed(self._file(name, "memory.stat")).get("inactive_file", 0))
        if limits.memory_bytes and in_use > limits.memory_bytes:
            raise errors.WrongState(f"cannot lower the memory limit of {name} to "
                                    f"{limits.memory_bytes >> 20} MiB, it uses more now "
                                    f"({in_use >> 20} MiB)")
        write_file(self._file(name, "cpu.weight"), shares_to_weight(limits.cpu_shares))
        quota = limits.cpu_quota_us if limits.cpu_quota_us > 0 else "max"
        write_file(self._file(name, "cpu.max"), f"{quota} {limits.cpu_period_us}")
        try:
            write_file(self._file(name, "memory.max"), limits.memory_bytes or "max")
        except errors.WrongState as exc:
            raise errors.WrongState(f"cannot lower the memory limit of {name} to "
                                    f"{limits.memory_bytes >> 20} MiB, it uses more now "
                                    f"({exc.message})") from None
        write_file(self._file(name, "pids.max"), limits.pids_max or "max")

    def read_limits(self, name: str) -> Limits:
        quota, _, period = read_file(self._file(name, "cpu.max")).strip().partition(" ")
        try:
            quota_us = -1 if quota == "max" else int(quota)
            period_us = int(period)
        except ValueError:
            raise errors.SodaError(f"unexpected content {quota} {period!r} in "
                                   f"{self._file(name, 'cpu.max')}") from None
        return Limits(
            cpu_shares=weight_to_shares(read_int(self._file(name, "cpu.weight"))),
            cpu_quota_us=quota_us, cpu_period_us=period_us,
            memory_bytes=read_int(self._file(name, "memory.max")),
            pids_max=read_int(self._file(name, "pids.max")),
            rate_bit=0, burst_bytes=0)

    def names(self) -> list[str]:
        base = os.path.join(self.root, self.parent)
        try:
            entries = os.scandir(base)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise os_error(exc, f"cannot list {base}") from None
        with entries:
            return sorted(e.name for e in entries
                          if e.is_dir(follow_symlinks=False) and _is_vnode_name(e.name))

    def pids(self, name: str) -> set[int]:
        try:
            text = read_file(self._file(name, "cgroup.procs"))
        except errors.NotFound:
            return set()
        return {int(p) for p in text.split()}

    def _cgroup_paths(self, proc_pid_cgroup: str) -> Iterator[str]:
        # The unified hierarchy has one line, "0::path".
        for line in proc_pid_cgroup.splitlines():
            if line.startswith("0::"):
                yield line[3:]
                return

    can_freeze = True       # cgroup.freeze: Linux 5.2, older than anything SODA runs on

    def freeze(self, name: str, frozen: bool) -> None:
        if not os.path.isdir(self._dir(name)):
            raise errors.NotFound(f"virtual node {name} has no cgroup here")
        write_file(self._file(name, "cgroup.freeze"), 1 if frozen else 0)
        if frozen:
            # cgroup.events says "frozen 1" once every task is held.
            self._wait_frozen(name, lambda: read_keyed(self._file(name, "cgroup.events")).get("frozen") == 1,
                              lambda: write_file(self._file(name, "cgroup.freeze"), 0))

    def frozen(self, name: str) -> bool:
        try:
            return read_int(self._file(name, "cgroup.freeze")) == 1
        except errors.NotFound:
            return False

    def kill_all(self, name: str) -> bool:
        """Kill every process in the cgroup at once through cgroup.kill
        (Linux 5.14+); False when the kernel has no cgroup.kill."""
        path = self._file(name, "cgroup.kill")
        if not os.path.exists(path):
            return False
        write_file(path, 1)
        return True

    def remove(self, name: str) -> bool:
        return self._remove_dir(self._dir(name))

    def usage(self, name: str) -> VnodeUsage:
        if not self.exists(name):
            raise errors.NotFound(f"virtual node {name} has no cgroup here")
        cpu_stat = read_keyed(self._file(name, "cpu.stat"))
        events = read_keyed(self._file(name, "memory.events"))
        current = read_int(self._file(name, "memory.current"), 0)
        return VnodeUsage(
            name=name,
            cpu_seconds=cpu_stat.get("usage_usec", 0) / 1e6,
            cpu_throttled_seconds=cpu_stat.get("throttled_usec", 0) / 1e6,
            memory_bytes=current,
            # memory.peak appeared in Linux 5.19; before it, now is all we know.
            memory_peak_bytes=read_int(self._file(name, "memory.peak"), 0) or current,
            memory_limit_bytes=read_int(self._file(name, "memory.max"), 0),
            memory_failcnt=events.get("max", 0),
            oom_kills=events.get("oom_kill", 0),
            pids=read_int(self._file(name, "pids.current"), 0),
            pids_refused=read_keyed(self._file(name, "pids.events")).get("max", 0),
        )

    def evacuate(self, pid: int) -> str:
        """Move `pid` (the Daemon) from the delegated cgroup into a leaf of
        its own, so that the delegated cgroup may enable controllers for its
        children. Returns the leaf's directory."""
        if not self.base:
            raise errors.WrongState("only a Daemon in a delegated cgroup moves itself")
        leaf = os.path.join(self.root, self.base, V2_DAEMON_LEAF)
        try:
            os.makedirs(leaf, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, f"cannot create cgroup {leaf}") from None
        write_file(os.path.join(leaf, "cgroup.procs"), pid)
        return leaf


def delegated_base(version: str, controllers: tuple[str, ...] = V1_CONTROLLERS,
                   proc_self_cgroup: str = "/proc/self/cgroup") -> str:
    """The cgroup systemd delegated to this process's unit, relative to the
    cgroup root, from /proc/self/cgroup ("0::/system.slice/x.service" on v2,
    "N:cpu,cpuacct:/system.slice/x.service" per hierarchy on v1). A Daemon
    already moved into its v2 leaf ("…/x.service/daemon") gets the unit's
    cgroup, not the leaf."""
    text = read_file(proc_self_cgroup)
    paths = set()
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, ctrls, path = parts
        if version == "v2":
            if hid == "0" and ctrls == "":
                paths.add(path)
        elif set(ctrls.split(",")) & set(controllers):
            paths.add(path)
    if not paths:
        raise errors.WrongState(f"{proc_self_cgroup} names no {version} cgroup for this process")
    if len(paths) > 1:
        raise errors.WrongState(f"{proc_self_cgroup} puts this process in different cgroups "
                                f"per controller ({', '.join(sorted(paths))}): not a delegated unit")
    path = paths.pop().strip("/")
    if version == "v2" and path.rsplit("/", 1)[-1] == V2_DAEMON_LEAF:
        path = path.rsplit("/", 1)[0] if "/" in path else ""
    if not path:
        raise errors.WrongState("this process sits in the root cgroup: nothing was delegated to it")
    return path


def _is_vnode_name(name: str) -> bool:
    try:
        check_dns_label("virtual node", name, NODE_NAME_MAX)
    except errors.InvalidSpec:
        return False
    return True


def probe(root: str = "/sys/fs/cgroup") -> str:
    """"v1" or "v2", whichever the mounted tree can really fence with; a
    WrongState that says what is missing otherwise."""
    if all(os.path.isfile(os.path.join(root, f)) for f in V1_PROBE_FILES):
        return "v1"
    try:
        with open(os.path.join(root, "cgroup.controllers")) as f:
            available = set(f.read().split())
    except OSError:
        available = None
    if available is not None and all(c in available for c in V2_NEEDED):
        return "v2"
    missing_v1 = [f for f in V1_PROBE_FILES if not os.path.isfile(os.path.join(root, f))]
    v2 = ("no cgroup2 tree" if available is None else
          f"cgroup2 offers only {' '.join(sorted(available)) or 'no controllers'}")
    raise errors.WrongState(
        f"no usable cgroups under {root}: v1 lacks {', '.join(missing_v1)}; {v2} "
        f"(need cpu, cpuacct, memory and pids)")


def open_backend(root: str, parent: str, version: str | None = None, delegated: bool = False,
                 proc_self_cgroup: str = "/proc/self/cgroup", cpuset: str = "") -> CgroupBackend:
    """The backend for the mounted tree (probed unless `version` is given).
    `delegated`: `parent` is relative to this process's own cgroup (a
    systemd unit with Delegate=yes) instead of the root."""
    version = version or probe(root)
    check_parent(parent)
    base = delegated_base(version, proc_self_cgroup=proc_self_cgroup) if delegated else ""
    if version == "v1":
        # The freezer hierarchy's root has no freezer.state (its children
        # do): that it is mounted is its cgroup.procs.
        freezer = os.path.isfile(os.path.join(root, V1_FREEZER, "cgroup.procs"))
        return CgroupV1(root, f"{base}/{parent}" if base else parent, cpuset=cpuset, freezer=freezer)
    if version == "v2":
        if cpuset and "cpuset" not in read_file(os.path.join(root, "cgroup.controllers")).split():
            raise errors.WrongState(f"a cpuset was asked for ({cpuset!r}) but this kernel's cgroup2 "
                                    f"tree at {root} has no cpuset controller")
        return CgroupV2(root, parent, base=base, cpuset=cpuset)
    raise errors.WrongState(f"unknown cgroup version {version!r}")
