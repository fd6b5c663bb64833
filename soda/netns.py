"""Entering a network namespace from one thread, without forking.

Owns `enter_netns`: setns(2) on a named namespace (`ip netns` keeps them
under /run/netns). setns moves only the calling thread, so a thread made
for the purpose can work inside a guest network while the rest of the
process stays where it is, and nothing forks. Used by the netlink thread
(soda.netlink) and the guests' readiness probe.
"""

from __future__ import annotations

import ctypes
import os

from soda import errors

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc_handle = None


def _libc():
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = ctypes.CDLL(None, use_errno=True)
    return _libc_handle


def enter_netns(netns: str) -> None:
    """Move the calling thread (only it) into network namespace `netns`.
    Raises NotFound when it does not exist, OSError when setns fails."""
    try:
        fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise errors.NotFound(f"network namespace {netns} does not exist") from None
    try:
        if _libc().setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def netns_preexec(netns: str):
    """A subprocess pre-exec hook that moves the child into `netns`: the
    child is single-threaded then, so setns moves all of it (unlike `ip
    netns exec`, it leaves the mounts alone, /sys/fs/cgroup included). libc
    is loaded here, before the fork, not in the child."""
    _libc()

    def hook() -> None:
        enter_netns(netns)
    return hook
