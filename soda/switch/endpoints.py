"""Endpoint lists from the Master, fed to the proxy in order.

Two halves:
- `EndpointWatcher` is a thread that follows `MasterClient.watch_endpoints`
  (a blocking iterator) and hands every event to the event loop with
  `loop.call_soon_threadsafe`. When the Master is down or the stream breaks
  it reconnects with a capped, jittered backoff; meanwhile the proxy keeps
  serving the last endpoints it was given.
- `EndpointSync` runs on the loop: it applies the events to a target (the
  Proxy) one at a time, in order. A new stream starts with the current state
  of every service; services the Switch still serves but that snapshot no
  longer names were deleted while the stream was down, so once the snapshot
  has settled (no event for `settle_seconds`) they are removed.

No sockets of its own and no grpc: the client is passed in (anything with
`watch_endpoints()` and `close()`), so tests drive it with fakes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from soda.backoff import Backoff
from soda.errors import SodaError
from soda.model.switching import EndpointSet

log = logging.getLogger("soda.switch.endpoints")

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
# A stream's snapshot is taken as complete once no event came for this long...
SETTLE_SECONDS = 1.0
# ...or this long after the stream opened, however busy it is.
SETTLE_MAX_SECONDS = 10.0


@dataclass(frozen=True)
class StreamOpened:
    """A new watch stream is about to deliver the Master's current state."""


@dataclass(frozen=True)
class StreamLost:
    """The watch stream ended or could not be opened."""
    error: str


Event = StreamOpened | StreamLost | EndpointSet


class EndpointTarget(Protocol):
    async def apply(self, es: EndpointSet) -> None: ...

    async def remove(self, service: str) -> None: ...


class EndpointWatcher:
    """A thread that follows the Master's endpoint stream and reconnects."""

    def __init__(self, client: Any, loop: asyncio.AbstractEventLoop, handler: Callable[[Event], None], *,
                 probe: Callable[[], Any] | None = None,
                 backoff: Backoff | None = None):
        self.client = client
        # A cheap unary call that proves the Master answers before a stream
        # is opened: a stream to an unreachable host can sit "connecting"
        # with nothing to read, and that must not pass for an empty Master.
        self.probe = probe
        self.loop = loop
        self.handler = handler
        self.backoff = backoff or Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="soda-switch-endpoints", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop following. Closing the client is what unblocks a stream that
        is waiting for the Master's next change."""
        self._stop.set()
        self.client.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def _deliver(self, event: Event) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.handler, event)
        except RuntimeError:        # the loop is closed: the Switch is stopping
            self._stop.set()
            return False
        return True

    def run(self) -> None:
        while not self._stop.is_set():
            got = 0
            try:
                if self.probe is not None:
                    self.probe()
                if not self._deliver(StreamOpened()):
                    return
                for es in self.client.watch_endpoints():
                    if self._stop.is_set() or not self._deliver(es):
                        return
                    got += 1
                error = "the Master ended the stream"
            except SodaError as exc:
                error = str(exc)
            except Exception as exc:        # keep routing whatever the watch does
                if self._stop.is_set():
                    return
                log.exception("endpoint watch failed")
                error = f"{type(exc).__name__}: {exc}"
            if self._stop.is_set():
                return
            if got:
                self.backoff.reset()
            self._deliver(StreamLost(error))
            wait = self.backoff.next()
            log.warning("endpoint watch: %s; serving the last known endpoints, retrying in %.1f s",
                        error, wait)
            if self._stop.wait(wait):
                return


class EndpointSync:
    """Applies watcher events to the target in order, on the event loop."""

    def __init__(self, target: EndpointTarget, *, settle_seconds: float = SETTLE_SECONDS,
                 settle_max_seconds: float = SETTLE_MAX_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.target = target
        self.settle_seconds = settle_seconds
        self.settle_max_seconds = settle_max_seconds
        self.clock = clock
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        # Set once the first snapshot has settled: the Switch is then as
        # ready as the Master's state lets it be.
        self.synced = asyncio.Event()
        self.services: set[str] = set()     # services given to the target and not removed
        self._seen: set[str] = set()        # ... named by the current stream
        self._settle_at: float | None = None
        self._settle_limit = 0.0
        self.connected = False

    def handle(self, event: Event) -> None:
        """Called on the loop (through call_soon_threadsafe) for each event."""
        self.queue.put_nowait(event)

    async def run(self) -> None:
        while True:
            timeout = None if self._settle_at is None else max(0.0, self._settle_at - self.clock())
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout)
            except asyncio.TimeoutError:
                await self._settled()
                continue
            try:
                await self._on_event(event)
            except Exception:       # a bug here must not stop routing updates
                log.exception("cannot apply endpoint event %r", event)

    async def _on_event(self, event: Event) -> None:
        now = self.clock()
        if isinstance(event, StreamOpened):
            self._seen = set()
            self._settle_at = now + self.settle_seconds
            self._settle_limit = now + self.settle_max_seconds
            return
        if isinstance(event, StreamLost):
            # The snapshot was cut short: keep what we serve until a full one arrives.
            self._settle_at = None
            if self.connected:
                log.warning("lost the Master's endpoint stream: %s", event.error)
            self.connected = False
            return
        if not self.connected:
            self.connected = True
            log.info("following the Master's endpoint lists")
        if self._settle_at is not None:
            self._settle_at = min(now + self.settle_seconds, self._settle_limit)
        self._seen.add(event.service)
        if event.deleted:
            self.services.discard(event.service)
            await self.target.remove(event.service)
        else:
            self.services.add(event.service)
            await self.target.apply(event)

    async def _settled(self) -> None:
        self._settle_at = None
        self.connected = True
        for name in sorted(self.services - self._seen):
            log.info("service %s is gone from the Master: removing it", name)
            self.services.discard(name)
            await self.target.remove(name)
        self.synced.set()
