"""What the uml and qemu drivers share: guests that are host processes, each
described by a JSON record under the driver's state dir.

Owns the two ladders every such driver climbs, and reading the records:

  start  check, lock, adopt a live guest or clear a dead one, prepare its
         files, launch the VMM with its console as output, record (pid,
         start time, argv) before anything else can happen, and kill a VMM
         that could not be recorded
  stop   ask the guest to halt, SIGTERM, SIGKILL — each only to the recorded
         pid after checking it is still ours — sweep what the VMM left,
         remove every file, the record last

and `list`, `is_ready`, `info` from the records, with the process identity
of soda.hypervisors.process and the readiness probe of
soda.hypervisors.probe. A driver adds what differs, as small hooks:
`identity`, `exit_markers`, `dir`, `console_path`, `build_argv`,
`_check_host`, `_prepare_files`, `_record_fields`, `_halt`, and optionally
`_after_kill`, `_clean_unrecorded`, `_vm_ended` (a VMM that outlives its
guest), `_vmm_environment`. Each guest lives in `dir/<name>/` with its record
`guest.json`, and `dir/<name>.lock` serialises what acts on it.

Guests are hostile, so a VMM runs as the uid in its spec (its service's on
this node), never root: the launcher drops to it with no capabilities and
`no_new_privs`, and sets its open-files limit. What the VMM may write lives
in `dir/<name>/vmm/`, owned by that uid and closed to everyone else (0700;
its disk layer 0600); the guest's dir, its record and console log stay
root's, so a VMM cannot rewrite the record the driver signals by. Before a
start the driver checks that the uid can reach what the VMM opens (its
binary, kernel, base image, its own dir) and says which directory is in
the way if not. Stopping stays root's: root signals any uid, and connects
to the sockets a VMM made.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

from soda.errors import CommandError, InvalidSpec, NotFound, TemporaryError, WrongState
from soda.files import remove_path, write_json_atomic
from soda.hypervisors import launch, process
from soda.hypervisors.base import (EXITED, RUNNING, Clock, GuestInfo, GuestSpec, HypervisorDriver,
                                   check_guest_name, spec_as_dict)
from soda.hypervisors.launch import GO
from soda.hypervisors.probe import PROBE_TIMEOUT, probe_tcp

log = logging.getLogger(__name__)

RECORD = "guest.json"
# Run as a script, without the site machinery (-I -S): see soda.hypervisors.launch.
LAUNCHER = os.path.abspath(launch.__file__)
TERM_GRACE = 2.0                     # after SIGTERM, before SIGKILL
KILL_WAIT = 5.0                      # after SIGKILL: a process dies at once unless stuck in D
UNSAYABLE = ", \t\n\"'"                 # split a VMM's option values or the kernel command line
VMM_DIR = "vmm"                      # in a guest's dir: what its VMM may write, the VMM's uid's alone


class RecordedGuestDriver(HypervisorDriver):
    identity: process.Identity
    exit_markers: tuple[str, ...] = ()
    default_short_dir: str = ""         # /run/soda-<driver>: short socket paths

    def __init__(self, state_dir: str, runner: Any = None, clock: Clock = time.time, *,
                 memory_overhead: int = 0, python: str | None = None, short_dir: str = "",
                 boot_options: tuple[str, ...] | list[str] = (),
                 probe_timeout: float = PROBE_TIMEOUT, term_grace: float = TERM_GRACE,
                 sleep: Callable[[float], None] = time.sleep):
        super().__init__(state_dir, runner, clock)
        # Absolute: the paths go on a command line and into records.
        self.dir = os.path.join(os.path.abspath(state_dir), self.name)
        # 0 = the driver's own figure (its class attribute).
        if memory_overhead:
            self.memory_overhead = int(memory_overhead)
        # The launcher must run with the Agent's interpreter (its venv).
        self.python = python or sys.executable
        # Where sockets go whose path under the guest dir would be too long.
        self.short_dir = short_dir or self.default_short_dir
        self.boot_options = tuple(boot_options)
        self.probe_timeout = probe_timeout
        self.term_grace = term_grace
        self._sleep = sleep
        # Guests seen serving once, by (pid, start time): readiness latches,
        # so list() does not probe every running guest on every call.
        self._ready: set[tuple[int, int]] = set()

    # ---- start: one ladder, hooks for what differs ----------------------------
    def start(self, spec: GuestSpec) -> GuestInfo:
        check_guest_name(spec.name)
        argv = self.build_argv(spec)
        name = spec.name
        with self._locked(name, remove=True):
            record = self._load(name)
            if record is not None and self._alive(record):
                return self._info(record, probe=False)
            self._check_host(spec)
            # A guest that died (or a start that was interrupted) leaves
            # processes and files behind: clear them, then boot afresh.
            self._teardown(name, record, timeout=0.0)
            os.makedirs(self.guest_dir(name), exist_ok=True)
            private_dir(self.vmm_dir(name), spec.uid)
            fields = self._prepare_files(spec)
            env = self._vmm_environment(spec, fields)
            with open(self.console_path(name), "ab") as console:
                console.write(f"soda: starting {name} at {time.strftime('%Y-%m-%dT%H:%M:%S')}"
                              f"{self._console_note()}\n".encode())
                console.flush()
                try:
                    # Launcher errors before its exec land in the console log
                    # too, where list() finds the reason.
                    # The launcher holds on its stdin until the record is
                    # written: if this process dies first, the pipe closes
                    # and the launcher exits instead of running a VMM that
                    # no record names (nothing could find or stop it).
                    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=console,
                                             stderr=console, close_fds=True,
                                             start_new_session=True, env=env)
                except OSError as e:
                    raise CommandError(argv, 127, err=f"cannot run the launcher: {e}") from None
            process.track(child)
            started_at = self.clock()
            try:
                starttime = process.proc_starttime(child.pid)
            except OSError:
                starttime = None
            if starttime is None:
                # Cannot happen for an unreaped child; refuse to record a
                # process we could not recognise later.
                child.stdin.close()
                child.kill()
                child.wait()
                raise CommandError(argv, -1, err="the launcher vanished before it was recorded")
            record = {"name": name, "pid": child.pid, "starttime": starttime,
                      "started_at": started_at, "argv": argv, "generation": spec.generation,
                      **fields, **self._record_fields(argv), "spec": spec_as_dict(spec)}
            try:
                write_json_atomic(self._record_path(name), record)
            except BaseException:
                # An unrecorded guest could never be found or stopped again.
                child.stdin.close()
                child.kill()
                child.wait()
                raise
            try:
                child.stdin.write(GO)
                child.stdin.close()
            except OSError:
                pass     # the launcher already failed: its console line says why
        log.info("%s guest %s started: pid %d%s", self.name, name, child.pid, self._console_note())
        return self._info(record, probe=False)

    def _launcher_argv(self, spec: GuestSpec, *options: str) -> list[str]:
        """The launcher's part of a guest's command line (soda.hypervisors.launch,
        with the Agent's interpreter): it joins the guest's cgroups and
        namespace, holds until start() has recorded it, sends its output to
        the console log, then execs the VMM's command line that follows."""
        argv = [self.python, "-I", "-S", LAUNCHER, "--hold"]
        if spec.netns:
            argv += ["--netns", spec.netns]
        for directory in spec.cgroups:
            argv += ["--cgroup", directory]
        argv += [*options, "--log", self.console_path(spec.name)]
        if spec.open_files:
            argv += ["--nofile", str(spec.open_files)]
        if spec.uid:
            argv += ["--user", str(spec.uid)]
        return argv + ["--"]

    def vmm_dir(self, name: str) -> str:
        """What the guest's VMM may write (its disk layer, sockets, temporary
        files): its uid's alone."""
        return os.path.join(self.guest_dir(name), VMM_DIR)

    def _vmm_environment(self, spec: GuestSpec, fields: dict) -> dict[str, str] | None:
        """The VMM's environment; None = the Agent's own."""
        return None

    def _check_reachable(self, spec: GuestSpec, paths: tuple[tuple[str, str, int], ...]) -> None:
        """WrongState unless the VMM's uid can reach each (what, path, access)
        of `paths` (os.R_OK, os.X_OK) and enter its own dir: saying which
        directory is in the way, before a boot that would fail on it."""
        if not spec.uid:
            return
        for what, path, access in (*paths, ("state dir", self.dir, os.X_OK)):
            problem = unreachable(path, spec.uid, spec.uid, access)
            if problem:
                raise WrongState(f"virtual node {spec.name}: its VMM runs as uid {spec.uid}, "
                                 f"which cannot {'read' if access == os.R_OK else 'reach'} the "
                                 f"{what} {path}: {problem}")

    def _check_host(self, spec: GuestSpec) -> None:
        """Cheap checks that turn a certain boot failure into a clear error."""

    def _check_command_line(self, spec: GuestSpec, floor_why: str, vmm: str,
                            paths: tuple[tuple[str, str], ...]) -> None:
        """Refuse a spec that cannot boot or cannot be said on the VMM's
        command line: memory below the floor, `paths` empty or holding a
        comma, quote or blank, fields of the guest's kernel command line
        with one, an init that is not absolute, a namespace name with '/'."""
        memory = spec.resources.memory
        if memory < self.min_memory:
            raise InvalidSpec(f"virtual node {spec.name}: memory {memory} MiB is below the "
                              f"{self.min_memory} MiB {floor_why}")
        for what, value in paths:
            if not value or any(c in value for c in UNSAYABLE):
                raise InvalidSpec(f"virtual node {spec.name}: {what} {value!r} cannot go on a "
                                  f"{vmm} command line (empty, or has a comma, quote or blank)")
        for what, value in (("init", spec.init), ("TAP", spec.tap), ("service", spec.service),
                            ("address", spec.address), ("gateway", spec.gateway)):
            if any(c in value for c in UNSAYABLE):
                raise InvalidSpec(f"virtual node {spec.name}: {what} {value!r} has a comma, "
                                  f"quote or blank")
        if not spec.init.startswith("/"):
            raise InvalidSpec(f"virtual node {spec.name}: init {spec.init!r} is not an absolute path")
        if spec.netns and ("/" in spec.netns or spec.netns in (".", "..")):
            raise InvalidSpec(f"virtual node {spec.name}: bad network namespace {spec.netns!r}")

    def _prepare_files(self, spec: GuestSpec) -> dict:
        """What the guest needs before its VMM starts (its dir exists);
        returns fields for its record."""
        return {}

    def _record_fields(self, argv: list[str]) -> dict:
        """Fields of the record that say which VMM this is (its identity's
        argv key, its kernel)."""
        return {}

    def _console_note(self) -> str:
        """Said after the start line in the console log and the Agent's."""
        return ""

    # ---- stop: one ladder, hooks for what differs -----------------------------
    def _teardown(self, name: str, record: dict | None, timeout: float) -> None:
        """Halt, then force, then sweep, then remove every file (lock held)."""
        if record is not None:
            pid = record["pid"]
            if self._alive(record):
                self._halt(record, timeout)
            if self._alive(record):
                log.info("%s guest %s (pid %d) did not stop within %.1fs: SIGTERM", self.name,
                         name, pid, timeout)
                self.identity.signal_if_ours(pid, record, signal.SIGTERM)
                self._wait_gone(record, self.term_grace)
            if self._alive(record):
                log.warning("%s guest %s (pid %d) ignored SIGTERM: SIGKILL", self.name, name, pid)
                self.identity.signal_if_ours(pid, record, signal.SIGKILL)
                self._wait_gone(record, KILL_WAIT)
            if self._alive(record):
                raise TemporaryError(f"{self.name} guest {name} (pid {pid}) survived SIGKILL")
            self._after_kill(name, record)
            process.reap()
        else:
            self._clean_unrecorded(name)
        # The record goes last, so a stop that fails above can be retried.
        self._remove_guest_dir(name)

    def _halt(self, record: dict, timeout: float) -> None:
        """Ask the guest to stop by itself within `timeout` (0: do not ask)."""

    def _after_kill(self, name: str, record: dict) -> None:
        """Sweep what the dead VMM left outside the guest's dir."""

    def _clean_unrecorded(self, name: str) -> None:
        """What a start interrupted before it wrote a record may have left
        outside the guest's dir."""

    def _wait_gone(self, record: dict, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            process.reap()
            if not self._alive(record) or time.monotonic() >= deadline:
                return
            self._sleep(0.01)

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
    def guest_dir(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _record_path(self, name: str) -> str:
        return os.path.join(self.guest_dir(name), RECORD)

    def _lock_path(self, name: str) -> str:
        # A DNS label has no ".": "<name>.lock" never clashes with a guest dir.
        return os.path.join(self.dir, f"{name}.lock")

    def _remove_guest_dir(self, name: str) -> None:
        """Everything in the guest's dir, its record last: a removal that
        fails half way leaves the record, so the stop can be retried."""
        directory = self.guest_dir(name)
        if not os.path.isdir(directory):
            return
        for entry in os.listdir(directory):
            if entry != RECORD:
                remove_path(os.path.join(directory, entry))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, RECORD))
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(directory)

    @contextlib.contextmanager
    def _locked(self, name: str, remove: bool = False) -> Iterator[None]:
        """A per-guest flock (another Agent thread or driver instance may act
        on the same guest). With `remove`, the lock file goes on release if
        the guest has no record."""
        os.makedirs(self.dir, exist_ok=True)
        path = self._lock_path(name)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                # Someone may have removed the file while we waited for it:
                # then our lock guards nothing; take the new file's.
                try:
                    same = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)
        try:
            yield
        finally:
            # Gone with the guest, or with a start that failed before it
            # recorded one: nothing of an absent guest stays behind.
            if remove and not os.path.exists(self._record_path(name)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            os.close(fd)

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
        frozen = running and bool(record.get("frozen"))
        if running and not frozen:
            ready = process.key(record) in self._ready or (probe and self._probe_ready(record))
        if not running and not reason:
            reason = self._exit_reason(record)
        return GuestInfo(name=record["name"], state=RUNNING if running else EXITED,
                         pid=record["pid"], started_at=record.get("started_at", 0.0),
                         ready=ready, exit_reason=reason, generation=record.get("generation", 0),
                         frozen=frozen)

    def export_disk(self, name: str, path: str) -> None:
        check_guest_name(name)
        record = self._load(name)
        if record is None:
            raise NotFound(f"{self.name} guest {name} does not exist")
        if self._alive(record) and not record.get("frozen"):
            raise WrongState(f"{self.name} guest {name} runs: freeze it before its disk is copied")
        self._write_disk(record, path)

    def _write_disk(self, record: dict, path: str) -> None:
        """export_disk of the guest of `record` (frozen or stopped)."""
        raise WrongState(f"the {self.name} driver cannot carry a guest's disk to another node")

    def _set_frozen(self, name: str, frozen: bool, act: Callable[[dict], None]) -> None:
        """freeze()/thaw() of a driver whose VMM pauses in place: `act(record)`
        pauses or resumes the VMM; the record keeps the state, so that it
        outlives the Agent. A thawed guest is probed again before it counts
        as ready."""
        check_guest_name(name)
        with self._locked(name):
            record = self._load(name)
            if record is None:
                raise NotFound(f"no {self.name} guest {name}")
            if not self._alive(record):
                raise WrongState(f"{self.name} guest {name} is not running")
            if bool(record.get("frozen")) == frozen:
                return
            act(record)
            record["frozen"] = frozen
            write_json_atomic(self._record_path(name), record)
            if not frozen:
                self._ready.discard(process.key(record))
        log.info("%s guest %s %s", self.name, name, "frozen" if frozen else "thawed")

    def _probe_ready(self, record: dict) -> bool:
        if process.key(record) in self._ready:
            return True
        spec = record["spec"]
        if probe_tcp(spec["address"], spec["port"], spec.get("netns", ""), self.probe_timeout):
            self._ready.add(process.key(record))
            return True
        return False

    def _exit_reason(self, record: dict) -> str:
        return process.exit_reason(record, self.console_path(record["name"]),
                                   self.exit_markers)


# ---- ownership (module level: the drivers share it) ---------------------------

def private_dir(path: str, uid: int) -> None:
    """`path` as a directory of `uid`'s alone (0700; the driver's own when
    uid is 0), made if missing. Refuses anything but a directory there (a
    link a VMM left could point anywhere)."""
    uid = uid or os.geteuid()
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise TemporaryError(f"{path} is not a directory: remove it")
    if st.st_uid != uid or (uid != os.geteuid() and st.st_gid != uid):
        os.chown(path, uid, uid, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)


def private_file(path: str, uid: int, mode: int = 0o600) -> None:
    """`path`, an existing file, `uid`'s alone (the driver's own when uid is 0)."""
    if uid:
        os.chown(path, uid, uid, follow_symlinks=False)
    os.chmod(path, mode)


def unreachable(path: str, uid: int, gid: int, access: int) -> str:
    """"" when uid:gid (with no other group) can reach `path` with `access`
    (os.R_OK, os.W_OK, os.X_OK) by its modes and owners, else what is in the
    way: the first directory it may not enter, or the file itself. ACLs and
    mounts are not looked at: a refusal here is certain, a pass likely."""
    path = os.path.realpath(path)
    parts = path.strip("/").split("/") if path != "/" else []
    current = "/"
    for part in ["", *parts[:-1]]:
        current = os.path.join(current, part) if part else "/"
        problem = _denied(current, uid, gid, os.X_OK)
        if problem:
            return problem
    return _denied(path, uid, gid, access)


def _denied(path: str, uid: int, gid: int, access: int) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as e:
        return f"{path}: {e.strerror}"
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
    if (stat.S_IMODE(st.st_mode) >> shift) & access == access:
        return ""
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
    return (f"{kind} {path} is {stat.S_IMODE(st.st_mode):04o} {st.st_uid}:{st.st_gid} "
            f"(it needs o+{'x' if access == os.X_OK else 'r' if access == os.R_OK else 'w'})")
