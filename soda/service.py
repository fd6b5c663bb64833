"""Daemon lifecycle shared by soda-master, soda-agent, soda-daemon, soda-switch:
exit codes, logging to stderr, systemd readiness (sd_notify), graceful stop
on SIGTERM, and the ban on forking once gRPC threads may be alive
(`forbid_fork`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from typing import Any, Callable, TypeVar

from soda.errors import InvalidSpec, SodaError

T = TypeVar("T")

EXIT_FAILURE = 1      # it could not start, or stopped on an error
EXIT_USAGE = 2        # bad flags or config: nothing was started


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
    """Start `server` (anything with start() and stop()), tell systemd we
    are ready, wait for SIGTERM/SIGINT, stop gracefully. The exit status."""
    server.start()
    sd_notify("READY=1")
    stop.wait()
    sd_notify("STOPPING=1")
    server.stop()
    logging.getLogger("soda").info("stopped")
    return 0


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
