"""What virtual nodes use, as their node's Daemon measures it: one
`VnodeUsage` per fenced guest, and the `Usage` part of it that travels on
to the Master and is summed per node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

@dataclass(frozen=True)
class Usage:
    """What a virtual node has used, as its node's Daemon measured it:
    cumulative counters (CPU, traffic, throttling, OOM kills) and memory now
    and at its peak. `bytes_in` is traffic to the guest, `bytes_out` from it.
    Summing gives a physical node's totals."""
    cpu_seconds: float = 0.0
    memory_bytes: int = 0
    memory_peak_bytes: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    throttled_seconds: float = 0.0
    oom_kills: int = 0
    # What the node refused the guest: packets its guard and policy dropped
    # (soda.agent.policy: spoofed, or to where it may not go), and forks
    # refused at its pids limit.
    packets_refused: int = 0
    pids_refused: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(**{f: getattr(self, f) + getattr(other, f) for f in USAGE_FIELDS})

    @staticmethod
    def total(usages: Iterable["Usage | None"]) -> "Usage | None":
        """The sum of those that are known; None when none is."""
        known = [u for u in usages if u is not None]
        if not known:
            return None
        out = Usage()
        for u in known:
            out = out + u
        return out


USAGE_FIELDS = ("cpu_seconds", "memory_bytes", "memory_peak_bytes", "bytes_in", "bytes_out",
                "throttled_seconds", "oom_kills", "packets_refused", "pids_refused")


@dataclass(frozen=True)
class VnodeUsage:
    """What a node's Daemon measures of one virtual node: its cgroup's
    counters and its TAP's traffic ("to_guest" is what the guest received).
    `usage()` is the part of it the Agent reports to the Master."""
    name: str
    cpu_seconds: float = 0.0
    cpu_throttled_seconds: float = 0.0
    memory_bytes: int = 0
    memory_peak_bytes: int = 0
    memory_limit_bytes: int = 0
    memory_failcnt: int = 0
    oom_kills: int = 0
    pids: int = 0
    pids_refused: int = 0           # forks refused at pids.max (pids.events "max")
    bytes_to_guest: int = 0
    bytes_from_guest: int = 0
    drops_to_guest: int = 0
    drops_from_guest: int = 0

    def usage(self) -> Usage:
        return Usage(cpu_seconds=self.cpu_seconds, memory_bytes=self.memory_bytes,
                     memory_peak_bytes=self.memory_peak_bytes, bytes_in=self.bytes_to_guest,
                     bytes_out=self.bytes_from_guest, throttled_seconds=self.cpu_throttled_seconds,
                     oom_kills=self.oom_kills, pids_refused=self.pids_refused)
