"""Readiness probes shared by the real hypervisor drivers.

Owns one thing: whether a TCP connect to a guest's service port succeeds,
made from inside the network namespace that holds the guest's TAP. It does
not know guests, records or drivers.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import threading
import time

from soda.errors import SodaError
from soda.netns import enter_netns

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 0.2
RESEND_SECONDS = 0.02


def probe_tcp(address: str, port: int, netns: str = "", timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connect to address:port succeeds, from inside network
    namespace `netns` when given. setns() moves only the calling thread, so
    the probe runs in a short-lived thread of its own."""
    if not netns:
        return _connect(address, port, timeout)
    result = [False]

    def run() -> None:
        try:
            enter_netns(netns)
        except (SodaError, OSError) as exc:
            log.debug("probe cannot enter %s: %s", netns, exc)
            return
        result[0] = _connect(address, port, timeout)

    thread = threading.Thread(target=run, name=f"probe-{netns}", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return result[0]


def _connect(address: str, port: int, timeout: float) -> bool:
    """Whether a TCP connect succeeds within `timeout`, sending a fresh SYN
    every RESEND_SECONDS meanwhile. A SYN that reaches a guest whose network
    is not up yet is lost without an answer, and the kernel would resend it
    only after a second; one attempt with a 0.2 s timeout made readiness
    jump in steps of 0.2 s. A refused connect (the guest is up, its service
    is not listening yet) answers False at once."""
    deadline = time.monotonic() + timeout
    attempts: list[socket.socket] = []
    try:
        with selectors.DefaultSelector() as selector:
            next_attempt = 0.0
            while True:
                now = time.monotonic()
                if now >= deadline:
                    return False
                if now >= next_attempt:
                    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                                         socket.SOCK_STREAM)
                    attempts.append(sock)
                    sock.setblocking(False)
                    err = sock.connect_ex((address, port))
                    if err == 0:
                        return True
                    if err not in (errno.EINPROGRESS, errno.EAGAIN):
                        return False
                    selector.register(sock, selectors.EVENT_WRITE)
                    next_attempt = now + RESEND_SECONDS
                wait = max(0.0, min(deadline, next_attempt) - time.monotonic())
                for key, _ in selector.select(wait):
                    err = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err == 0:
                        return True
                    if err == errno.ECONNREFUSED:
                        return False
                    selector.unregister(key.fileobj)    # e.g. unreachable: the next one may work
    finally:
        for sock in attempts:
            sock.close()
