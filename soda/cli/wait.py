"""`--wait`: follow a service through the Master's watch until it is done,
or a draining node until it holds nothing.

Owns waiting only: it reads the service or node through the client it is
given and reports on a StatusLine; what "done" means for a service lives
in soda.cli.rollout. Failures and timeouts are raised as WaitFailed (a
SodaError), so sodactl prints them like any other error; a drain that
times out while a virtual node waits for room elsewhere is NoCapacity.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterator, Protocol

from soda import errors, model
from soda.cli.progress import StatusLine
from soda.cli.rollout import Rollout, describe, name_some

DEFAULT_TIMEOUT = 300.0
# How long the watch may stay quiet before the service is read directly. It
# covers a change that fell between our request and the watch's first
# snapshot, and a watch the Master ended early.
POLL_INTERVAL = 5.0

# How often a drain's progress is read: a node's virtual nodes are not
# streamed, and a move takes a second or more.
NODE_POLL_INTERVAL = 1.0

Clock = Callable[[], float]


class ServiceReader(Protocol):
    def get_service(self, name: str) -> model.Service: ...
    def watch_services(self, name: str = "") -> Iterator[tuple[str, model.Service | str]]: ...


class NodeReader(Protocol):
    def list_nodes(self) -> list[model.Node]: ...
    def list_services(self) -> list[model.Service]: ...


class WaitFailed(errors.SodaError):
    """The service will not get there (a virtual node failed) or not in time."""


class _EventPump:
    """Reads a blocking event stream on a daemon thread, so that the waiter
    can give up at its deadline: a gRPC stream iterator has no timeout of its
    own. The thread ends when the client's channel is closed, or with the
    process."""

    QUIET = object()

    def __init__(self, events: Iterator):
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(events,), name="sodactl-watch", daemon=True).start()

    def _pump(self, events: Iterator) -> None:
        try:
            for event in events:
                self._queue.put((True, event))
        except BaseException as exc:          # handed to the waiting thread, raised there
            self._queue.put((False, exc))

    def next(self, timeout: float):
        """The next event, or QUIET if none came within `timeout` seconds."""
        try:
            ok, item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return self.QUIET
        if not ok:
            raise item
        return item


def follow_service(client: ServiceReader, name: str, deadline: float,
                   poll_interval: float = POLL_INTERVAL,
                   clock: Clock = time.monotonic) -> Iterator[model.Service | None]:
    """Yield service `name` each time it changes, then None once it is gone.
    Stops (without raising) when `deadline` on `clock` has passed."""
    pump = _EventPump(client.watch_services(name))
    while (remaining := deadline - clock()) > 0:
        try:
            event = pump.next(timeout=min(remaining, poll_interval))
        except errors.NotFound:
            yield None
            return
        if event is _EventPump.QUIET:
            try:
                service = client.get_service(name)
            except errors.NotFound:
                yield None
                return
            yield service
            continue
        kind, payload = event
        if kind == "DELETED":
            if payload == name:
                yield None
                return
        elif payload.name == name:
            yield payload


def wait_until_running(client: ServiceReader, name: str, status: StatusLine,
                       timeout: float = DEFAULT_TIMEOUT, poll_interval: float = POLL_INTERVAL,
                       clock: Clock = time.monotonic) -> model.Service:
    """Return the service once every wanted virtual node is RUNNING and every
    unwanted one is gone; raise WaitFailed as soon as one FAILED, or at timeout.
    A virtual node FAILED for a temporary cause that its Agent retries (the
    Daemon restarting) is waited for: it runs a moment later."""
    last: Rollout | None = None
    for service in follow_service(client, name, clock() + timeout, poll_interval, clock):
        if service is None:
            raise WaitFailed(f"service {name} was deleted while waiting for it to run")
        last = Rollout.of(service)
        status.update(last.progress(), milestone=True)
        if last.failed:
            status.finish(last.progress())
            raise WaitFailed(f"{name}: {last.failures()}")
        if last.done:
            status.finish(last.progress())
            return service
    if last is None:
        raise WaitFailed(f"timed out after {timeout:g}s waiting for service {name}: "
                         "no word of it from the Master")
    raise WaitFailed(f"timed out after {timeout:g}s waiting for {last.progress()}; "
                     f"not running: {last.not_running()}")


def wait_until_moved(client: ServiceReader, name: str, old: str, new: str, status: StatusLine,
                     timeout: float = DEFAULT_TIMEOUT, poll_interval: float = POLL_INTERVAL,
                     clock: Clock = time.monotonic) -> model.Service:
    """Return the service once `new` (the replacement of `old`) is RUNNING
    and `old` is gone; raise WaitFailed when the move is given up (`new`
    goes) or `new` FAILED for good, or at timeout."""
    last = ""
    for service in follow_service(client, name, clock() + timeout, poll_interval, clock):
        if service is None:
            raise WaitFailed(f"service {name} was deleted while waiting for {old} to move")
        by_name = {v.name: v for v in service.vnodes}
        moved, leaving = by_name.get(new), by_name.get(old)
        if moved is None or moved.deleting:
            why = f": {leaving.reason}" if leaving is not None and leaving.reason else ""
            raise WaitFailed(f"the move of {old} was given up; it stays on {leaving.node if leaving else '?'}"
                             f"{why}")
        if moved.phase == model.Phase.FAILED and not model.retries_temporary_failure(moved):
            raise WaitFailed(f"{new}, which replaces {old}, failed: {moved.reason}")
        last = f"{old} -> {new}: {describe(moved)}" + (f"; {old}: {describe(leaving)}" if leaving else "")
        status.update(last, milestone=True)
        if leaving is None and moved.phase == model.Phase.RUNNING:
            status.finish(f"{old} moved: {new} runs on {moved.node}")
            return service
    raise WaitFailed(f"timed out after {timeout:g}s waiting for {old} to move: {last or 'no word of it'}")


def wait_until_deleted(client: ServiceReader, name: str, status: StatusLine,
                       timeout: float = DEFAULT_TIMEOUT, poll_interval: float = POLL_INTERVAL,
                       clock: Clock = time.monotonic) -> None:
    """Return once the Master has removed the service (all its virtual nodes stopped)."""
    left: tuple[model.VirtualNode, ...] | None = None
    for service in follow_service(client, name, clock() + timeout, poll_interval, clock):
        if service is None:
            status.finish(f"{name}: deleted")
            return
        left = service.vnodes
        status.update(f"{name}: deleting, {len(left)} virtual node(s) left", milestone=True)
    detail = "" if not left else ": still there: " + name_some(
        [f"{v.name} ({describe(v)})" for v in sorted(left, key=lambda v: v.index)])
    raise WaitFailed(f"timed out after {timeout:g}s waiting for service {name} to be deleted{detail}")


def wait_until_drained(client: NodeReader, name: str, status: StatusLine,
                       timeout: float = DEFAULT_TIMEOUT, poll_interval: float | None = None,
                       clock: Clock = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> model.Node:
    """Return node `name` once it holds no virtual node (each moved and the
    old one stopped); raise WaitFailed if it is undrained or removed
    meanwhile, or at timeout (NoCapacity when a virtual node still waits
    for room elsewhere then)."""
    interval = NODE_POLL_INTERVAL if poll_interval is None else poll_interval
    deadline = clock() + timeout
    while True:
        node = next((n for n in client.list_nodes() if n.name == name), None)
        if node is None:
            raise WaitFailed(f"node {name} is gone: it was removed while waiting for it to drain")
        if not node.draining:
            raise WaitFailed(f"node {name} was undrained while waiting for it to drain")
        if not node.vnodes:
            status.finish(f"{name}: drained")
            return node
        held = sorted((v for s in client.list_services() for v in s.vnodes if v.node == name),
                      key=lambda v: (v.service, v.index))
        moving = [v for v in held if not v.deleting]
        status.update(_drain_progress(name, moving, len(held) - len(moving)), milestone=True)
        remaining = deadline - clock()
        if remaining <= 0:
            what = name_some([f"{v.name} ({_drain_note(name, v) or describe(v)})" for v in moving]) \
                or f"{node.vnodes - len(moving)} virtual node(s) still stopping"
            message = f"timed out after {timeout:g}s waiting for node {name} to drain: {what}"
            if any("waiting for room" in v.reason for v in moving):
                raise errors.NoCapacity(message)
            raise WaitFailed(message)
        sleep(min(interval, remaining))


def _drain_progress(name: str, moving: list[model.VirtualNode], stopping: int) -> str:
    """`node-a: draining, 2 virtual node(s) to move, 1 stopping; web-0 moving to web-4 on node-b, ...`"""
    text = f"{name}: draining, {len(moving)} virtual node(s) to move"
    if stopping:
        text += f", {stopping} stopping"
    current = next((v for v in moving if "moving to" in v.reason), None) \
        or next((v for v in moving if v.reason), None)
    if current is not None:
        text += f"; {current.name}: {_drain_note(name, current)}"
    return text


def _drain_note(name: str, vnode: model.VirtualNode) -> str:
    """Its reason without the "node NAME is draining: " every drain note starts with."""
    prefix = f"node {name} is draining: "
    return vnode.reason[len(prefix):] if vnode.reason.startswith(prefix) else vnode.reason
