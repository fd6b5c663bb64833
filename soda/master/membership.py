"""Membership: the background loop that notices physical nodes whose
heartbeats stopped and has their virtual nodes placed again. The decisions
are the Controller's (`check_membership`); this module only owns the timing.
"""

from __future__ import annotations

import logging
import threading

from soda.master.controller import Controller

log = logging.getLogger(__name__)


class MembershipLoop:
    def __init__(self, controller: Controller, interval: float = 1.0):
        self.controller = controller
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="membership", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.controller.check_membership()
            except Exception:  # noqa: BLE001 - the loop must outlive one bad pass
                log.exception("membership check failed; retrying in %.1f s", self.interval)
