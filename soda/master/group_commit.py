"""Group commit: units of work that many threads ask for at once, run in
one transaction of the store by one of those threads.

The Master's status reports come from every Agent at once, each a small
unit of work. One transaction each made every report queue for the store's
write lock, and every hand-over of that lock is a thread switch under the
GIL: about a fifth of the Master's CPU went into handing the lock on (see
bench/control_plane.py --profile). Here the first thread to arrive leads:
it takes every unit queued by then, runs each in its own part of one
transaction (`Transaction.part`: a unit that raises is undone alone and
its caller gets the exception), commits once and wakes the others with
their results. If more arrived meanwhile, the first of them leads next, so
no caller serves others for ever.

A unit's result is what it would have been alone: its reads see the writes
of the units before it in the batch, as they would have if those had
committed first, and its after-commit callbacks run once the batch has
committed, in order.
"""

from __future__ import annotations

import threading
from typing import Callable, ContextManager, Generic, TypeVar

from soda.master.store import Transaction

T = TypeVar("T")

# Units in one transaction at most: a bound on how long a batch holds the
# store's write lock (a report is ~0.3 ms of work).
MAX_BATCH = 128


class _Unit(Generic[T]):
    __slots__ = ("work", "value", "error", "woken", "leads")

    def __init__(self, work: Callable[[Transaction], T]):
        self.work = work
        self.value: T | None = None
        self.error: BaseException | None = None
        self.woken = threading.Event()
        self.leads = False          # woken to lead the next batch, not done

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value


class GroupCommit:
    """`run(work)` like `with transaction() as tx: return work(tx)`, but
    committed together with the units other threads run meanwhile.
    `transaction` opens one on the store (StateStore.transaction)."""

    def __init__(self, transaction: Callable[[], ContextManager[Transaction]], max_batch: int = MAX_BATCH):
        self._transaction = transaction
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Unit] = []
        self._leading = False
        self._running = threading.local()   # set while this thread runs units

    def run(self, work: Callable[[Transaction], T]) -> T:
        if getattr(self._running, "yes", False):
            # It would wait for the batch its own thread is running.
            raise RuntimeError("a unit of work does not nest")
        unit = _Unit(work)
        with self._lock:
            self._queue.append(unit)
            lead = not self._leading
            self._leading = True
        if not lead:
            unit.woken.wait()
            if not unit.leads:
                return unit.outcome()
        with self._lock:
            batch = self._queue[:self._max_batch]
            del self._queue[:self._max_batch]
        try:
            self._commit(batch)
        finally:
            with self._lock:
                if self._queue:
                    self._queue[0].leads = True
                    self._queue[0].woken.set()
                else:
                    self._leading = False
            for other in batch:
                if other is not unit:
                    other.woken.set()
        return unit.outcome()

    def _commit(self, batch: list[_Unit]) -> None:
        self._running.yes = True
        try:
            with self._transaction() as tx:
                for unit in batch:
                    try:
                        with tx.part():
                            unit.value = unit.work(tx)
                    except Exception as exc:     # this unit's alone: the others go on
                        unit.error = exc
        except BaseException as exc:
            # The transaction itself failed (or an after-commit callback
            # raised): every unit that had not failed by itself gets that.
            for unit in batch:
                if unit.error is None:
                    unit.value, unit.error = None, exc
            if not isinstance(exc, Exception):
                raise
        finally:
            self._running.yes = False
