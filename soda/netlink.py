"""Netlink from long-lived SODA processes without ever forking.

Owns `NetlinkThread`: one thread that holds one pyroute2 `IPRoute` for one
network namespace and runs every call on it. (`soda.service.forbid_fork`
is the guard that makes a fork after start-up fail loudly.)

Why a thread of its own: pyroute2 keeps its socket and asyncio loop per
thread (a handle used from a second thread quietly opens a second socket),
and to reach another namespace it forks a helper — for the socket, and
again for every TAP it creates there. A fork in a process whose gRPC
threads are live can abort the child (`ev_epoll1_linux.cc ... Check
failed`), and pyroute2 then raises `RuntimeError: child process is dead`.
So the thread enters the namespace itself with setns(2) — which moves only
the calling thread — and opens a plain socket there; TAPs it creates
(TUNSETIFF on /dev/net/tun) are made in the thread's namespace too. Nothing
forks, whichever thread asks.

It also drops the kernel's answers that no request claims: pyroute2
(0.9) files a message whose sequence number no pending request owns under
its tag 0 and keeps it until someone reads broadcasts, which this socket
never joins. Every request the kernel acknowledges after pyroute2 has taken
its answer (a `link("get")`, so every `link_lookup`) leaves its 36-byte ACK
there, and each one kept pins a few KiB of heap (the 256 KiB receive buffer
it was cut from): a long-lived Agent or Daemon grew by about 6 KiB for
every usage report and 45 KiB for every 3-node create and delete.

Only this module, soda/routing.py, soda/agent/network.py and
soda/daemon/tc.py import pyroute2.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from pyroute2 import IPRoute

from soda.netns import enter_netns


class NetlinkThread:
    """One IPRoute in `netns` ("" = the process's own), used from one thread."""

    def __init__(self, netns: str = ""):
        self.netns = netns
        self._pool = ThreadPoolExecutor(max_workers=1,
                                        thread_name_prefix=f"netlink-{netns or 'host'}")
        try:
            self._ipr = self._pool.submit(self._open).result()
        except BaseException:
            self._pool.shutdown()
            raise

    def _open(self) -> IPRoute:
        if self.netns:
            enter_netns(self.netns)
        return IPRoute()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(ipr, *args, **kwargs) on the netlink thread; its result or exception."""
        return self._pool.submit(self._job, fn, *args, **kwargs).result()

    def _job(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self._ipr, *args, **kwargs)
        finally:
            # Between jobs no request is pending: whatever waits under tag 0
            # is an answer nobody will read.
            drop_unclaimed(self._ipr)

    def close(self) -> None:
        try:
            self._pool.submit(self._ipr.close).result()
        finally:
            self._pool.shutdown()


def unclaimed(ipr: IPRoute) -> Any:
    """pyroute2's queue of messages no request claimed (tag 0), or None
    where this pyroute2 keeps none."""
    queues = getattr(getattr(getattr(ipr, "asyncore", None), "msg_queue", None), "queues", None)
    return queues.get(0) if isinstance(queues, dict) else None


def drop_unclaimed(ipr: IPRoute) -> int:
    """Drop the messages no request claimed; how many there were. Only for
    a socket that joins no multicast group (broadcasts would land there too),
    on the thread that owns it, between requests."""
    queue = unclaimed(ipr)
    dropped = 0
    while queue is not None and not queue.empty():
        queue.get_nowait()
        queue.task_done()
        dropped += 1
    return dropped
