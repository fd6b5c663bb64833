"""Readiness probes shared by the real hypervisor drivers.

Owns one thing: whether a TCP connect to a guest's service port succeeds,
made from inside the network namespace that holds the guest's TAP. It does
not know guests, records or drivers.
"""

from __future__ import annotations

import logging
import socket
import threading

from soda.errors import SodaError
from soda.netns import enter_netns

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 0.2


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
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False
