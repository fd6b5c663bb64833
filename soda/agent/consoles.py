"""The Agent's end of `sodactl service logs`: it follows the Master's log
orders for this node (WatchLogOrders) and answers each with the virtual
node's console (SendLogs), read by soda.hypervisors.console.

The Agent dials out only, as for its assignments. Each order is answered
on a thread of its own, at most MAX_STREAMS at once (a tenant following
many consoles must not exhaust the node); an order beyond that, or for a
virtual node this node does not hold, is answered with the reason.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Protocol

from soda.backoff import Backoff
from soda.errors import NoCapacity, NotFound, SodaError
from soda.hypervisors import console

log = logging.getLogger(__name__)

MAX_STREAMS = 16


class LogClient(Protocol):
    def watch_log_orders(self, node: str): ...
    def send_logs(self, order_id: str, chunks, error: str = "") -> None: ...


class ConsoleOf(Protocol):
    def console_of(self, name: str) -> tuple[str, str]: ...


class ConsoleShipper:
    def __init__(self, client: LogClient, node: str, consoles: ConsoleOf, stop: threading.Event,
                 backoff: Backoff | None = None, follow: Callable = console.follow):
        self._client = client
        self._node = node
        self._consoles = consoles
        self._stop = stop
        self._backoff = backoff or Backoff()
        self._follow = follow
        self._slots = threading.BoundedSemaphore(MAX_STREAMS)

    def run(self) -> None:
        """Follow the orders until the Agent stops; reconnect after a backoff."""
        while not self._stop.is_set():
            try:
                for order in self._client.watch_log_orders(self._node):
                    self._backoff.reset()
                    threading.Thread(target=self._answer, args=(order,), daemon=True,
                                     name=f"soda-agent-logs-{order.vnode}").start()
            except SodaError as exc:
                log.debug("log orders: %s", exc)
            self._stop.wait(self._backoff.next())

    def _answer(self, order) -> None:
        if not self._slots.acquire(blocking=False):
            self._send_error(order, NoCapacity(f"node {self._node} already streams {MAX_STREAMS} consoles: "
                                               "try again later", resource="console streams"))
            return
        try:
            try:
                path, kept = self._consoles.console_of(order.vnode)
            except NotFound as exc:
                self._send_error(order, exc)
                return
            chunks = self._follow(path, kept, order.tail, order.follow, self._stop.is_set)
            self._client.send_logs(order.id, chunks)
        except SodaError as exc:
            log.debug("console of %s for order %s: %s", order.vnode, order.id, exc)
        finally:
            self._slots.release()

    def _send_error(self, order, why: SodaError) -> None:
        try:
            self._client.send_logs(order.id, iter(()), error=why)
        except SodaError as exc:
            log.debug("answering log order %s: %s", order.id, exc)
