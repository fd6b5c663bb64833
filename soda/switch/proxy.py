"""The Switch's userspace data path: an asyncio TCP proxy, one listener per service.

Owns the listening sockets and the relayed connections. For each client
connection it asks the service's Balancer for a ready virtual node, connects
to it (on failure: marks it failed and tries one other virtual node before
giving up on the client), then relays bytes both ways with flow control and
correct half-close until both sides are done.

`Proxy.apply(EndpointSet)` is the only way in: it creates, updates, rebinds or
removes a service's listener live. Removing a service or a virtual node
drains: the listener closes (or the node gets no new connections) and the
connections already relayed run to their end. A listen address that cannot
be bound is logged for that service alone and retried.

Health: a HealthMonitor (health.py) checks every service's ready virtual
nodes; the proxy subscribes to it and the Balancer skips unhealthy nodes.
A failed connect is reported to it (passive detection), besides being
retried on another node. A virtual node that leaves the endpoint set, or a
service that is removed, drains: no new connections, and the connections
still open are cut after the service's `switch.drain_seconds`.
Per virtual node counters (metrics.py) are bumped by the relays themselves.

Runs on one event loop (uvloop when main.py installs it); it knows nothing
of the Master or grpc. Relays are asyncio Protocols rather than streams:
no task or coroutine per chunk, which is what keeps a Python relay near
half of direct throughput (measured with wrk against nginx).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Collection

from soda.addresses import split_host_port
from soda.errors import InvalidSpec
from soda.model.spec import DEFAULT_POLICY, SwitchSpec
from soda.model.switching import Endpoint, EndpointSet
from soda.switch.balancer import Balancer
from soda.switch.health import HealthMonitor
from soda.switch.metrics import ServiceView, VnodeStats, VnodeView

log = logging.getLogger("soda.switch.proxy")

CONNECT_TIMEOUT = 2.0
# Passive health: a virtual node that refused or timed out a connect gets no
# new connections for this long (unless it is the only one left).
FAIL_TIMEOUT = 5.0
BIND_RETRY_SECONDS = 5.0
LISTEN_BACKLOG = 1024
# Tries per client connection: the chosen virtual node and, if its connect
# fails, one other (passive failover).
CONNECT_ATTEMPTS = 2
# A request a virtual node took but never answered is sent again to another
# node when that node is found dead (its health checks fail, or it resets the
# connection) -- only while no byte of an answer came back, only for requests
# that start with an idempotent HTTP method, and only up to this many bytes.
REPLAY_LIMIT = 64 << 10
# Seconds a new connection waits for a moving service's replacement guest.
MOVE_HOLD_SECONDS = 30.0
REPLAYABLE = (b"GET ", b"HEAD ", b"OPTIONS ")


@dataclass
class ServiceStats:
    accepted: int = 0           # client connections taken
    relayed: int = 0            # ... that reached a virtual node
    failovers: int = 0          # ... that reached one after a failed connect
    refused: int = 0            # ... closed at once: no virtual node reachable
    connect_failures: int = 0   # failed connects to virtual nodes
    redispatched: int = 0       # unanswered requests sent again to another node
    vnodes: dict[str, VnodeStats] = field(default_factory=dict)

    def vnode(self, name: str) -> VnodeStats:
        stats = self.vnodes.get(name)
        if stats is None:
            stats = self.vnodes[name] = VnodeStats()
        return stats

    @property
    def per_endpoint(self) -> dict[str, int]:
        """vnode -> connections relayed to it."""
        return {name: s.total for name, s in self.vnodes.items() if s.total}


class _Half(asyncio.Protocol):
    """One socket of a relayed connection; forwards what it reads to its peer."""

    def __init__(self, relay: "_Relay", held: list[bytes] | None = None):
        self.relay = relay
        self.peer: _Half | None = None
        self.transport: asyncio.Transport | None = None
        # Not None while what we read must wait (the client's bytes until the
        # upstream is connected); kept in order and sent first.
        self.held = held
        self.eof = False
        self.lost = False
        # The virtual node's counters once connected; `upstream` halves count
        # bytes out (from the node) and time the first of them.
        self.meter: VnodeStats | None = None
        self.upstream = False
        self.first_byte = True

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.relay.made(self)

    def data_received(self, data: bytes) -> None:
        if self.held is None:
            self.peer.transport.write(data)
            if self.upstream:
                if self.first_byte:
                    self.first_byte = False
                    self.relay.answered(self.meter)
                self.meter.bytes_out += len(data)
            else:
                if self.meter is not None:
                    self.meter.bytes_in += len(data)
                if self.relay.replay is not None:
                    self.relay.keep(data)
        else:
            # uvloop starts reading after connection_made whatever it asked for.
            self.held.append(data)
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self.relay.half_eof(self)
        return True             # keep our write side open: half-close

    # Our outgoing buffer is full: stop reading from the peer until it drains.
    def pause_writing(self) -> None:
        peer = self.peer.transport if self.peer else None
        if peer is not None and not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer.transport if self.peer else None
        if peer is not None and not peer.is_closing():
            peer.resume_reading()

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.relay.half_lost(self)


class _Relay:
    """One client connection: picks and connects the upstream, then relays.

    `upstream` is the half of the current connect attempt as soon as the
    attempt starts, so bytes and EOF that a virtual node sends before the
    connecting task resumes are relayed, not lost. Halves of failed attempts
    are detached and ignored."""

    def __init__(self, proxy: "Proxy", service: "_Service"):
        self.proxy = proxy
        self.service = service
        self.client = _Half(self, held=[])
        self.upstream: _Half | None = None
        self.endpoint: Endpoint | None = None      # the virtual node holding our active count
        self.meter: VnodeStats | None = None       # its counters, once connected
        self.accepted_at = proxy.clock()
        # What the client sent the current node while it has not answered:
        # empty until the first bytes decide, None once replay is impossible.
        self.replay: bytearray | None = bytearray()
        self.connecting = True
        self.done = False

    def made(self, half: _Half) -> None:
        if half is self.client:
            # Read nothing until there is somewhere to send it.
            half.transport.pause_reading()
            self.proxy._relays.add(self)
            self.service.relays.add(self)
            self.service.stats.accepted += 1
            self.proxy._spawn(self._connect())

    async def _connect(self, tried: tuple[str, ...] = ()) -> None:
        try:
            await self._try_endpoints(list(tried))
        finally:
            self.connecting = False
            self._maybe_finish()

    async def _try_endpoints(self, tried: list[str]) -> None:
        service, balancer, proxy = self.service, self.service.balancer, self.proxy
        if proxy.hold is not None and not tried:      # deploy on first request: see ondemand.py
            await proxy.hold(service.name, balancer)
        if not tried and service.moving and not balancer.endpoints:
            await service.wait_for_move(proxy.clock)
        while len(tried) < CONNECT_ATTEMPTS and not self.client.lost:
            endpoint = balancer.pick(exclude=tried, now=proxy.clock())
            if endpoint is None:
                break
            tried.append(endpoint.vnode)
            upstream = _Half(self)
            # Counted from the start: a node may speak first, before this task resumes.
            upstream.upstream, upstream.meter = True, service.stats.vnode(endpoint.vnode)
            upstream.peer, self.client.peer = self.client, upstream
            self.upstream, self.endpoint = upstream, endpoint
            balancer.acquire(endpoint.vnode)
            try:
                # asyncio.timeout, not wait_for: no extra task per connection.
                async with asyncio.timeout(proxy.connect_timeout):
                    await proxy._loop.create_connection(lambda: upstream, endpoint.address, endpoint.port)
            except (OSError, TimeoutError) as exc:
                self._detach(upstream)
                balancer.mark_failed(endpoint.vnode, proxy.clock() + proxy.fail_timeout)
                proxy.health.report_failure(service.name, endpoint.vnode)
                service.stats.connect_failures += 1
                service.stats.vnode(endpoint.vnode).connect_failures += 1
                log.warning("service %s: cannot connect to %s at %s:%d: %s", service.name, endpoint.vnode,
                            endpoint.address, endpoint.port, _describe(exc, proxy.connect_timeout))
                continue
            balancer.mark_ok(endpoint.vnode)
            service.stats.relayed += 1
            service.stats.failovers += len(tried) > 1
            meter = self.meter = self.client.meter = upstream.meter
            meter.total += 1
            meter.open += 1
            if self.client.lost:
                upstream.transport.close()
            elif not upstream.lost:
                held, self.client.held = self.client.held, None
                if held:
                    data = b"".join(held)
                    meter.bytes_in += len(data)
                    upstream.transport.write(data)
                    if self.replay is not None:
                        self.keep(data)
                if self.client.eof:
                    self.half_eof(self.client)
                else:
                    self.client.transport.resume_reading()
            return
        service.stats.refused += 1
        if not tried:
            service.note_no_endpoint()
        self.client.peer = None
        if not self.client.lost:
            self.client.transport.close()

    def keep(self, data: bytes) -> None:
        """Remember bytes sent to a node that has not answered yet."""
        replay = self.replay
        if (not replay and not data.startswith(REPLAYABLE)) or len(replay) + len(data) > REPLAY_LIMIT:
            self.replay = None
        else:
            replay += data

    def answered(self, meter: VnodeStats) -> None:
        self.replay = None
        meter.record_ttfb(self.proxy.clock() - self.accepted_at)

    def redispatch(self) -> bool:
        """The node took our request and is dead: send it to another one.
        False when that cannot be done safely (see REPLAY_LIMIT) or there is
        no healthy node to send it to (then it stays where it is)."""
        if self.replay is None or self.connecting or self.done or self.client.lost or self.upstream is None:
            return False
        if not self.service.balancer.has_healthy_other(self.endpoint.vnode):
            return False
        vnode, data = self.endpoint.vnode, bytes(self.replay)
        self.replay = bytearray()
        self.meter.open -= 1
        self.meter = self.client.meter = None
        self.client.held = [data] if data else []
        self.client.transport.pause_reading()
        self._detach(self.upstream)
        self.connecting = True
        self.service.stats.redispatched += 1
        log.warning("service %s: %s is down with an unanswered request: sending it to another node",
                    self.service.name, vnode)
        self.proxy._spawn(self._connect(tried=(vnode,)))
        return True

    def _detach(self, upstream: _Half) -> None:
        upstream.peer, upstream.held = None, []
        if upstream.transport is not None:
            # Made just as the timeout struck: it must not touch the client.
            upstream.transport.abort()
        self.service.balancer.release(self.endpoint.vnode)
        self.upstream = self.endpoint = None
        self.client.peer = None

    def half_eof(self, half: _Half) -> None:
        if half is not self.client and half is not self.upstream:
            return
        other = half.peer
        if other is None or other.transport is None or other.transport.is_closing():
            return
        if half.eof and other.eof:
            # Both directions ended: close() still flushes what is buffered.
            half.transport.close()
            other.transport.close()
        elif other.transport.can_write_eof():
            other.transport.write_eof()
        else:
            other.transport.close()

    def half_lost(self, half: _Half) -> None:
        if half is not self.client and half is not self.upstream:
            return
        # Reset by the node before any answer (its process died, say): try another.
        if half is self.upstream and not half.eof and self.redispatch():
            return
        other = half.peer
        if other is not None and other.transport is not None and not other.transport.is_closing():
            other.transport.close()
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.done or self.connecting:
            return
        if not self.client.lost and self.upstream is not None and self.upstream.lost:
            # The virtual node hung up before we relayed: hang up on the client.
            if not self.client.transport.is_closing():
                self.client.transport.close()
            return
        if self.client.lost and (self.upstream is None or self.upstream.lost):
            self.done = True
            if self.endpoint is not None:
                self.service.balancer.release(self.endpoint.vnode)
            if self.meter is not None:
                self.meter.open -= 1
            self.service.relays.discard(self)
            self.proxy._relay_finished(self)

    def abort(self) -> None:
        for half in (self.client, self.upstream):
            if half is not None and half.transport is not None:
                half.transport.abort()


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, OSError):
        return os.strerror(exc.errno) if exc.errno else str(exc)
    return str(exc)


class _Service:
    """One service's listener, balancer, live connections and counters."""

    def __init__(self, name: str, policy: str):
        self.name = name
        self.listen = ""
        self.balancer = Balancer(policy)
        self.server: asyncio.AbstractServer | None = None
        self.bind_error = ""
        self.retry: asyncio.TimerHandle | None = None
        self.relays: set[_Relay] = set()
        self.stats = ServiceStats()
        self.switch = SwitchSpec()
        self.listed: set[str] = set()       # vnodes in the last endpoint set
        # vnode -> the timer that cuts its connections once it has drained long enough
        self.drains: dict[str, asyncio.TimerHandle] = {}
        self._warned_empty = False
        # A virtual node of it is frozen for a move (its replacement is on
        # its way); set, and replaced, by each endpoint update.
        self.moving = False
        self.changed = asyncio.Event()

    async def wait_for_move(self, clock: Callable[[], float]) -> None:
        """Hold a new connection of a service whose only guests are frozen
        for a move until another is ready (MOVE_HOLD_SECONDS at most), as
        a deploy on first request holds one: a move costs its clients a
        delay, not an error."""
        deadline = clock() + MOVE_HOLD_SECONDS
        while self.moving and not self.balancer.endpoints and (left := deadline - clock()) > 0:
            changed = self.changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await changed.wait()

    def note_no_endpoint(self) -> None:
        if not self._warned_empty:
            self._warned_empty = True
            log.warning("service %s: no ready virtual node; closing client connections until one is ready",
                        self.name)

    def endpoints_changed(self) -> None:
        if self.balancer.endpoints:
            self._warned_empty = False

    def relays_to(self, vnode: str | None) -> list[_Relay]:
        """Open relays to `vnode` (None: all of them)."""
        return [r for r in self.relays if vnode is None or (r.endpoint is not None and r.endpoint.vnode == vnode)]

    def cut(self, vnode: str | None) -> None:
        """The drain time of `vnode` (None: of the whole service) is over."""
        self.drains.pop(vnode, None)
        relays = self.relays_to(vnode)
        if relays:
            log.warning("service %s: %d connection(s) to %s still open after %g s of draining: closing them",
                        self.name, len(relays), vnode or "it", self.switch.drain_seconds)
        for relay in relays:
            relay.abort()

    def cancel_drains(self) -> None:
        for timer in self.drains.values():
            timer.cancel()
        self.drains.clear()

    def prune(self) -> None:
        """Forget the counters of virtual nodes that left and have drained."""
        for name in list(self.stats.vnodes):
            if name not in self.listed and name not in self.drains and self.stats.vnodes[name].open == 0:
                del self.stats.vnodes[name]


