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

Only this module, soda/agent/network.py and soda/daemon/tc.py import
pyroute2.
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
        return self._pool.submit(fn, self._ipr, *args, **kwargs).result()

    def close(self) -> None:
        try:
            self._pool.submit(self._ipr.close).result()
        finally:
            self._pool.shutdown()
