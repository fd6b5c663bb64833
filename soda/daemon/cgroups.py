"""cgroup backends: where a virtual node's CPU, memory and pids limits live.

Owns one interface, `CgroupBackend`, and its v1 implementation (separate
hierarchies per controller under <root>/<controller>/). A v2 backend (one
unified tree, cpu.weight / cpu.max / memory.max) slots in behind the same
interface; `open_backend` picks by probing the mounted tree.

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
from dataclasses import dataclass
from typing import Callable

from soda import errors
from soda.model import Limits
from soda.model import NODE_NAME_MAX, check_dns_label

V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")
# Files whose presence proves that a v1 controller is mounted and usable
# (the root of the pids hierarchy has no pids.* files, only its children do).
V1_PROBE_FILES = ("cpu/cpu.shares", "cpuacct/cpuacct.usage", "memory/memory.limit_in_bytes",
                  "pids/cgroup.procs")
V2_NEEDED = ("cpu", "memory", "pids")


@dataclass(frozen=True)
class CgroupUsage:
    cpu_seconds: float = 0.0
    cpu_throttled_seconds: float = 0.0
    memory_bytes: int = 0
    memory_peak_bytes: int = 0
    memory_limit_bytes: int = 0
    memory_failcnt: int = 0
    oom_kills: int = 0
    pids: int = 0


def os_error(exc: OSError, what: str) -> errors.SodaError:
    """A kernel refusal as a SodaError, chosen by errno (never by message)."""
    detail = f"{what}: {exc.strerror or exc}"
    if exc.errno == errno.ENOENT:
        return errors.NotFound(detail)
    if exc.errno in (errno.EINVAL, errno.ERANGE):
        return errors.InvalidSpec(detail)
    if exc.errno in (errno.EBUSY, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC):
        return errors.WrongState(detail)
    if exc.errno in (errno.EAGAIN, errno.ENOMEM, errno.EINTR):
        return errors.TemporaryError(detail)
    return errors.SodaError(detail)


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

    @abc.abstractmethod
    def contains(self, name: str, pid: int) -> bool:
        """Whether the kernel says `pid` is in the virtual node's cgroups
        (from /proc/<pid>/cgroup, not from our own listing)."""

    @abc.abstractmethod
    def remove(self, name: str) -> bool:
        """Remove the directories; True if any existed. They must be empty."""

    @abc.abstractmethod
    def usage(self, name: str) -> CgroupUsage:
        """Counters; NotFound if the virtual node has no cgroups."""

    def exists(self, name: str) -> bool:
        return any(os.path.isdir(p) for p in self.paths(name))

    def kill(self, name: str, pid: int, sig: int = signal.SIGKILL) -> bool:
        """Send `sig` to `pid` if it is in this virtual node's cgroups."""
        return pidfd_signal(pid, sig, lambda: self.contains(name, pid))


class CgroupV1(CgroupBackend):
    """cgroup v1: cpu, cpuacct, memory and pids are separate hierarchies,
    each mounted at <root>/<controller>; a guest joins all four."""

    version = "v1"

    def __init__(self, root: str = "/sys/fs/cgroup", parent: str = "soda",
                 proc_root: str = "/proc", controllers: tuple[str, ...] = V1_CONTROLLERS,
                 sleep: Callable[[float], None] = time.sleep,
                 rmdir: Callable[[str], None] = os.rmdir):
        super().__init__(root, parent, proc_root)
        self.controllers = controllers
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
        return paths

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

    def contains(self, name: str, pid: int) -> bool:
        try:
            text = read_file(os.path.join(self.proc_root, str(pid), "cgroup"))
        except errors.NotFound:
            return False
        ours = f"/{self.parent}/{name}"
        for line in text.splitlines():
            # hierarchy-id:controller[,controller...]:path
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            if not set(parts[1].split(",")) & set(self.controllers):
                continue
            if parts[2] == ours or parts[2].startswith(ours + "/"):
                return True
        return False

    def remove(self, name: str) -> bool:
        existed = False
        for path in self.paths(name):
            for attempt in range(50):
                try:
                    self.rmdir(path)
                    existed = True
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    # EBUSY right after the last process died: the kernel
                    # lets go of an exiting task's cgroup asynchronously.
                    if exc.errno == errno.EBUSY and attempt < 49:
                        self.sleep(0.02)
                        continue
                    raise os_error(exc, f"cannot remove cgroup {path}") from None
        return existed

    def usage(self, name: str) -> CgroupUsage:
        if not self.exists(name):
            raise errors.NotFound(f"virtual node {name} has no cgroups here")
        cpu_stat = read_keyed(self._file("cpu", name, "cpu.stat"))
        oom = read_keyed(self._file("memory", name, "memory.oom_control"))
        return CgroupUsage(
            cpu_seconds=read_int(self._file("cpuacct", name, "cpuacct.usage"), 0) / 1e9,
            cpu_throttled_seconds=cpu_stat.get("throttled_time", 0) / 1e9,
            memory_bytes=read_int(self._file("memory", name, "memory.usage_in_bytes"), 0),
            memory_peak_bytes=read_int(self._file("memory", name, "memory.max_usage_in_bytes"), 0),
            memory_limit_bytes=read_int(self._file("memory", name, "memory.limit_in_bytes"), 0),
            memory_failcnt=read_int(self._file("memory", name, "memory.failcnt"), 0),
            oom_kills=oom.get("oom_kill", 0),
            pids=read_int(self._file("pids", name, "pids.current"), 0),
        )


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


def open_backend(root: str, parent: str, version: str | None = None) -> CgroupBackend:
    """The backend for the mounted tree (probed unless `version` is given)."""
    version = version or probe(root)
    if version == "v1":
        return CgroupV1(root, parent)
    raise errors.WrongState(f"cgroup {version} found under {root}, but this Daemon has only "
                            "the cgroup v1 backend so far")
