"""The fake hypervisor driver: guests that are only files.

Owns `<state_dir>/fake/`: one JSON record per guest (`<name>.json`), the
persisted start counter (`_starts.json`, read by tests to prove that no
virtual node was started twice), and crash markers (`<name>.crash`) that any
process may create to make a running guest "die".

It behaves like a real driver where the Agent can tell the difference:
start and stop are idempotent, a new instance on the same dir finds (adopts)
the guests, readiness comes `boot_seconds` after start, and it can be told
to fail a start or to crash a guest. It runs no processes and needs no root,
so unit tests and scale simulations use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from soda.errors import CommandError, NotFound, WrongState
from soda.files import write_json_atomic
from soda.hypervisors.base import (EXITED, RUNNING, Clock, GuestInfo, GuestSpec, HypervisorDriver,
                                   check_guest_name, spec_as_dict)

log = logging.getLogger(__name__)

COUNTERS_FILE = "_starts.json"      # "_" is not allowed in a guest name: no clash
LOCK_FILE = "_lock"
CRASHED = "crashed"
# Fake pids are numbered from here so they never look like init or a kernel thread.
FAKE_PID_BASE = 100_000


@dataclass(frozen=True)
class FakeConfig:
    """The Agent config's `drivers: {fake: ...}` section."""
    boot_seconds: float = 0.2       # a guest is ready this long after start
    stop_seconds: float = 0.05      # a stop takes this long