class Proxy:
    """All services' listeners and relays on one event loop."""

    def __init__(self, *, connect_timeout: float = CONNECT_TIMEOUT, fail_timeout: float = FAIL_TIMEOUT,
                 listen_hosts: Collection[str] = (), bind_retry_seconds: float = BIND_RETRY_SECONDS,
                 clock: Callable[[], float] = time.monotonic, health: HealthMonitor | None = None):
        self.connect_timeout = connect_timeout
        self.fail_timeout = fail_timeout
        # Empty: any host. Otherwise a service may only listen on these hosts,
        # so that a spec cannot make the Switch bind an address it should not.
        self.listen_hosts = frozenset(listen_hosts)
        self.bind_retry_seconds = bind_retry_seconds
        self.clock = clock
        self._services: dict[str, _Service] = {}
        # Removed services whose connections are still draining.
        self._draining: set[_Service] = set()
        self._relays: set[_Relay] = set()
        self.health = health or HealthMonitor()
        self.health.subscribe(self._health_changed)
        self._tasks: set[asyncio.Task] = set()
        self._idle: asyncio.Event | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set by soda.switch.ondemand.attach: awaited before a new connection
        # picks a virtual node, it holds it while its service is at zero.
        self.hold: Callable[[str, Balancer], Awaitable[None]] | None = None
        # Called when a virtual node may have been let go (no longer routed,
        # its last connection done): the Switch then reports soon, since the
        # Master waits for that report to freeze or stop the guest.
        self.let_go: Callable[[], None] | None = None

    # ---- the control side -------------------------------------------------
    async def apply(self, es: EndpointSet) -> None:
        """Make service `es.service` look like `es`: deleted or without a listen
        address -> no listener; otherwise listen there and route to its ready
        virtual nodes by its policy."""
        self._loop = asyncio.get_running_loop()
        if self._closed:
            return
        if es.deleted or not es.listen:
            await self.remove(es.service)
            return
        svc = self._services.get(es.service)
        policy = es.policy or DEFAULT_POLICY
        if svc is None:
            svc = self._services[es.service] = _Service(es.service, DEFAULT_POLICY)
        try:
            svc.balancer.set_policy(policy)
        except InvalidSpec:
            log.warning("service %s: unknown policy %r, using %s", es.service, policy, svc.balancer.policy)
        svc.switch = es.switch
        self.health.update(es.service, es.switch.health, es.endpoints)
        routed = {e.vnode for e in svc.balancer.endpoints}
        svc.balancer.update(es.endpoints)
        svc.balancer.set_healthy(self.health.healthy(es.service))
        svc.endpoints_changed()
        svc.moving = any(e.moving for e in es.endpoints)
        svc.changed.set()
        svc.changed = asyncio.Event()
        # A frozen one (or one to be frozen) drains like one that left: its
        # guest runs until its connections are done or the drain time ends.
        self._drain_left(svc, {e.vnode for e in es.endpoints if not e.frozen})
        # Listed but not ready: its Agent saw the guest stop or die. What it
        # left unanswered goes elsewhere if it can; the rest is cut rather
        # than left hanging on a guest that is gone.
        self._node_down(svc, {e.vnode for e in es.endpoints if not e.ready and not e.frozen}, cut=True)
        if self.let_go is not None and routed - {e.vnode for e in svc.balancer.endpoints}:
            self.let_go()
        log.info("service %s: listen %s, policy %s, routing to %s", es.service, es.listen,
                 svc.balancer.policy, _describe_endpoints(svc.balancer.endpoints) or "nothing (no ready node)")
        if es.listen != svc.listen or svc.server is None:
            await self._bind(svc, es.listen)

    def _drain_left(self, svc: _Service, listed: set[str]) -> None:
        """Virtual nodes gone from the endpoint set get no new connections
        (the Balancer no longer has them); their open ones get the service's
        drain time. One that comes back is no longer draining."""
        for name in listed & svc.drains.keys():
            svc.drains.pop(name).cancel()
        for name in svc.listed - listed:
            open_now = len(svc.relays_to(name))
            if open_now and name not in svc.drains:
                log.info("service %s: %s left; draining %d connection(s) for up to %g s",
                         svc.name, name, open_now, svc.switch.drain_seconds)
                svc.drains[name] = self._loop.call_later(svc.switch.drain_seconds, svc.cut, name)
        svc.listed = listed
        svc.prune()

    def _health_changed(self, service: str, healthy: frozenset) -> None:
        svc = self._services.get(service)
        if svc is None:
            return
        svc.balancer.set_healthy(healthy)
        # Failing checks may only mean a busy node: move what it has not
        # answered, but cut nothing.
        self._node_down(svc, {name for name, state in self.health.state(service).items()
                              if not state["healthy"]}, cut=False)

    def _node_down(self, svc: _Service, down: set[str], cut: bool) -> None:
        if not down:
            return
        for relay in list(svc.relays):
            if relay.endpoint is not None and relay.endpoint.vnode in down and not relay.connecting:
                if not relay.redispatch() and cut:
                    relay.abort()

    async def remove(self, name: str) -> None:
        svc = self._services.pop(name, None)
        if svc is None:
            return
        self._unbind(svc)
        self.health.remove(name)
        svc.cancel_drains()
        svc.listed = set()
        svc.balancer.update(())         # routes nothing; open connections still release
        if svc.relays:
            # Its connections run on for the drain time, then are cut.
            self._draining.add(svc)
            svc.drains[None] = self._loop.call_later(svc.switch.drain_seconds, svc.cut, None)
        log.info("service %s removed: listener closed, %d connection(s) left to finish (at most %g s)",
                 name, len(svc.relays), svc.switch.drain_seconds)

    async def _bind(self, svc: _Service, listen: str) -> None:
        self._unbind(svc)
        svc.listen = listen
        try:
            host, port = split_host_port(listen)
            if self.listen_hosts and host not in self.listen_hosts:
                raise InvalidSpec(f"host {host} is not in this Switch's listen_hosts "
                                  f"({', '.join(sorted(self.listen_hosts))})")
            svc.server = await self._loop.create_server(
                lambda: _Relay(self, svc).client, host, port, reuse_address=True, backlog=LISTEN_BACKLOG)
        except InvalidSpec as exc:
            # A spec problem does not fix itself: wait for the next update.
            svc.bind_error = str(exc)
            log.error("service %s: not listening on %s: %s", svc.name, listen, exc)
            return
        except OSError as exc:
            error = exc.strerror or str(exc)
            level = logging.DEBUG if error == svc.bind_error else logging.ERROR
            log.log(level, "service %s: cannot listen on %s: %s (retrying every %g s)",
                    svc.name, listen, error, self.bind_retry_seconds)
            svc.bind_error = error
            svc.retry = self._loop.call_later(self.bind_retry_seconds, self._retry_bind, svc)
            return
        if svc.bind_error:
            log.info("service %s: now listening on %s", svc.name, listen)
        else:
            log.debug("service %s: listening on %s", svc.name, listen)
        svc.bind_error = ""

    def _retry_bind(self, svc: _Service) -> None:
        svc.retry = None
        if self._services.get(svc.name) is svc and svc.server is None and not self._closed:
            self._spawn(self._bind(svc, svc.listen))

    def _unbind(self, svc: _Service) -> None:
        if svc.retry is not None:
            svc.retry.cancel()
            svc.retry = None
        if svc.server is not None:
            # Stops accepting; relays already running are not touched.
            svc.server.close()
            svc.server = None

    async def close(self, drain_seconds: float = 5.0) -> None:
        """Stop listening everywhere, give open connections `drain_seconds`
        to finish, then cut the rest."""
        self._closed = True
        for svc in list(self._services.values()) + list(self._draining):
            self._unbind(svc)
            svc.cancel_drains()
        self._services.clear()
        self._draining.clear()
        await self.health.close()
        if self._relays and drain_seconds > 0:
            log.info("waiting up to %g s for %d connection(s) to finish", drain_seconds, len(self._relays))
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), drain_seconds)
            except asyncio.TimeoutError:
                pass
        if self._relays:
            log.info("closing %d connection(s) still open", len(self._relays))
        for relay in list(self._relays):
            relay.abort()
        for task in list(self._tasks):
            task.cancel()
        # Let the transports deliver connection_lost.
        await asyncio.sleep(0)

    # ---- introspection -----------------------------------------------------
    def services(self) -> dict[str, dict]:
        """What each service looks like now (for logs and tests)."""
        return {name: {"listen": svc.listen, "listening": svc.server is not None,
                       "bind_error": svc.bind_error, "policy": svc.balancer.policy,
                       "endpoints": [e.vnode for e in svc.balancer.endpoints],
                       "active": {e.vnode: svc.balancer.active(e.vnode) for e in svc.balancer.endpoints},
                       "connections": len(svc.relays), "stats": svc.stats}
                for name, svc in self._services.items()}

    def active_connections(self) -> int:
        return len(self._relays)

    def views(self) -> list[ServiceView]:
        """Every service's virtual nodes and counters, for /metrics and the
        Master; a removed service still draining is listed while it does."""
        out = []
        for svc in sorted(list(self._services.values()) + list(self._draining), key=lambda s: s.name):
            routable = {e.vnode for e in svc.balancer.endpoints}
            healthy = self.health.healthy(svc.name)
            names = sorted(routable | svc.stats.vnodes.keys())
            out.append(ServiceView(
                service=svc.name, listen=svc.listen, listening=svc.server is not None, bind_error=svc.bind_error,
                vnodes=tuple(VnodeView(vnode=n, stats=svc.stats.vnode(n), routable=n in routable,
                                       healthy=n in healthy) for n in names)))
        return out

    # ---- internals ---------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("switch task failed", exc_info=task.exception())

    def _relay_finished(self, relay: _Relay) -> None:
        self._relays.discard(relay)
        svc = relay.service
        if svc in self._draining and not svc.relays:
            svc.cancel_drains()
            self._draining.discard(svc)
        vnode = relay.endpoint.vnode if relay.endpoint is not None else None
        if vnode in svc.drains and not svc.relays_to(vnode):
            svc.drains.pop(vnode).cancel()      # drained in time
            svc.prune()
            if self.let_go is not None:
                self.let_go()
        if self._idle is not None and not self._relays:
            self._idle.set()


def _describe_endpoints(endpoints: tuple[Endpoint, ...]) -> str:
    return ", ".join(f"{e.vnode}={e.address}:{e.port} (weight {e.weight:g})" for e in endpoints)
