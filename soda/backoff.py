"""Capped exponential backoff with jitter: how long to wait before the next
try of something that failed. The one definition every part uses: an Agent
reconnecting to its Master or restarting one of its threads, a virtual node
whose start failed, a Switch reopening its endpoint watch.
"""

from __future__ import annotations

import random
from typing import Callable


class Backoff:
    """Delays `first`, `first*factor`, ... up to `cap`, each spread by up to
    ±`jitter` (a fraction) so that many clients of one restarted server do
    not all come back in the same instant; `reset()` after a success."""

    def __init__(self, first: float = 0.2, cap: float = 5.0, factor: float = 2.0,
                 jitter: float = 0.2, rng: Callable[[], float] = random.random):
        self.first, self.cap, self.factor, self.jitter = first, cap, factor, jitter
        self._rng = rng
        self._current = first

    def next(self) -> float:
        delay = self._current
        self._current = min(self.cap, self._current * self.factor)
        return min(self.cap, delay * (1 - self.jitter + 2 * self.jitter * self._rng()))

    def reset(self) -> None:
        self._current = self.first
