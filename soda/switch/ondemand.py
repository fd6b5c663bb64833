"""Deploy on first request (Dynasoar), the Switch's side.

Owns, for every service whose EndpointSet carries `on_demand`:
- holding a client connection that finds no ready virtual node while the
  Master is asked for one — once per service, however many connections
  wait (single flight) — and letting the held connections go as soon as a
  virtual node is ready and accepts connections (or the hold times out, or
  the Master refuses: the proxy then closes them as it does for any service
  without a node);
- asking the Master for zero virtual nodes once the service has had no
  connection for `on_demand.idle_seconds`. From the moment it decides, new
  connections are held rather than sent to the nodes being released; when
  the release is done they ask for a node again, so no connection is lost
  to the race. Not for `mode: l4` services: once a node is ready the kernel
  forwards their connections and this Switch cannot see them.

It sits between EndpointSync and the Proxy: it is the sync's target and
passes every EndpointSet on, and the proxy awaits `hold()` before it picks
a virtual node. The Master is reached through a client with blocking
`ensure_nodes(name)` and `release_nodes(name)` (MasterClient), called in a
worker thread; no grpc here, and no balancing: the proxy's Balancer says
which virtual nodes are routable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from soda.errors import SodaError, TemporaryError
from soda.model.spec import DEFAULT_SWITCH_MODE, HealthCheck, OnDemand
from soda.model.switching import Endpoint, EndpointSet
from soda.switch.health import tcp_probe

log = logging.getLogger("soda.switch.ondemand")

HOLD_SECONDS = 30.0
# How often a bring-up looks again for a ready node that accepts connections
# (besides being woken by every endpoint update).
PROBE_INTERVAL = 0.05
# The Master could not be reached: ask again after this long.
RETRY_SECONDS = 0.5
# How often idleness is checked at most (a service's own idle_seconds / 4 if smaller).
IDLE_TICK = 1.0


@dataclass
class _State:
    on_demand: OnDemand
    last_used: float
    vnodes: frozenset[str] = frozenset()    # every endpoint the Master lists, ready or not
    # Those not kept frozen (a warm pool's guests are idle already: they
    # neither count as in use nor are released again).
    active: frozenset[str] = frozenset()
    released: set[str] = field(default_factory=set)   # asked away: held connections must not go there
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    bring_up: asyncio.Task | None = None
    release: asyncio.Task | None = None
    held: int = 0
    error: str = ""                         # why the last bring-up was refused
    # Mode l4: once a node is ready the kernel path forwards new connections
    # and this Switch cannot see them, so it does not send the service back
    # to zero (that could cut connections it never saw).
    kernel_path: bool = False


class OnDemandSwitch:
    """Hold, ask once, release when idle; for the services deployed on demand."""

    def __init__(self, target: Any, master: Any, *, connections: Callable[[str], int],
                 hold_seconds: float = HOLD_SECONDS, connect_timeout: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self.target = target                # the Proxy: apply(es), remove(name)
        self.master = master                # ensure_nodes(name), release_nodes(name)
        self.connections = connections      # open client connections of a service, held ones too
        self.hold_seconds = hold_seconds
        self.connect_timeout = connect_timeout
        self.clock = clock
        self._states: dict[str, _State] = {}
        self._idle_task: asyncio.Task | None = None
        self.asked = 0                      # ensure_nodes calls made (for tests and logs)

    # ---- the EndpointSync target --------------------------------------
    async def apply(self, es: EndpointSet) -> None:
        st = None
        if es.deleted or es.on_demand is None:
            self._forget(es.service)
        else:
            now = self.clock()
            st = self._states.get(es.service)
            if st is None:
                st = self._states[es.service] = _State(on_demand=es.on_demand, last_used=now)
            st.on_demand = es.on_demand
            kernel_path = es.switch.mode != DEFAULT_SWITCH_MODE
            if kernel_path and not st.kernel_path:
                log.info("service %s: mode %s: deployed on first request, but not sent back to zero "
                         "when idle (the kernel forwards connections this Switch does not see); "
                         "`sodactl service resize %s --nodes 0` does it", es.service, es.switch.mode,
                         es.service)
            st.kernel_path = kernel_path
            names = frozenset(e.vnode for e in es.endpoints)
            active = frozenset(e.vnode for e in es.endpoints if not e.frozen)
            if active and not st.active:
                st.last_used = now          # idleness counts from when a node is in use
            st.vnodes, st.active = names, active
            st.released &= names
        await self.target.apply(es)
        if st is not None:
            self._wake(st)

    async def remove(self, name: str) -> None:
        self._forget(name)
        await self.target.remove(name)

    def _forget(self, name: str) -> None:
        st = self._states.pop(name, None)
        if st is not None:
            for task in (st.bring_up, st.release):
                if task is not None:
                    task.cancel()
            self._wake(st)

    @staticmethod
    def _wake(st: _State) -> None:
        st.changed.set()
        st.changed = asyncio.Event()

    # ---- the proxy's hook ---------------------------------------------
    async def hold(self, name: str, balancer: Any) -> None:
        """Return when a new connection of service `name` may be routed:
        at once unless the service is deployed on demand and has no ready
        node (or is being released); otherwise once a node is ready, the
        Master refused, or `hold_seconds` passed."""
        st = self._states.get(name)
        if st is None:
            return
        st.last_used = self.clock()
        if st.bring_up is None and st.release is None and self._routable(st, balancer):
            return
        deadline = st.last_used + self.hold_seconds
        st.held += 1
        try:
            while (left := deadline - self.clock()) > 0 and self._states.get(name) is st:
                if st.release is not None:
                    # Ask again once the release is through (next turn of the loop).
                    await asyncio.wait({st.release}, timeout=left)
                    continue
                if st.bring_up is None:
                    if self._routable(st, balancer):
                        return
                    st.bring_up = _spawn(self._bring_up(name, st, balancer))
                task = st.bring_up
                await asyncio.wait({task}, timeout=left)
                # Out of time, service gone, bug (logged by _spawn): the proxy decides.
                if not task.done() or task.cancelled() or task.exception() is not None:
                    return
                if task.result() or st.error:
                    return
        finally:
            st.held -= 1
            st.last_used = self.clock()

    def _routable(self, st: _State, balancer: Any) -> list[Endpoint]:
        return [e for e in balancer.endpoints if e.vnode not in st.released]

    async def _bring_up(self, name: str, st: _State, balancer: Any) -> bool:
        """Ask the Master once, then wait until a node is ready and accepts
        a connection. False when the Master refused or time ran out."""
        loop = asyncio.get_running_loop()
        started = self.clock()
        deadline = started + self.hold_seconds
        st.error = ""
        asked = False
        try:
            while self.clock() < deadline:
                if not asked:
                    try:
                        self.asked += 1
                        service = await loop.run_in_executor(None, self.master.ensure_nodes, name)
                    except TemporaryError as exc:
                        log.warning("service %s: cannot ask the Master for a node: %s; retrying", name, exc)
                        await asyncio.sleep(RETRY_SECONDS)
                        continue
                    except SodaError as exc:
                        st.error = str(exc)
                        log.error("service %s: the Master gave no node on demand: %s", name, exc)
                        return False
                    asked = True
                    # A new node may reuse the name of one released earlier.
                    st.released -= {v.name for v in service.vnodes if not v.deleting}
                    log.info("service %s: connection held, asked the Master for a node (%d held)",
                             name, st.held)
                for endpoint in self._routable(st, balancer):
                    if await self._accepts(endpoint):
                        log.info("service %s: %s ready on demand after %.2f s; releasing %d held "
                                 "connection(s)", name, endpoint.vnode, self.clock() - started, st.held)
                        return True
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(st.changed.wait(), PROBE_INTERVAL)
            log.warning("service %s: no node ready on demand within %g s", name, self.hold_seconds)
            return False
        finally:
            if st.bring_up is asyncio.current_task():
                st.bring_up = None

    async def _accepts(self, endpoint: Endpoint) -> bool:
        """A guest reports ready as its init starts the server: the first
        connection could beat the listener. Held connections go only once
        the node takes one."""
        return await tcp_probe(endpoint, HealthCheck(kind="tcp", timeout=self.connect_timeout))

    # ---- back to zero ----------------------------------------------------
    def start(self) -> None:
        self._idle_task = asyncio.get_running_loop().create_task(self._idle_loop(), name="ondemand-idle")

    async def stop(self) -> None:
        tasks = [self._idle_task] + [t for st in self._states.values() for t in (st.bring_up, st.release)]
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
        self._idle_task = None

    async def _idle_loop(self) -> None:
        while True:
            tick = min([IDLE_TICK] + [st.on_demand.idle_seconds / 4 for st in self._states.values()])
            await asyncio.sleep(tick)
            self.check_idle()

    def check_idle(self) -> None:
        """Ask for zero for every on-demand service idle for its idle_seconds."""
        now = self.clock()
        for name, st in self._states.items():
            if (st.bring_up is not None or st.release is not None or st.kernel_path
                    or not st.active - st.released):
                continue
            if st.held or self.connections(name):
                st.last_used = now
            elif now - st.last_used >= st.on_demand.idle_seconds:
                st.release = _spawn(self._release(name, st))

    async def _release(self, name: str, st: _State) -> None:
        # From here on new connections are held, not sent to these nodes.
        releasing = st.active - st.released
        st.released |= releasing
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.master.release_nodes, name)
            log.info("service %s: no connection for %g s: asked the Master for zero nodes (%s)",
                     name, st.on_demand.idle_seconds, ", ".join(sorted(releasing)))
        except SodaError as exc:
            st.released -= releasing        # they still run: route to them again
            log.warning("service %s: cannot release its idle nodes: %s", name, exc)
        finally:
            st.release = None
            st.last_used = self.clock()
            self._wake(st)

    # ---- introspection -------------------------------------------------
    def services(self) -> dict[str, dict]:
        return {name: {"vnodes": sorted(st.vnodes), "released": sorted(st.released), "held": st.held,
                       "bringing_up": st.bring_up is not None, "releasing": st.release is not None,
                       "error": st.error}
                for name, st in self._states.items()}


def _spawn(coro) -> asyncio.Task:
    task = asyncio.get_running_loop().create_task(coro)
    task.add_done_callback(_log_failure)
    return task


def _log_failure(task: asyncio.Task) -> None:
    # Routing goes on whatever a bring-up or release does; a bug is logged.
    if not task.cancelled() and task.exception() is not None:
        log.error("on-demand task failed", exc_info=task.exception())


def attach(proxy: Any, master: Any, *, hold_seconds: float = HOLD_SECONDS) -> OnDemandSwitch:
    """An OnDemandSwitch in front of `proxy`, hooked into its connections."""
    def connections(name: str) -> int:
        return proxy.services().get(name, {}).get("connections", 0)
    ondemand = OnDemandSwitch(proxy, master, connections=connections, hold_seconds=hold_seconds,
                              connect_timeout=proxy.connect_timeout)
    proxy.hold = ondemand.hold
    return ondemand
