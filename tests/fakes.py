"""Fakes shared by the test tiers: a clock the test moves by hand, a
reporter that records what the Agent reports, and an image cache that hands
back one local file. Fakes used by a single test module stay in that module."""

from __future__ import annotations

import threading


class FakeClock:
    """A clock (and a matching `sleep`) that stands still until the test
    moves it, so backoffs and timeouts are checked without waiting."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class RecordingReporter:
    """Collects every status the reconciler reports, from any thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reports = []

    def report(self, statuses):
        with self.lock:
            self.reports.extend(statuses)

    def phases(self, name):
        with self.lock:
            return [s.phase for s in self.reports if s.name == name]

    def last(self, name):
        with self.lock:
            return [s for s in self.reports if s.name == name][-1]


class FakeImages:
    """An image cache that 'pulls' by recording the digest and returns one
    path, or raises `fail` when set."""

    def __init__(self, path, fail=None):
        self.path = path
        self.fail = fail
        self.pulled = []

    def ensure(self, digest, disk_mib=0):
        self.pulled.append(digest)
        if self.fail:
            raise self.fail
        return self.path
