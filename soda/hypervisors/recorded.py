"""What the uml and qemu drivers share: guests that are host processes, each
described by a JSON record under the driver's state dir.

Owns reading those records and answering from them — `stop`, `list`,
`is_ready`, `info` — with the process identity of soda.hypervisors.process
and the readiness probe of soda.hypervisors.probe. A driver adds its VMM:
`identity`, `exit_markers`, `_record_path`, `console_path`, `_locked`,
`_teardown`, and optionally `_vm_ended` (a VMM that outlives its guest).
"""

from __future__ import annotations

import json
import logging
import os
import threading

from soda.hypervisors import process
from soda.hypervisors.base import EXITED, RUNNING, GuestInfo, HypervisorDriver, check_guest_name
from soda.hypervisors.probe import probe_tcp

log = logging.getLogger(__name__)


class RecordedGuestDriver(HypervisorDriver):
    identity: process.Identity
    exit_markers: tuple[str, ...] = ()
    # Set by subclasses' __init__: seconds a readiness probe may take, and the
    # (pid, start time) of guests already seen ready (a guest stays ready).
    probe_timeout: float
    _ready: set[tuple[int, int]]

    def stop(self, name: str, timeout: float) -> None:
        check_guest_name(name)
        with self._locked(name, remove=True):
            record = self._load(name)
            self._teardown(name, record, timeout)

    def list(self) -> dict[str, GuestInfo]:
        process.reap()
        try:
            entries = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return {}
        records = []
        for entry in entries:
            if entry.startswith((".", "_")) or "." in entry:
                continue
            record = self._load(entry)
            if record is not None:
                records.append(record)
        # Probe the guests not yet seen ready in parallel: each probe may
        # wait its whole timeout for a guest that is still booting.
        results: dict[str, GuestInfo] = {}
        threads = []
        for record in records:
            if self._alive(record) and process.key(record) not in self._ready:
                t = threading.Thread(target=lambda r=record: results.__setitem__(
                    r["name"], self._info(r, probe=True)), daemon=True)
                t.start()
                threads.append(t)
            else:
                results[record["name"]] = self._info(record, probe=False)
        for t in threads:
            t.join()
        return {r["name"]: results[r["name"]] for r in records if r["name"] in results}

    def is_ready(self, name: str) -> bool:
        check_guest_name(name)
        process.reap()
        record = self._load(name)
        if record is None or not self._alive(record):
            return False
        return self._probe_ready(record)

    def info(self, name: str) -> GuestInfo | None:
        check_guest_name(name)
        process.reap()
        record = self._load(name)
        return None if record is None else self._info(record, probe=False)

    # ---- records --------------------------------------------------------------
    def _load(self, name: str) -> dict | None:
        try:
            with open(self._record_path(name)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("unreadable record for %s guest %s: %s", self.name, name, e)
            return None

    def _alive(self, record: dict) -> bool:
        return self.identity.is_ours(record["pid"], record)

    def _vm_ended(self, record: dict) -> str:
        """"" while a live VMM may still run its guest, else why not."""
        return ""

    def _info(self, record: dict, probe: bool) -> GuestInfo:
        running = self._alive(record)
        reason = ""
        if running:
            reason = self._vm_ended(record)
            running = not reason
        ready = False
        if running:
            ready = process.key(record) in self._ready or (probe and self._probe_ready(record))
        if not running and not reason:
            reason = self._exit_reason(record)
        return GuestInfo(name=record["name"], state=RUNNING if running else EXITED,
                         pid=record["pid"], started_at=record.get("started_at", 0.0),
                         ready=ready, exit_reason=reason, generation=record.get("generation", 0))

    def _probe_ready(self, record: dict) -> bool:
        if process.key(record) in self._ready:
            return True
        spec = record["spec"]
        if probe_tcp(spec["address"], spec["port"], spec.get("netns", ""), self.probe_timeout):
            self._ready.add(process.key(record))
            return True
        return False

    def _exit_reason(self, record: dict) -> str:
        return process.exit_reason(record["pid"], self.console_path(record["name"]),
                                   self.exit_markers)
