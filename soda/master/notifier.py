"""Change notification inside the Master: watch streams sleep on a topic and
wake when a mutation publishes it. Topics are plain strings such as
"node:<name>" (a node's desired set), "service:<name>", "services",
"endpoints". Revisions only grow, so a watcher never misses a change that
happened between two of its reads.

Publish only what has committed: the Controller publishes a change of
stored state from its transaction's after-commit hook
(`Transaction.after_commit`), so a watcher is never woken by a change that
rolled back, and what it then reads (the store's committed state) is that
change or newer.
"""

from __future__ import annotations

import threading


class Notifier:
    """Each waiter sleeps on its own Event filed under its topic, so a
    publish wakes only the watchers of the topics it names (one Condition
    for all would wake every Agent's stream on every status report)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._revision = 0
        self._topics: dict[str, int] = {}
        self._waiters: dict[str, set[threading.Event]] = {}
        self._closed = False

    def publish(self, *topics: str) -> None:
        if not topics:
            return
        with self._lock:
            self._revision += 1
            for topic in topics:
                self._topics[topic] = self._revision
                for event in self._waiters.pop(topic, ()):
                    event.set()

    def revision(self, topic: str) -> int:
        with self._lock:
            return self._topics.get(topic, 0)

    def changed(self, prefix: str, since: int) -> list[str]:
        """The topics starting with `prefix` published after revision `since`."""
        with self._lock:
            return [topic for topic, revision in self._topics.items()
                    if revision > since and topic.startswith(prefix)]

    def wait(self, topic: str, seen: int, timeout: float) -> int:
        """Block until `topic` moves past `seen`, the timeout passes, or the
        notifier closes; return the topic's revision."""
        with self._lock:
            revision = self._topics.get(topic, 0)
            if revision > seen or self._closed:
                return revision
            event = threading.Event()
            self._waiters.setdefault(topic, set()).add(event)
        event.wait(timeout)
        with self._lock:
            waiters = self._waiters.get(topic)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[topic]
            return self._topics.get(topic, 0)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for waiters in self._waiters.values():
                for event in waiters:
                    event.set()
            self._waiters.clear()
