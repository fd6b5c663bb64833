"""Change notification inside the Master: watch streams sleep on a topic and
wake when a mutation publishes it. Topics are plain strings such as
"node:<name>" (a node's desired set), "service:<name>", "services",
"endpoints". Revisions only grow, so a watcher never misses a change that
happened between two of its reads.
"""

from __future__ import annotations

import threading


class Notifier:
    def __init__(self):
        self._cond = threading.Condition()
        self._revision = 0
        self._topics: dict[str, int] = {}
        self._closed = False

    def publish(self, *topics: str) -> None:
        if not topics:
            return
        with self._cond:
            self._revision += 1
            for topic in topics:
                self._topics[topic] = self._revision
            self._cond.notify_all()

    def revision(self, topic: str) -> int:
        with self._cond:
            return self._topics.get(topic, 0)

    def wait(self, topic: str, seen: int, timeout: float) -> int:
        """Block until `topic` moves past `seen`, the timeout passes, or the
        notifier closes; return the topic's revision."""
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._topics.get(topic, 0) > seen, timeout)
            return self._topics.get(topic, 0)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
