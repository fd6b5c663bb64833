"""Readiness probes shared by the real hypervisor drivers.

Owns one thing: whether a TCP connect to a guest's service port succeeds,
made from inside the network namespace that holds the guest's TAP. It does
not know guests, records or drivers.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
PROBE_TIMEOUT = 0.2

_libc_handle = None


def _libc():
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def probe_tcp(address: str, port: int, netns: str = "", timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether a TCP connect to address:port succeeds, from inside network
    namespace `netns` when given. setns() moves only the calling thread, so
    the probe runs in a short-lived thread of its own."""
    if not netns:
        return _connect(address, port, timeout)
    result = [False]

    def run() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if _libc().setns(fd, CLONE_NEWNET) != 0:
                log.debug("setns(%s): %s", netns, os.strerror(ctypes.get_errno()))
                return
        finally:
            os.close(fd)
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
