"""Daemon lifecycle shared by soda-master, soda-agent, soda-daemon, soda-switch:
exit codes, logging to stderr, systemd readiness (sd_notify) and liveness
(`Heartbeat`, `Watchdog`: WATCHDOG=1 only while every loop of the daemon
ticks), graceful stop on SIGTERM, and the ban on forking once gRPC threads
may be alive (`forbid_fork`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterable, TypeVar

from soda.errors import InvalidSpec, SodaError

T = TypeVar("T")

EXIT_FAILURE = 1      # it could not start, or stopped on an error
EXIT_USAGE = 2        # bad flags or config: nothing was started

# How often a daemon's main loop ticks its heartbeat, and how stale the
# heartbeat may grow before the watchdog stops vouching for the daemon.
MAIN_LOOP_TICK_SECONDS = 1.0
MAIN_LOOP_MAX_AGE_SECONDS = 10.0
# A test hook, only where this variable is set to 1 (a unit's drop-in in
# the node VM tests): SIGUSR2 hangs the daemon's main loop for good, so that
# the watchdog, not a crash, must bring it back.
HANG_HOOK_ENV = "SODA_TEST_HANG_ON_SIGUSR2"


def refuse(program: str, reason: object, code: int = EXIT_USAGE) -> int:
    """Say on one line why `program` does not run; the exit code to return."""
    print(f"{program}: {reason}", file=sys.stderr)
    return code


def configure(program: str, load: Callable[[], T]) -> T | None:
    """The config `load` builds (soda.config.effective), with logging set
    up for `program`; None once it has said on one line why the config is
    refused (the daemon then exits EXIT_USAGE, having started nothing)."""
    try:
        config = load()
    except InvalidSpec as exc:
        refuse(program, exc)
        return None
    setup_logging(getattr(config, "log_level", "INFO"), program)
    return config


def serve_grpc(program: str, make_server: Callable[[], Any], no_fork: str = "") -> int:
    """A gRPC daemon's life once configured: make its server (a failure is
    said on one line: EXIT_FAILURE), ban forks when `no_fork` says why
    (forbid_fork), serve until SIGTERM/SIGINT."""
    stop = stop_event_on_signals()
    install_hang_hook()
    try:
        server = make_server()
    except (SodaError, OSError) as exc:
        return refuse(program, exc, EXIT_FAILURE)
    if no_fork:
        forbid_fork(no_fork)
    return serve_until_stopped(server, stop)


def setup_logging(level: str = "INFO", name: str = "soda") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(name)s: %(message)s")


def sd_notify(state: str) -> bool:
    """Tell systemd our state (e.g. "READY=1"); a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(addr)
            sock.sendall(state.encode())
        except OSError:
            return False
    return True


def stop_event_on_signals() -> threading.Event:
    """An Event set by SIGTERM or SIGINT, for a main loop to wait on."""
    stop = threading.Event()

    def handler(signum, frame):
        logging.getLogger("soda").info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def serve_until_stopped(server, stop: threading.Event) -> int:
    """Start `server` (anything with start() and stop(), and optionally
    `heartbeats`, its own loops' Heartbeats), tell systemd we are ready,
    tick the main loop's heartbeat until SIGTERM/SIGINT, stop gracefully.
    The exit status."""
    server.start()
    main_loop = Heartbeat("main loop")
    watchdog = Watchdog.from_environment([main_loop, *getattr(server, "heartbeats", ())])
    sd_notify("READY=1")
    run_main_loop(main_loop, stop)
    sd_notify("STOPPING=1")
    if watchdog is not None:
        watchdog.stop()
    server.stop()
    logging.getLogger("soda").info("stopped")
    return 0


def run_main_loop(heartbeat: "Heartbeat", stop: threading.Event) -> None:
    """The main thread of a threaded daemon: tick `heartbeat` until `stop`
    (signal handlers run here, between ticks)."""
    while not stop.wait(MAIN_LOOP_TICK_SECONDS):
        heartbeat.tick()


