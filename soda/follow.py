"""Following one of the Master's watch streams from a thread of its own.

`follow()` is the loop every follower runs (the Agent's and the Switch's
host routes on the node list, the Agent's guest policy on the endpoint
sets): read the stream, hand each item on, and when the stream ends or
breaks watch again after a capped, jittered backoff, saying so once in
the log while the Master stays away and once when it is back. Whatever
the follower maintains stays as it is meanwhile. A bug in the handler is
logged with its traceback and followed by the same backoff, never the end
of the thread.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

from soda.backoff import Backoff
from soda.errors import SodaError

T = TypeVar("T")


@dataclass(frozen=True)
class Watching:
    """How a follower names itself in its log lines, e.g. "node watch"
    following "the Master's node list" for "the host routes", which "stay
    as they are"."""
    watch: str
    followed: str
    purpose: str
    keeps: str


def follow(stream: Callable[[], Iterable[T]], handle: Callable[[T], None], *, stop: threading.Event,
           backoff: Backoff, log: logging.Logger, names: Watching,
           on_open: Callable[[], None] | None = None) -> None:
    """Run until `stop` is set: every item of `stream()` to `handle`; after
    the stream ends or fails, `stream()` again after `backoff`. `on_open`
    runs before each new stream. Whoever sets `stop` must also end a
    stream that waits for the Master's next change (closing its client)."""
    down = False
    while not stop.is_set():
        got = 0
        try:
            if on_open is not None:
                on_open()
            for item in stream():
                if stop.is_set():
                    return
                handle(item)
                got += 1
                if down:
                    log.info("following %s again", names.followed)
                    down = False
            error = f"the Master ended the {names.watch}"
        except SodaError as exc:
            error = str(exc)
        except Exception as exc:        # a bug here must not end the following for good
            if stop.is_set():
                return
            log.exception("%s for %s failed", names.watch, names.purpose)
            error = f"{type(exc).__name__}: {exc}"
        if stop.is_set():
            return
        if got:
            backoff.reset()
        wait = backoff.next()
        if not down:
            log.warning("%s: %s; %s %s, watching again in %.1f s (and on, up to every %g s)",
                        names.watch, error, names.purpose, names.keeps, wait, backoff.cap)
            down = True
        else:
            log.debug("%s: %s; again in %.1f s", names.watch, error, wait)
        if stop.wait(wait):
            return
