"""Daemon lifecycle shared by soda-master, soda-agent, soda-daemon, soda-switch:
logging to stderr, systemd readiness (sd_notify), graceful stop on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading


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
