"""Keeping a local cluster's processes running, as systemd's
`Restart=on-failure` would: a part that dies of a failure is started again
after a delay that doubles from `first_delay` up to `max_delay`; a part
restarted `burst` times within `interval` seconds is given up (systemd's
StartLimitBurst / StartLimitIntervalSec) and stays FAILED; a clean exit
(status 0, or SIGHUP/SIGINT/SIGTERM/SIGPIPE, as systemd counts them) is not
restarted.

Owns only that decision, over handles that look like subprocess.Popen
(`pid`, `poll()`), with the spawner and the clock injected, so it is tested
with fake processes and a fake clock. It must not read /proc, signal
anything or wait: the caller steps it, spawns for it and records what it
reports.
"""

from __future__ import annotations

import collections
import dataclasses
import signal
import time
from typing import Any, Callable, Protocol

RUNNING = "running"         # started, not seen dead
RESTARTING = "restarting"   # died of a failure, waiting out its delay
FAILED = "failed"           # hit the start limit: given up
EXITED = "exited"           # ended cleanly: not restarted (on-failure)
STOPPED = "stopped"         # not started, or stopped on purpose

# Deaths systemd's Restart=on-failure counts as clean (besides exit 0).
CLEAN_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})


class Handle(Protocol):
    pid: int

    def poll(self) -> int | None: ...


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    first_delay: float = 0.2      # systemd's RestartSec
    factor: float = 2.0
    max_delay: float = 5.0        # systemd's RestartMaxDelaySec
    burst: int = 5                # StartLimitBurst: restarts allowed ...
    interval: float = 30.0        # ... within StartLimitIntervalSec
    stable_after: float = 10.0    # a run this long starts the next delay from first_delay again


def describe_exit(status: int | None) -> str:
    """A wait status as people read it (Popen's convention: negative = signal)."""
    if status is None:
        return "exit status unknown"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"killed by signal {-status} ({name})"
    return f"exited with status {status}"


def is_clean_exit(status: int | None) -> bool:
    return status == 0 or (status is not None and status < 0 and -status in CLEAN_SIGNALS)


@dataclasses.dataclass
class PartState:
    name: str
    state: str = STOPPED
    handle: Any = None
    started_at: float | None = None           # supervisor clock
    restarts: int = 0
    delay: float = 0.0                        # the delay before the next restart
    next_start: float | None = None
    last_exit: int | None = None
    last_exit_at: float | None = None
    reason: str = ""                          # why it is not running, in words
    recent: collections.deque = dataclasses.field(default_factory=collections.deque)

    @property
    def pid(self) -> int | None:
        return None if self.handle is None else self.handle.pid


Notify = Callable[[PartState, str], None]


class Supervisor:
    """Parts by name; `spawn(name)` starts one and returns its handle (or
    raises OSError); `notify(part, message)` hears every change, in words."""

    def __init__(self, spawn: Callable[[str], Handle], policy: RestartPolicy = RestartPolicy(),
                 clock: Callable[[], float] = time.monotonic, notify: Notify | None = None):
        self._spawn = spawn
        self.policy = policy
        self._clock = clock
        self._notify = notify or (lambda part, message: None)
        self.parts: dict[str, PartState] = {}

    def start(self, name: str) -> PartState:
        """The first start of `name` (the caller waits for it to be ready);
        a spawn error is raised, not retried."""
        part = self.parts.setdefault(name, PartState(name, delay=self.policy.first_delay))
        part.handle = self._spawn(name)
        part.state, part.started_at, part.reason = RUNNING, self._clock(), ""
        self._notify(part, f"{name} started as pid {part.pid}")
        return part

    def step(self) -> float | None:
        """Notice deaths and make due restarts. Seconds until a restart is
        due (None: none is pending; deaths are only seen by polling)."""
        now = self._clock()
        for part in self.parts.values():
            if part.state == RUNNING:
                status = part.handle.poll()
                if status is not None:
                    self._died(part, status, describe_exit(status), now)
            if part.state == RESTARTING and now >= part.next_start:
                self._restart(part, now)
        waits = [p.next_start - now for p in self.parts.values() if p.state == RESTARTING]
        return max(0.0, min(waits)) if waits else None

    def stop(self, name: str) -> None:
        """Stop supervising `name` (the caller stops the process itself)."""
        part = self.parts.get(name)
        if part is not None:
            part.state, part.next_start, part.reason = STOPPED, None, "stopped on purpose"

    # ---- the decision ------------------------------------------------------
    def _died(self, part: PartState, status: int | None, how: str, now: float) -> None:
        was = f"{part.name} (pid {part.pid})" if part.handle is not None else part.name
        part.last_exit, part.last_exit_at = status, now
        if status is not None and is_clean_exit(status):
            part.state, part.reason = EXITED, f"{how}: a clean exit, not restarted"
            self._notify(part, f"{was} {part.reason}")
            return
        if part.started_at is not None and now - part.started_at >= self.policy.stable_after:
            part.delay = self.policy.first_delay
        while part.recent and now - part.recent[0] > self.policy.interval:
            part.recent.popleft()
        if len(part.recent) >= self.policy.burst:
            part.state, part.next_start = FAILED, None
            part.reason = (f"{how}; restarted {len(part.recent)} times within "
                           f"{self.policy.interval:g} s: given up")
            self._notify(part, f"{was} died: {part.reason}")
            return
        part.state, part.next_start = RESTARTING, now + part.delay
        part.reason = f"{how}; restarting in {part.delay:.1f} s"
        self._notify(part, f"{was} died: {part.reason}")
        part.delay = min(part.delay * self.policy.factor, self.policy.max_delay)

    def _restart(self, part: PartState, now: float) -> None:
        part.recent.append(now)
        part.restarts += 1
        part.started_at = now
        try:
            part.handle = self._spawn(part.name)
        except OSError as exc:
            part.handle = None
            self._died(part, None, f"could not be started: {exc}", now)
            return
        part.state, part.next_start, part.reason = RUNNING, None, ""
        self._notify(part, f"{part.name} started again as pid {part.pid} (restart {part.restarts})")
