"""Knowing a process again: a process is named for good by its pid, its start
time (field 22 of /proc/PID/stat, clock ticks since boot) and its command
line, all read from /proc. A pid alone is not a name: the kernel hands it to
another program once the first one is gone.

Owns the /proc readers, `ProcessId` (the recorded identity of one process)
and the only safe way to signal a recorded process: pin the pid with a
pidfd, check the identity while pinned, signal through the pidfd. Shared by
the hypervisor drivers (soda.hypervisors.process builds guests' identities
on it) and the local-cluster launcher (soda.devcluster). Knows nothing of
guests or of any record's layout beyond its own `as_dict`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Callable

DEAD_STATES = ("Z", "X", "x")      # zombie or dead: gone, whatever /proc still shows


def read_proc(pid: int, name: str) -> bytes | None:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 first)."""
    data = read_proc(pid, "stat")
    # The command name may hold spaces and parentheses: split after the last ")".
    return None if data is None else data[data.rindex(b")") + 2:].decode().split()


def proc_starttime(pid: int) -> int | None:
    fields = proc_stat(pid)
    return None if fields is None else int(fields[19])      # field 22


def proc_cmdline(pid: int) -> list[str] | None:
    data = read_proc(pid, "cmdline")
    return None if data is None else [a.decode(errors="surrogateescape")
                                      for a in data.split(b"\0")[:-1]]


def signal_pinned(pid: int, check: Callable[[int], bool], sig: int) -> bool:
    """Send `sig` to `pid` only if `check(pid)` holds while a pidfd pins the
    process, so that the pid cannot pass to another process between the
    check and the signal. Whether it was sent."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if not check(pid):
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


@dataclasses.dataclass(frozen=True)
class ProcessId:
    """One process as recorded when it was started: it is still that process
    only while pid, start time and command line all match /proc."""

    pid: int
    starttime: int
    argv: tuple[str, ...]

    @classmethod
    def of_child(cls, pid: int, argv: list[str] | tuple[str, ...], timeout: float = 2.0) -> ProcessId | None:
        """The identity of a child just spawned with `argv`. subprocess.Popen
        returns once the exec has begun, but /proc shows an empty command
        line until the kernel has laid out the new one: wait for it, so that
        the identity matches from the moment it is recorded. A child that
        already died keeps its start time until it is reaped."""
        deadline = time.monotonic() + timeout
        while True:
            fields = proc_stat(pid)
            if fields is None:
                return None
            if (fields[0] in DEAD_STATES or tuple(proc_cmdline(pid) or ()) == tuple(argv)
                    or time.monotonic() > deadline):
                return cls(pid, int(fields[19]), tuple(argv))
            time.sleep(0.001)

    @classmethod
    def read(cls, pid: int) -> ProcessId | None:
        """The identity /proc shows for `pid` now (for a process that records
        itself; another process's pid may already be someone else's)."""
        starttime, argv = proc_starttime(pid), proc_cmdline(pid)
        return None if starttime is None or argv is None else cls(pid, starttime, tuple(argv))

    @classmethod
    def from_dict(cls, record: dict) -> ProcessId:
        return cls(int(record["pid"]), int(record["starttime"]), tuple(record["argv"]))

    def as_dict(self) -> dict:
        return {"pid": self.pid, "starttime": self.starttime, "argv": list(self.argv)}

    def matches(self, pid: int | None = None) -> bool:
        """Whether `pid` (default: the recorded one) is this process, alive."""
        pid = self.pid if pid is None else pid
        fields = proc_stat(pid)
        if fields is None or fields[0] in DEAD_STATES or int(fields[19]) != self.starttime:
            return False
        return tuple(proc_cmdline(pid) or ()) == self.argv

    def is_running(self) -> bool:
        return self.matches()

    def signal(self, sig: int) -> bool:
        """Signal the process only if it is still this one; whether it was sent."""
        return signal_pinned(self.pid, self.matches, sig)