class FakeDriver(HypervisorDriver):
    name = "fake"
    Config = FakeConfig
    disk_bound = False            # its guests never read their image
    plumbing = False              # nor have a network or a fence
    live_memory = True            # set_memory works on its pretend guests
    can_freeze = True             # freeze/thaw mark its pretend guests paused

    def __init__(self, state_dir: str, runner: Any = None, clock: Clock = time.time,
                 boot_seconds: float = 0.2, stop_seconds: float = 0.05,
                 fail_start: Iterable[str] = (), sleep=time.sleep):
        super().__init__(state_dir, runner, clock)
        self.boot_seconds = boot_seconds
        self.stop_seconds = stop_seconds
        # Guest names or fnmatch patterns whose start raises, like a VMM that
        # exits at once (bad image, no memory).
        self.fail_start = tuple(fail_start)
        self._sleep = sleep
        self.dir = os.path.join(state_dir, self.name)
        os.makedirs(self.dir, exist_ok=True)

    # ---- the driver interface ------------------------------------------
    def build_argv(self, spec: GuestSpec) -> list[str]:
        return ["fake-vmm", f"name={spec.name}", f"service={spec.service}",
                f"image={spec.image_path}", f"mem={spec.resources.memory}M",
                f"cpu={spec.resources.cpu:g}", f"ip={spec.address}/{spec.prefix_length}",
                f"gw={spec.gateway}", f"port={spec.port}"]

    def start(self, spec: GuestSpec) -> GuestInfo:
        check_guest_name(spec.name)
        argv = self.build_argv(spec)
        with self._locked():
            record = self._load(spec.name)
            if record is not None and record["state"] == RUNNING:
                return self._info(record)
            if any(fnmatch.fnmatchcase(spec.name, p) for p in self.fail_start):
                raise CommandError(argv, 1, err=f"fake driver told to fail starting {spec.name}")
            if not os.path.isfile(spec.image_path):
                raise NotFound(f"image {spec.image_path} for {spec.name} does not exist")
            counters = self._read_counters()
            counters["starts"][spec.name] = counters["starts"].get(spec.name, 0) + 1
            counters["last_pid"] += 1
            write_json_atomic(self._path(COUNTERS_FILE), counters)
            # A marker left from an earlier life must not kill the new guest.
            _unlink(self._marker(spec.name))
            record = {"name": spec.name, "state": RUNNING, "pid": FAKE_PID_BASE + counters["last_pid"],
                      "started_at": self.clock(), "exit_reason": "", "generation": spec.generation,
                      "argv": argv, "spec": spec_as_dict(spec)}
            write_json_atomic(self._record_path(spec.name), record)
        log.debug("fake guest %s started (start #%d)", spec.name, counters["starts"][spec.name])
        return self._info(record)

    def stop(self, name: str, timeout: float) -> None:
        check_guest_name(name)
        with self._locked():
            record = self._load(name)
        if record is None:
            return
        if record["state"] == RUNNING:
            # A real guest takes a while to halt; past `timeout` it is killed.
            self._sleep(min(self.stop_seconds, timeout))
            if self.stop_seconds > timeout:
                log.info("fake guest %s did not halt within %.1fs, forced", name, timeout)
        with self._locked():
            _unlink(self._record_path(name))
            _unlink(self._marker(name))

    def list(self) -> dict[str, GuestInfo]:
        guests = {}
        with self._locked():
            for entry in sorted(os.listdir(self.dir)):
                stem, ext = os.path.splitext(entry)
                if ext != ".json" or entry == COUNTERS_FILE or entry.startswith("."):
                    continue
                record = self._load(stem)
                if record is not None:
                    guests[stem] = self._info(record)
        return guests

    def is_ready(self, name: str) -> bool:
        info = self.info(name)
        return bool(info and info.ready)

    def info(self, name: str) -> GuestInfo | None:
        check_guest_name(name)
        with self._locked():
            record = self._load(name)
        return None if record is None else self._info(record)

    def set_memory(self, name: str, memory_mib: int) -> bool:
        """Like UML's: live within the memory the guest booted with."""
        check_guest_name(name)
        with self._locked():
            record = self._load(name)
            if record is None or record["state"] != RUNNING:
                raise NotFound(f"fake guest {name} is not running")
            booted = record["spec"]["resources"]["memory"]
            if memory_mib > booted:
                return False
            record["memory_mib"] = memory_mib
            write_json_atomic(self._record_path(name), record)
        return True

    def guest_oom_kills(self, name: str) -> int | None:
        with self._locked():
            record = self._load(name)
        if record is None or record["state"] != RUNNING:
            return None
        return record.get("oom_kills", 0)

    def oom_kill(self, name: str) -> None:
        """The guest's kernel kills one of its processes for memory (a test control)."""
        with self._locked():
            record = self._load(name)
            record["oom_kills"] = record.get("oom_kills", 0) + 1
            write_json_atomic(self._record_path(name), record)

    def memory(self, name: str) -> int:
        """The guest's memory now (a test control, like crash)."""
        with self._locked():
            record = self._load(name)
        return record.get("memory_mib", record["spec"]["resources"]["memory"])

    # ---- test controls ---------------------------------------------------
    def crash(self, name: str, reason: str = CRASHED) -> None:
        """Make a running guest exit, as if its VMM died."""
        check_guest_name(name)
        with self._locked():
            record = self._load(name)
            if record is None:
                raise NotFound(f"no fake guest {name}")
            record.update(state=EXITED, exit_reason=reason)
            write_json_atomic(self._record_path(name), record)

    def marker_path(self, name: str) -> str:
        """Create this file (from any process) to crash the guest."""
        return self._marker(check_guest_name(name))

    def start_counts(self) -> dict[str, int]:
        with self._locked():
            return dict(self._read_counters()["starts"])

    # ---- state files -----------------------------------------------------
    def _path(self, entry: str) -> str:
        return os.path.join(self.dir, entry)

    def _record_path(self, name: str) -> str:
        return self._path(f"{name}.json")

    def _marker(self, name: str) -> str:
        return self._path(f"{name}.crash")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # flock, not a threading.Lock: another FakeDriver instance (a second
        # Agent in a test, or a test process) may share the directory.
        with open(self._path(LOCK_FILE), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_counters(self) -> dict:
        try:
            with open(self._path(COUNTERS_FILE)) as f:
                return json.load(f)
        except FileNotFoundError:
            return {"starts": {}, "last_pid": 0}

    def _load(self, name: str) -> dict | None:
        """A guest's record, with a pending crash marker applied (lock held)."""
        try:
            with open(self._record_path(name)) as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        if record["state"] == RUNNING and os.path.exists(self._marker(name)):
            record.update(state=EXITED, exit_reason=CRASHED)
            write_json_atomic(self._record_path(name), record)
            _unlink(self._marker(name))
        return record

    def freeze(self, name: str) -> None:
        self._set_frozen(name, True)

    def thaw(self, name: str) -> None:
        self._set_frozen(name, False)

    def export_disk(self, name: str, path: str) -> None:
        """A pretend guest writes nothing: its disk is its image. (Its
        `migration` stays "": a plugin that builds on it may declare one.)"""
        check_guest_name(name)
        with self._locked():
            record = self._load(name)
        if record is None:
            raise NotFound(f"fake guest {name} does not exist")
        if record["state"] == RUNNING and not record.get("frozen"):
            raise WrongState(f"fake guest {name} runs: freeze it before its disk is copied")
        shutil.copyfile(record["spec"]["image_path"], path)

    def _set_frozen(self, name: str, frozen: bool) -> None:
        check_guest_name(name)
        with self._locked():
            record = self._load(name)
            if record is None or record["state"] != RUNNING:
                raise NotFound(f"fake guest {name} is not running")
            record["frozen"] = frozen
            write_json_atomic(self._record_path(name), record)

    def _info(self, record: dict) -> GuestInfo:
        running = record["state"] == RUNNING
        frozen = running and bool(record.get("frozen"))
        return GuestInfo(
            name=record["name"], state=record["state"], pid=record["pid"],
            started_at=record["started_at"],
            ready=running and not frozen and self.clock() - record["started_at"] >= self.boot_seconds,
            exit_reason=record["exit_reason"], generation=record.get("generation", 0), frozen=frozen)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
