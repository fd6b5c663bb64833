"""The VMM processes a driver spawned: knowing them again, signalling them
safely, reaping them, and saying why one died.

Owns the rules the process-based drivers (uml, qemu) share. A guest's
record (written by its driver) holds the VMM's `pid`, its start time
(`starttime`, field 22 of /proc/PID/stat), the launcher's `argv` and the
VMM's own argv (the launcher execs it under the same pid) under a key the
driver names. A process is the guest's only while its pid, start time and
command line all still match: a recycled pid is never taken for a guest,
and never signalled (a pidfd pins the process between the check and the
signal). The /proc readers and the pinned signal are soda.procid's, used
here and re-exported under their old names.

Also owns the table of children this Python process spawned, shared by
every driver instance in it (a fresh instance that adopts the guests must be
able to reap them too). It serves reaping and exit statuses only: whether a
guest runs is always read from /proc, never from this table. Children are
known by (pid, start time) there too: a dead child's status must never be
reported for a later process that got the same pid.
"""

from __future__ import annotations

import os
import subprocess
import threading

from soda.procid import DEAD_STATES, proc_cmdline, proc_starttime, proc_stat, signal_pinned

__all__ = ["track", "reap", "exit_status", "proc_stat", "proc_starttime", "proc_cmdline", "key",
           "Identity", "console_reason", "exit_reason"]

LOG_TAIL = 16 * 1024
EXITED_KEPT = 256

_children: dict[tuple[int, int | None], subprocess.Popen] = {}
_exited: dict[tuple[int, int | None], subprocess.Popen] = {}
_children_lock = threading.Lock()


# ---- children of this process --------------------------------------------------

def track(child: subprocess.Popen) -> None:
    """Remember a spawned VMM so that it is reaped and its status kept. Its
    start time is read now: until we reap it, its pid cannot be reused."""
    with _children_lock:
        _children[(child.pid, proc_starttime(child.pid))] = child


def reap() -> None:
    """Collect exited children so that none lingers as a zombie (a zombie's
    pid would still look taken)."""
    with _children_lock:
        for known, child in list(_children.items()):
            if child.poll() is not None:
                del _children[known]
                # Keep its status where exit_status() can still find it.
                _exited[known] = child
        while len(_exited) > EXITED_KEPT:
            _exited.pop(next(iter(_exited)))


def exit_status(pid: int, starttime: int, wait: float = 1.0) -> int | None:
    """The exit status of the VMM (`pid`, `starttime`) this process spawned
    and that has died (negative: killed by that signal); None if it is not
    our child. The caller knows it is dead, so a short blocking wait reaps
    it now rather than leave a zombie (poll() answers None while another
    thread waits on the same child)."""
    with _children_lock:
        child = _children.get((pid, starttime)) or _exited.get((pid, starttime))
    if child is None:
        return None
    try:
        return child.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        return None


# ---- /proc ------------------------------------------------------------------

def key(record: dict) -> tuple[int, int]:
    """What names one VMM process for good: (pid, start time)."""
    return record["pid"], record["starttime"]


# ---- identity ---------------------------------------------------------------

class Identity:
    """How a driver recognises its guests' processes; `argv_key` is the
    record's key for the VMM's own command line."""

    def __init__(self, argv_key: str):
        self.argv_key = argv_key

    def is_ours(self, pid: int, record: dict, helper: bool = False) -> bool:
        """Whether `pid` is a live process of the guest in `record`: the VMM
        itself (same start time; the VMM's command line, or the launcher's
        before its exec, or the empty one the kernel shows during the exec:
        the pid and its start time, to the clock tick, already say it is the
        same process), or with `helper`, a helper the VMM forked (in its
        session, started after it, the VMM's command line)."""
        fields = proc_stat(pid)
        if fields is None or fields[0] in DEAD_STATES:
            return False
        starttime = int(fields[19])
        if helper:
            if int(fields[3]) != record["pid"] or starttime < record["starttime"]:
                return False
        elif starttime != record["starttime"]:
            return False
        cmdline = proc_cmdline(pid)
        if cmdline == record[self.argv_key]:
            return True
        return not helper and (cmdline == record["argv"] or cmdline == [])

    def session_members(self, record: dict) -> list[int]:
        """The VMM's live helpers (not the VMM itself)."""
        members = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != record["pid"] and self.is_ours(
                    int(entry), record, helper=True):
                members.append(int(entry))
        return members

    def signal_if_ours(self, pid: int, record: dict, sig: int) -> bool:
        """Signal `pid` only if it is still the guest's process (the VMM, or
        one of its helpers)."""
        return signal_pinned(pid, lambda p: self.is_ours(p, record, helper=p != record["pid"]), sig)


# ---- why a guest died --------------------------------------------------------------

def console_reason(path: str, markers: tuple[str, ...]) -> str:
    """The last console line holding the most telling of `markers`."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - LOG_TAIL))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for marker in markers:
        for line in reversed(lines):
            if marker in line:
                return line.strip()[:300]
    return ""


def exit_reason(record: dict, console: str, markers: tuple[str, ...]) -> str:
    """Why the dead VMM of `record` ended: its exit status when this process
    spawned it, and the telling line of its console log."""
    pid = record["pid"]
    status = exit_status(*key(record))
    line = console_reason(console, markers)
    if status is not None:
        how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
        return f"{how}: {line}" if line else how
    if line:
        return line
    if os.path.exists(f"/proc/{pid}"):
        return "the VMM process is gone (its pid now belongs to another process)"
    return "the VMM process is gone"
