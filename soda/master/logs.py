"""Guest consoles through the Master: the broker between a caller of
`ServiceLogs` and the Agent that holds the virtual node.

The Master never dials a node. Each Agent follows its own stream of log
orders (`WatchLogOrders`); a `ServiceLogs` call places an order for the
node and waits on a `Relay`, which the Agent's `SendLogs` stream fills.
Either end going away closes the relay: a caller that hangs up ends the
Agent's stream (its next part is refused), an Agent that ends its stream
ends the caller's. Orders and relays live in memory only: a Master restart
ends every log stream, and callers see UNAVAILABLE and may ask again.
"""

from __future__ import annotations

import collections
import queue
import threading
import uuid
from dataclasses import dataclass
from typing import Iterator

from soda.errors import NotFound, PermissionDenied, SodaError, Unavailable

# How long a caller waits for the Agent's first word before giving up: an
# Agent that is connected answers within a round trip.
FIRST_PART_SECONDS = 10.0
# Chunks queued per relay: a caller that reads slower than the guest
# writes holds up the Agent's stream (flow control), not the Master's memory.
RELAY_DEPTH = 64
WAIT_SLICE = 0.5
# How often an Agent's order stream looks whether its Agent is still there
# while no order comes. Every Agent holds one: with 500 of them a shorter
# poll, or one wake-up shared by all, is a thousand thread switches a second.
ORDER_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class LogOrder:
    id: str
    node: str
    vnode: str
    follow: bool
    tail: int


_END = object()


class Relay:
    """One caller's stream: chunks from the Agent, then the end (or an error)."""

    def __init__(self, order: LogOrder):
        self.order = order
        self._chunks: queue.Queue = queue.Queue(RELAY_DEPTH)
        self.closed = threading.Event()

    def put(self, data: bytes) -> bool:
        """Queue `data` for the caller; False once the caller has gone."""
        while not self.closed.is_set():
            try:
                self._chunks.put(data, timeout=WAIT_SLICE)
                return True
            except queue.Full:
                continue
        return False

    def finish(self, error: SodaError | None = None) -> None:
        """The Agent's end: no more chunks (`error`: why it could not)."""
        if self.closed.is_set():
            return
        try:
            self._chunks.put(error or _END, timeout=WAIT_SLICE)
        except queue.Full:
            pass
        self.closed.set()

    def chunks(self, active=lambda: True, first_timeout: float = FIRST_PART_SECONDS) -> Iterator[bytes]:
        """What the Agent sends, while `active()` (the caller listening)."""
        waited = 0.0
        started = False
        while active():
            try:
                item = self._chunks.get(timeout=WAIT_SLICE)
            except queue.Empty:
                if self.closed.is_set() and self._chunks.empty():
                    return
                waited += WAIT_SLICE
                if not started and waited >= first_timeout:
                    raise Unavailable(f"the Agent of node {self.order.node} did not answer within "
                                      f"{first_timeout:g}s")
                continue
            started = True
            if item is _END:
                return
            if isinstance(item, SodaError):
                raise item
            yield item


class LogBroker:
    def __init__(self):
        self._lock = threading.Lock()
        self._orders: dict[str, collections.deque[LogOrder]] = {}
        self._watchers: collections.Counter[str] = collections.Counter()
        # One per node with an order stream, on the one lock: an order wakes
        # its own node's stream only.
        self._wakes: dict[str, threading.Condition] = {}
        self._relays: dict[str, Relay] = {}

    # ---- the caller's side ---------------------------------------------
    def open(self, node: str, vnode: str, follow: bool, tail: int) -> Relay:
        """Order `vnode`'s console from the Agent of `node`; Unavailable
        when that Agent is not listening for orders."""
        with self._lock:
            if not self._watchers[node]:
                raise Unavailable(f"the Agent of node {node} is not connected to this Master")
            order = LogOrder(uuid.uuid4().hex, node, vnode, follow, tail)
            relay = Relay(order)
            self._relays[order.id] = relay
            self._orders.setdefault(node, collections.deque()).append(order)
            self._wakes[node].notify_all()
        return relay

    def close(self, relay: Relay) -> None:
        relay.closed.set()
        with self._lock:
            self._relays.pop(relay.order.id, None)
            pending = self._orders.get(relay.order.node)
            if pending and relay.order in pending:
                pending.remove(relay.order)

    # ---- the Agent's side ----------------------------------------------
    def orders(self, node: str, active=lambda: True) -> Iterator[LogOrder]:
        """Orders for `node`'s Agent as they come, while `active()`."""
        with self._lock:
            self._watchers[node] += 1
            wake = self._wakes.setdefault(node, threading.Condition(self._lock))
        try:
            while active():
                with self._lock:
                    pending = self._orders.get(node)
                    if not pending:
                        wake.wait(ORDER_POLL_SECONDS)
                        pending = self._orders.get(node)
                    order = pending.popleft() if pending else None
                if order is not None:
                    yield order
        finally:
            with self._lock:
                self._watchers[node] -= 1
                if not self._watchers[node]:
                    del self._watchers[node]
                    del self._wakes[node]

    def relay_for(self, order_id: str, node: str | None) -> Relay:
        """The relay an Agent answers; `node`: the Agent's own (None for an
        operator), which must be the one the order went to."""
        with self._lock:
            relay = self._relays.get(order_id)
        if relay is None:
            raise NotFound(f"no log order {order_id!r} is waiting (its caller may have gone)")
        if node is not None and relay.order.node != node:
            raise PermissionDenied(f"log order {order_id} is for node {relay.order.node}, not {node}")
        return relay