class Heartbeat:
    """When one loop of a daemon last went round. A loop that waits for
    work must still tick at least every `max_age` seconds."""

    def __init__(self, name: str, max_age: float = MAIN_LOOP_MAX_AGE_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.max_age = max_age
        self._clock = clock
        self._last = clock()

    def tick(self) -> None:
        self._last = self._clock()

    def age(self) -> float:
        return self._clock() - self._last

    def stale(self) -> bool:
        return self.age() > self.max_age


def watchdog_interval(environ: dict | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half systemd's WatchdogSec=, as
    sd_watchdog_enabled(3) advises); None when systemd expects none from
    this process."""
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if usec <= 0 or (owner and owner != str(os.getpid() if pid is None else pid)):
        return None
    return usec / 2e6


class Watchdog:
    """Pings systemd's watchdog from a thread of its own, but only while
    every heartbeat is fresh: a daemon whose main loop (or any loop it
    vouches for) hangs stops pinging and is killed and restarted by
    systemd, where a thread that pinged blindly would keep it "alive"."""

    def __init__(self, heartbeats: Iterable[Heartbeat], interval: float,
                 notify: Callable[[str], bool] = sd_notify):
        self.heartbeats = tuple(heartbeats)
        self.interval = interval
        self._notify = notify
        self._stop = threading.Event()
        self._stale: tuple[str, ...] = ()
        self._thread = threading.Thread(target=self._run, name="soda-watchdog", daemon=True)

    @classmethod
    def from_environment(cls, heartbeats: Iterable[Heartbeat]) -> "Watchdog | None":
        """A started Watchdog when systemd asked for one, else None."""
        interval = watchdog_interval()
        if interval is None:
            return None
        watchdog = cls(heartbeats, interval)
        watchdog.start()
        return watchdog

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + 1.0)

    def check(self) -> bool:
        """Ping if every heartbeat is fresh; say once which one went stale."""
        stale = tuple(h.name for h in self.heartbeats if h.stale())
        if stale and stale != self._stale:
            logging.getLogger("soda").error(
                "%s not ticking (%s): no watchdog ping, systemd will restart this daemon",
                ", ".join(stale), ", ".join(f"{h.age():.0f}s" for h in self.heartbeats if h.stale()))
        self._stale = stale
        if stale:
            return False
        self._notify("WATCHDOG=1")
        return True

    def _run(self) -> None:
        while True:
            self.check()
            if self._stop.wait(self.interval):
                return


def _hang(signum=None, frame=None) -> None:
    logging.getLogger("soda").warning("%s: hanging the main loop (test hook)", HANG_HOOK_ENV)
    while True:
        time.sleep(3600)


def install_hang_hook(add_signal_handler: Callable[[int, Callable], Any] | None = None) -> bool:
    """With SODA_TEST_HANG_ON_SIGUSR2=1 in the environment, SIGUSR2 hangs the
    main loop (the thread or event loop that runs signal handlers). True if
    installed. `add_signal_handler`: an asyncio loop's, for the Switch."""
    if os.environ.get(HANG_HOOK_ENV) != "1":
        return False
    if add_signal_handler is None:
        signal.signal(signal.SIGUSR2, _hang)
    else:
        add_signal_handler(signal.SIGUSR2, _hang)
    return True


class ForkForbidden(RuntimeError):
    """A fork was attempted after the process declared it must not fork."""


_real_fork = os.fork


def forbid_fork(why: str) -> Callable[[], None]:
    """From now on os.fork() raises ForkForbidden (naming `why`) instead of
    forking. A fork that runs Python code in the child (pyroute2 entering a
    namespace, multiprocessing) is what aborts a process with live gRPC
    threads; spawning a program (subprocess forks and execs in C, without
    os.fork) is not affected. Returns a function that lifts the ban (tests)."""

    def refuse() -> int:
        raise ForkForbidden(f"fork() refused: {why}")

    os.fork = refuse

    def allow() -> None:
        os.fork = _real_fork

    return allow
