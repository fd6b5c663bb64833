"""Active health checks of the virtual nodes behind the Switch.

Owns, per service and per routable endpoint, whether the Switch believes the
virtual node answers: a check task that runs the service's `HealthCheck`
(`tcp`: a connect; `http`: a GET of `path` that must answer `expect_status`;
`none`: no checks, always healthy) every `interval` seconds, bounded by
`timeout`, with `rise` passes in a row to become healthy again and `fall`
failures in a row to become unhealthy.

Start state: an endpoint the Master reports ready (its guest RUNNING: the
Agent's own readiness probe already saw the port open) starts *healthy*, so
a new or resized node gets traffic at once. The cost of being wrong is
bounded: a node that is not really there fails its first connect, which the
proxy retries on another node (the client never sees it) and reports here
(`report_failure`): that counts as a failed check and runs a real check at
once, so a dead node is out after `fall` failures, typically within
`timeout` of the first failed connect instead of `fall * interval`.

Observers (the proxy; the kernel path, soda/switch/nft.py, keeps its
nftables maps in step the same way)::

    unsubscribe = monitor.subscribe(callback)
    # callback(service: str, healthy: frozenset[str]) is called on the event
    # loop whenever the set of healthy virtual nodes of `service` changes
    # (a check flips a node, an endpoint set adds or removes one, or the
    # service goes away: then with an empty set). It must not block.
    monitor.healthy("web")      # frozenset of vnode names healthy now
    monitor.is_healthy("web", "web-0")

Only ready endpoints are tracked; one that moved (new address or port) is a
new target and starts again from healthy. No policy decisions here: the
proxy's Balancer skips unhealthy nodes while a healthy one exists.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

from soda.model.spec import HealthCheck
from soda.model.switching import Endpoint

log = logging.getLogger("soda.switch.health")

Observer = Callable[[str, frozenset], None]
# (endpoint, check) -> passed?
Probe = Callable[[Endpoint, HealthCheck], Awaitable[bool]]
# Largest HTTP status line + headers read from a check answer.
HTTP_HEAD_LIMIT = 8192


async def tcp_probe(endpoint: Endpoint, check: HealthCheck) -> bool:
    """A TCP connect within `check.timeout`."""
    try:
        async with asyncio.timeout(check.timeout):
            _, writer = await asyncio.open_connection(endpoint.address, endpoint.port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def http_probe(endpoint: Endpoint, check: HealthCheck) -> bool:
    """GET `check.path` answering `check.expect_status`, all within `check.timeout`."""
    writer = None
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(endpoint.address, endpoint.port)
            writer.write(f"GET {check.path} HTTP/1.0\r\nHost: {endpoint.address}\r\n"
                         f"User-Agent: soda-switch-health\r\nConnection: close\r\n\r\n".encode())
            line = await reader.readline()
    except (OSError, TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()
    parts = line.split()
    return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1] == str(check.expect_status).encode()


def default_probe(endpoint: Endpoint, check: HealthCheck) -> Awaitable[bool]:
    return (http_probe if check.kind == "http" else tcp_probe)(endpoint, check)


@dataclass
class _Target:
    endpoint: Endpoint
    healthy: bool = True
    passes: int = 0             # in a row
    failures: int = 0           # in a row
    checks: int = 0
    task: asyncio.Task | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class _ServiceHealth:
    def __init__(self, check: HealthCheck):
        self.check = check
        self.targets: dict[str, _Target] = {}


class HealthMonitor:
    """Health of every service's ready endpoints, on the running event loop."""

    def __init__(self, probe: Probe = default_probe,
                 jitter: Callable[[], float] = lambda: random.uniform(0.9, 1.1)):
        self.probe = probe
        self.jitter = jitter
        self._services: dict[str, _ServiceHealth] = {}
        self._observers: list[Observer] = []

    # ---- the observer API ----------------------------------------------
    def subscribe(self, observer: Observer) -> Callable[[], None]:
        self._observers.append(observer)
        return lambda: self._observers.remove(observer) if observer in self._observers else None

    def healthy(self, service: str) -> frozenset:
        svc = self._services.get(service)
        if svc is None:
            return frozenset()
        return frozenset(name for name, t in svc.targets.items() if t.healthy)

    def is_healthy(self, service: str, vnode: str) -> bool:
        svc = self._services.get(service)
        target = svc.targets.get(vnode) if svc else None
        return target is not None and target.healthy

    def state(self, service: str) -> dict[str, dict]:
        """Per tracked vnode: healthy, checks run, failures/passes in a row."""
        svc = self._services.get(service)
        return {} if svc is None else {
            name: {"healthy": t.healthy, "checks": t.checks, "failures": t.failures, "passes": t.passes}
            for name, t in svc.targets.items()}

    # ---- inputs ---------------------------------------------------------
    def update(self, service: str, check: HealthCheck, endpoints: Iterable[Endpoint]) -> None:
        """Track exactly the ready endpoints in `endpoints` with `check`."""
        svc = self._services.get(service)
        before = self.healthy(service)
        if svc is None:
            svc = self._services[service] = _ServiceHealth(check)
        elif svc.check != check:
            # New rules: start every target over (optimistic, fresh counts).
            for target in svc.targets.values():
                _stop(target)
            svc.targets.clear()
            svc.check = check
        wanted = {e.vnode: e for e in endpoints if e.ready}
        for name in list(svc.targets):
            target = svc.targets[name]
            ep = wanted.get(name)
            if ep is None or (ep.address, ep.port) != (target.endpoint.address, target.endpoint.port):
                _stop(target)
                del svc.targets[name]
            else:
                target.endpoint = ep
        for name, ep in wanted.items():
            if name not in svc.targets:
                target = svc.targets[name] = _Target(ep)
                if check.kind != "none":
                    target.task = asyncio.get_running_loop().create_task(
                        self._run(service, svc, target), name=f"health-{service}-{name}")
        self._notify_if_changed(service, before)

    def remove(self, service: str) -> None:
        svc = self._services.pop(service, None)
        if svc is None:
            return
        for target in svc.targets.values():
            _stop(target)
        if any(t.healthy for t in svc.targets.values()):
            self._notify(service, frozenset())

    def report_failure(self, service: str, vnode: str) -> None:
        """Passive detection: a connect to `vnode` failed. Counts as a failed
        check and runs a real one at once."""
        svc = self._services.get(service)
        target = svc.targets.get(vnode) if svc else None
        if target is None or svc.check.kind == "none":
            return
        self._record(service, svc, target, False)
        target.wake.set()

    async def close(self) -> None:
        tasks = []
        for svc in self._services.values():
            for target in svc.targets.values():
                if target.task is not None:
                    tasks.append(target.task)
                _stop(target)
        self._services.clear()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- internals --------------------------------------------------------
    async def _run(self, service: str, svc: _ServiceHealth, target: _Target) -> None:
        check = svc.check
        while True:
            try:
                await asyncio.wait_for(target.wake.wait(), check.interval * self.jitter())
            except asyncio.TimeoutError:
                pass
            target.wake.clear()
            try:
                ok = await self.probe(target.endpoint, check)
            except asyncio.CancelledError:
                raise
            except Exception:           # a probe bug must not stop checking
                log.exception("health check of %s/%s failed", service, target.endpoint.vnode)
                ok = False
            if self._services.get(service) is not svc or svc.targets.get(target.endpoint.vnode) is not target:
                return
            self._record(service, svc, target, ok)

    def _record(self, service: str, svc: _ServiceHealth, target: _Target, ok: bool) -> None:
        target.checks += 1
        before = self.healthy(service)
        if ok:
            target.failures, target.passes = 0, target.passes + 1
            if not target.healthy and target.passes >= svc.check.rise:
                target.healthy = True
                log.info("service %s: %s is healthy again (%d check(s) passed)",
                         service, target.endpoint.vnode, target.passes)
        else:
            target.passes, target.failures = 0, target.failures + 1
            if target.healthy and target.failures >= svc.check.fall:
                target.healthy = False
                log.warning("service %s: %s is unhealthy (%d check(s) failed): no new connections",
                            service, target.endpoint.vnode, target.failures)
        self._notify_if_changed(service, before)

    def _notify_if_changed(self, service: str, before: frozenset) -> None:
        after = self.healthy(service)
        if after != before:
            self._notify(service, after)

    def _notify(self, service: str, healthy: frozenset) -> None:
        for observer in list(self._observers):
            try:
                observer(service, healthy)
            except Exception:       # one observer's bug must not starve the others
                log.exception("health observer %r failed", observer)


def _stop(target: _Target) -> None:
    if target.task is not None:
        target.task.cancel()
