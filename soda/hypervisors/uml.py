"""The User-Mode Linux driver: each virtual node is a `linux.uml` process.

Owns `<state_dir>/uml/`: per guest a directory `<name>/` holding its record
(`guest.json`: pid, the process's start time, argv, spec, generation, the
kernel it booted: path and kind, see `soda.hypervisors.kernels`) and its
console log (`console.log`), both root's, and `vmm/`, the VMM's uid's alone
(0700): its copy-on-write layer (`cow.img`, 0600, over the read-only cached
base image) and UML's own control dir (`<name>/mconsole`, `<name>/pid`, made
by UML under `uml_dir=`); plus a lock file `<name>.lock` beside it. When
that control socket's path would not fit a Unix socket address (108 bytes),
UML's dir moves to `/run/soda-uml/<hash>/` (the uid's too) and the record
says so. The guest's RAM is a file UML makes and unlinks in its TMPDIR:
`/dev/shm/soda-uml/<hash>/`, the uid's alone, removed with the guest.
Guests of Debian's kernel, which has hostfs, get an empty directory of
root's (0555; `hostfs_root`, default /var/lib/soda/empty-hostfs) as their
`hostfs=` root, so `mount -t hostfs none /mnt` in a guest shows nothing of
the host; SODA's own kernel is built without hostfs
(etc/guest-kernel/uml.config).

A guest is spawned through `soda.hypervisors.launch`, which joins the
guest's cgroups, enters its network namespace, turns off address-space
randomisation, drops to the guest's uid (no capabilities, no_new_privs) and
confines it with Landlock (where the host kernel has it) to the files
this guest needs: the kernel and its loader and libraries, its base image
and hostfs root to read, its own VMM dir, RAM dir and /dev/net/tun to
write; every other path of the host is refused to the VMM, so a guest of
Debian's kernel that mounts hostfs with `-o ../..` climbs out of the empty
root into nothing. Then it execs the kernel: the pid the driver records is
the VMM's from the first instruction. The VMM runs in a session of its own, so it
outlives the Agent; a restarted Agent (a new driver on the same dir) finds
it again from the record, and only a process whose start time and command
line still match the record counts as the guest.

Readiness is a TCP connect to the guest's address and port from inside its
network namespace. Stop asks the guest kernel to halt over the mconsole
socket, then sends SIGTERM and SIGKILL to the recorded pid only (through a
pidfd, after checking it is still ours), then kills the helper processes UML
left in the guest's session, then removes every file of the guest.

It does not create TAPs, namespaces or cgroups (the Agent and the Daemon
do), and it never signals a process it cannot prove it started.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from soda.errors import InvalidSpec, NotFound, SodaError, TemporaryError, WrongState
from soda.files import write_json_atomic
from soda.hypervisors import process
from soda.hypervisors.base import (check_guest_name, Clock, contract_arguments, Fingerprint,
                                   guest_mac, GuestSpec, TUN_DEVICE)
from soda.hypervisors.kernels import AUTO, DEBIAN, calibrated_lpj, find_uml_kernel
from soda.hypervisors.launch import landlock_abi
from soda.netns import NETNS_DIR
from soda.hypervisors.recorded import KILL_WAIT, RecordedGuestDriver, private_dir

log = logging.getLogger(__name__)

COW = "cow.img"
CONSOLE = "console.log"
DEFAULT_SHORT_DIR = "/run/soda-uml"
# Where guests' RAM files go (TMPDIR): a tmpfs, as UML itself prefers
# /dev/shm; one dir per guest below it, its uid's alone.
SHM_DIR = "/dev/shm/soda-uml"
DEFAULT_HOSTFS_ROOT = "/var/lib/soda/empty-hostfs"
# What a confined UML process may open besides its kernel's own files and
# its guest's: to read, the loader's cache, the host's entropy for its
# random device and the CPU's features (without them it picks the wrong way
# to save FP registers and the first process dies); to write, a pty pair,
# which it opens at boot to check that host ptys signal (SIGIO), and
# /dev/null, which every console of type null opens (without it the guest
# has no console and its init dies).
UML_READS = ("/etc/ld.so.cache", "/dev/urandom", "/dev/random", "/proc/cpuinfo")
UML_WRITES = ("/dev/ptmx", "/dev/pts", "/dev/null")
SUN_PATH_MAX = 107                   # sockaddr_un.sun_path is 108 bytes with its NUL
MCONSOLE_MAGIC = 0xCAFEBABE
MCONSOLE_VERSION = 2
MCONSOLE_MAX_DATA = 512
MCONSOLE_CLIENT_MAX = 24            # "mc-<pid>-<tid>" beside the guest's socket dir
MCONSOLE_TIMEOUT = 5.0               # a memory change or a /proc read answers in ms
# What a UML process needs above mem=: its kernel threads, page tables and
# the traced processes' own stacks. Idle guests measure 6-30 MiB in their
# memory cgroup in all; a memory cgroup that OOM-kills the main process can
# leave a helper spinning, so the margin is generous.
MEMORY_OVERHEAD = 32
# Console lines that explain why a guest died, most telling first.
# "ptrace set fp regs failed": a kernel whose FP register buffer is smaller
# than this CPU's XSAVE area (Debian's 6.1 on a CPU with AMX) kills its
# first process, then panics.
EXIT_MARKERS = ("soda-launch:", "ptrace set fp regs failed", "Kernel panic",
                "Cannot open root device", "Out of memory", "out of memory", "Killed process")


# Recognising, signalling and reaping the VMM's processes (soda.hypervisors.process;
# this driver's records keep the VMM's argv under "kernel_argv").
_identity = process.Identity("kernel_argv")
_is_ours, _signal_if_ours = _identity.is_ours, _identity.signal_if_ours
_session_members = _identity.session_members
_key, _reap, _proc_starttime = process.key, process.reap, process.proc_starttime


@dataclass(frozen=True)
class UmlConfig:
    """The Agent config's `drivers: {uml: ...}` section."""
    # "auto": SODA's own kernel (scripts/build-guest-kernel) when built, else
    # Debian's /usr/bin/linux.uml; or a kernel's path.
    kernel: str = AUTO
    # MiB each guest's UML process needs above its memory; 0 = the driver's
    # own figure (MEMORY_OVERHEAD). Placement and the Daemon's limit add it.
    memory_overhead: int = 0
    # An empty directory (made root's, 0555) that guests of Debian's kernel
    # get as their hostfs root instead of the host's /.
    hostfs_root: str = DEFAULT_HOSTFS_ROOT
    # Confine each guest's VMM with Landlock to its own files, where the
    # host kernel has Landlock (off: only to debug a VMM that fails to open
    # something).
    confine_files: bool = True


class UmlDriver(RecordedGuestDriver):
    Config = UmlConfig
    identity = _identity
    exit_markers = EXIT_MARKERS
    name = "uml"
    # UML's memory hot-unplug gives RAM back and takes it again, up to
    # what the guest booted with.
    live_memory = True
    # A UML guest is a tree of host processes (its tracer and the guest's
    # own): the fence's cgroup freezer holds them all (`freezer`).
    can_freeze = True
    # No live migration (UML cannot save a running kernel): a move freezes
    # the guest and carries its disk (its COW layer over the image).
    migration = "copy"
    memory_overhead = MEMORY_OVERHEAD

    default_short_dir = DEFAULT_SHORT_DIR

    def __init__(self, state_dir: str, runner: Any = None, clock: Clock = time.time,
                 kernel: str = AUTO, min_memory: int | None = None, shm_dir: str = SHM_DIR,
                 hostfs_root: str = DEFAULT_HOSTFS_ROOT, confine_files: bool = True,
                 **options: Any):
        """`options`: what every recorded driver takes (RecordedGuestDriver)."""
        super().__init__(state_dir, runner, clock, **options)
        self.shm_dir = shm_dir
        # The empty directory Debian's kernel gets as its hostfs root.
        self.hostfs_root = os.path.abspath(hostfs_root)
        # "auto": SODA's own kernel when one is built, else Debian's
        # (soda.hypervisors.kernels). Resolved once: every guest of this
        # driver boots the same kernel, and its record says which.
        found = find_uml_kernel(kernel)
        self.kernel = found.path
        self.kernel_kind = found.kind
        # Refuse what cannot boot instead of reporting a crash loop.
        self.min_memory = found.min_memory if min_memory is None else int(min_memory)
        self.kernel_label = f"{self.kernel} ({self.kernel_kind})"
        # SODA's kernel brings a systemd image to its service in seconds;
        # Debian's takes several times longer.
        self.boot_timeout = 120.0 if self.kernel_kind == DEBIAN else 60.0
        # What a guest's VMM may read of the host (None: not confined, the
        # host kernel has no Landlock): its kernel, the loader and the
        # libraries that kernel links.
        self.kernel_files: tuple[str, ...] | None = None
        if not confine_files:
            log.warning("uml guests are not confined to their own files (confine_files: false)")
        elif landlock_abi():
            self.kernel_files = (self.kernel, *linked_files(self.kernel), *UML_READS)
        elif self.kernel_kind == DEBIAN:
            log.warning("this host kernel has no Landlock: guests of %s are not confined to "
                        "their own files, and a guest's hostfs mount of -o ../.. reaches what "
                        "its uid may read on the host", self.kernel)
        # The delay loop (loops_per_jiffy) a guest measured; 0 until one did.
        self.lpj = 0
        log.info("uml guests boot %s (%s kernel, at least %d MiB)", self.kernel, self.kernel_kind,
                 self.min_memory)

    # ---- paths -----------------------------------------------------------
    def cow_path(self, name: str) -> str:
        return os.path.join(self.vmm_dir(name), COW)

    def tmp_dir(self, name: str) -> str:
        """The guest's TMPDIR, where UML makes (and unlinks) its RAM file."""
        digest = hashlib.sha256(os.path.abspath(self.guest_dir(name)).encode()).hexdigest()[:16]
        return os.path.join(self.shm_dir, digest)

    def console_path(self, name: str) -> str:
        return os.path.join(self.guest_dir(name), CONSOLE)

    def uml_dir(self, name: str) -> str:
        """Where UML makes `<name>/mconsole`: the VMM's dir in the guest's, or
        a short one under `short_dir` when that socket path would be too long."""
        own = self.vmm_dir(name) + "/"
        if _socket_paths_fit(own, name):
            return own
        digest = hashlib.sha256(os.path.abspath(self.guest_dir(name)).encode()).hexdigest()[:16]
        short = os.path.join(self.short_dir, digest) + "/"
        if not _socket_paths_fit(short, name):
            raise InvalidSpec(f"UML control socket path for {name} is too long even under "
                              f"{self.short_dir}")
        return short

    def mconsole_path(self, name: str, uml_dir: str | None = None) -> str:
        return os.path.join(uml_dir or self.uml_dir(name), name, "mconsole")


    # ---- the driver interface ------------------------------------------
    def build_argv(self, spec: GuestSpec) -> list[str]:
        check_guest_name(spec.name)
        self._check_spec(spec)
        argv = self._launcher_argv(spec, "--no-aslr", *self._confinement(spec))
        argv += [self.kernel,
                 f"ubd0={self.cow_path(spec.name)},{spec.image_path}",
                 f"mem={spec.resources.memory}M",
                 "root=/dev/ubda", "rw",
                 f"init={spec.init}",
                 f"umid={spec.name}",
                 f"uml_dir={self.uml_dir(spec.name)}"]
        if self.kernel_kind == DEBIAN:
            # Its hostfs would show the host's files to root in the guest.
            argv.append(f"hostfs={self.hostfs_root}")
        if spec.tap:
            argv.append(f"eth0=tuntap,{spec.tap},{guest_mac(spec.address)}")
        # con0 writes to fd 1, the launcher's log (a console on a closed
        # stdin would lose the guest's output); the other consoles exist,
        # on null channels, for images that run a getty or shell on tty1-6.
        argv += ["con=null", "con0=null,fd:1"]
        # No serial lines and no legacy ptys (SODA's kernel has neither).
        # Every tty device is a uevent, and Debian's kernel runs
        # /sbin/hotplug for each uevent (CONFIG_UEVENT_HELPER_PATH): at boot
        # its ~660 serial and legacy pty devices had up to 166 helper
        # threads alive at once (5 MiB), which at mem=32M met a 4 MiB
        # watermark boost and panicked "System is deadlocked on memory" in
        # 1-3 % of boots.
        if self.kernel_kind == DEBIAN:
            argv += ["ssl=none", "pty.legacy_count=0"]
        # A kernel measures its delay loop at boot unless told the figure:
        # 40-200 ms of a ~0.3 s boot at HZ=100, the more the busier the host.
        # One guest measures it for those after it.
        if self.lpj:
            argv.append(f"lpj={self.lpj}")
        argv += list(self.boot_options)
        return argv + contract_arguments(spec)

    def _confinement(self, spec: GuestSpec) -> list[str]:
        """The launcher's --fs-read/--fs-write for this guest: all it may open."""
        if self.kernel_files is None:
            return []
        reads = [*self.kernel_files, os.path.abspath(spec.image_path)]
        if self.kernel_kind == DEBIAN:
            reads.append(self.hostfs_root)
        writes = [self.vmm_dir(spec.name), self.uml_dir(spec.name).rstrip("/")]
        if os.path.isdir(os.path.dirname(self.shm_dir)):
            writes.append(self.tmp_dir(spec.name))
        if spec.tap:
            writes.append(TUN_DEVICE)
        writes += UML_WRITES
        return [*(f"--fs-read={p}" for p in dict.fromkeys(reads)),
                *(f"--fs-write={p}" for p in dict.fromkeys(writes))]

    def is_ready(self, name: str) -> bool:
        ready = super().is_ready(name)
        if ready:
            self._learn_lpj(name)
        return ready

    def _learn_lpj(self, name: str) -> None:
        """Keep the delay loop guest `name` measured at boot, if none is kept."""
        if not self.lpj:
            self.lpj = calibrated_lpj(self.console_path(name))
            if self.lpj:
                log.info("uml guests boot with lpj=%d, as %s measured it", self.lpj, name)

    # ---- memory, live ------------------------------------------------------
    def set_memory(self, name: str, memory_mib: int) -> bool:
        """Leave the guest `memory_mib` MiB of its RAM, without a restart.

        UML's memory hot-unplug (mconsole `config mem=-NM`,
        arch/um/drivers/mconsole_kern.c) takes N MiB of free pages from the
        guest kernel and hands them back to the host (MADV_REMOVE on the
        guest's memory file); `mem=+NM` returns them. So a guest can shrink
        and grow again up to the `mem=` it booted with, never past it. Its
        MemTotal stays what it booted with; MemFree, what it can still use,
        drops by what was taken. The record keeps how much is taken, so the
        request is a target and repeating it changes nothing.

        The kernel takes the pages with GFP_ATOMIC, reserves included:
        asking for more than the guest has free starves it (seen: a guest
        that stops answering). So the guest's MemFree is read first (mconsole
        `proc meminfo`) and a shrink that would leave it less than
        `_spare_mib` is refused (WrongState). Growth past the boot size
        answers False: that takes a new boot.
        """
        check_guest_name(name)
        with self._locked(name):
            record = self._load(name)
            if record is None or not self._alive(record):
                raise NotFound(f"uml guest {name} is not running")
            booted = record["spec"]["resources"]["memory"]
            if memory_mib > booted:
                return False
            taken = record.get("unplugged_mib", 0)
            delta = booted - memory_mib - taken       # > 0: take more; < 0: give back
            if delta == 0:
                return True
            uml_dir = record.get("uml_dir") or self.uml_dir(name)
            socket_path = self.mconsole_path(name, uml_dir)
            if delta > 0:
                free = self._guest_free_mib(name, socket_path, uml_dir)
                if free - delta < _spare_mib(booted):
                    raise WrongState(
                        f"uml guest {name} has {free} MiB free: it cannot give back {delta} MiB "
                        f"and keep {_spare_mib(booted)} MiB to run on (it can shrink to "
                        f"{max(0, booted - taken - max(0, free - _spare_mib(booted)))} MiB now)")
            command = f"config mem={'-' if delta > 0 else '+'}{abs(delta)}M"
            try:
                err, reply = mconsole(socket_path, command, client_dir=uml_dir,
                                      timeout=MCONSOLE_TIMEOUT)
            except OSError as e:
                raise TemporaryError(f"uml guest {name}: mconsole {command!r}: {e}") from None
            if err:
                raise TemporaryError(f"uml guest {name}: mconsole {command!r}: {reply}")
            record["unplugged_mib"] = booted - memory_mib
            write_json_atomic(self._record_path(name), record)
        log.info("uml guest %s: memory now %d of the %d MiB it booted with", name, memory_mib,
                 booted)
        return True

    def guest_oom_kills(self, name: str) -> int | None:
        """The guest kernel's oom_kill counter, read over mconsole `proc
        vmstat` (ms; None when the guest is down or does not answer)."""
        check_guest_name(name)
        record = self._load(name)
        if record is None or not self._alive(record):
            return None
        uml_dir = record.get("uml_dir") or self.uml_dir(name)
        try:
            # A report, asked with every heartbeat: a guest that does not
            # answer at once is skipped, not waited for.
            err, text = mconsole(self.mconsole_path(name, uml_dir), "proc vmstat",
                                 client_dir=uml_dir, timeout=1.0)
        except OSError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit() and not err:
                return int(value)
        return None

    def _guest_free_mib(self, name: str, socket_path: str, uml_dir: str) -> int:
        try:
            err, text = mconsole(socket_path, "proc meminfo", client_dir=uml_dir,
                                 timeout=MCONSOLE_TIMEOUT)
        except OSError as e:
            raise TemporaryError(f"uml guest {name}: cannot read its meminfo: {e}") from None
        free = parse_meminfo(text).get("MemFree")
        if err or free is None:
            raise TemporaryError(f"uml guest {name}: no MemFree in its meminfo ({text[:80]!r})")
        return free >> 20

    # ---- checks ----------------------------------------------------------
    def _check_spec(self, spec: GuestSpec) -> None:
        # Commas split UML's ubd0=COW,BASE; blanks would split the kernel
        # command line itself.
        self._check_command_line(spec, "this UML kernel needs to boot", "UML",
                                 (("image path", spec.image_path), ("state dir", self.state_dir),
                                  ("kernel", self.kernel), ("hostfs root", self.hostfs_root)))

    def fingerprint(self) -> Fingerprint:
        if not os.access(self.kernel, os.X_OK):
            return Fingerprint(False, f"UML kernel {self.kernel} is missing or not executable "
                                      "(Debian package user-mode-linux, or scripts/build-guest-kernel)")
        if not os.path.exists(TUN_DEVICE):
            return Fingerprint(False, f"no {TUN_DEVICE}: guests could have no network")
        return Fingerprint(True, attributes={"kernel_kind": self.kernel_kind})

    def _check_host(self, spec: GuestSpec) -> None:
        """Cheap checks that turn a certain boot failure into a clear error."""
        if not os.access(self.kernel, os.X_OK):
            raise NotFound(f"UML kernel {self.kernel} is missing or not executable")
        if not os.path.isfile(spec.image_path):
            raise NotFound(f"image {spec.image_path} for {spec.name} does not exist")
        self._check_reachable(spec, (("UML kernel", self.kernel, os.X_OK),
                                     ("image", spec.image_path, os.R_OK)))
        if spec.netns and not os.path.exists(os.path.join(NETNS_DIR, spec.netns)):
            raise NotFound(f"network namespace {spec.netns} for {spec.name} does not exist")
        for directory in spec.cgroups:
            if not os.path.isfile(os.path.join(directory, "cgroup.procs")):
                raise NotFound(f"cgroup {directory} for {spec.name} does not exist")

    # ---- records and processes --------------------------------------------
    def _prepare_files(self, spec: GuestSpec) -> dict:
        uml_dir = self.uml_dir(spec.name)
        if uml_dir.rstrip("/") != self.vmm_dir(spec.name):
            os.makedirs(self.short_dir, mode=0o755, exist_ok=True)
            private_dir(uml_dir.rstrip("/"), spec.uid)
        if self.kernel_kind == DEBIAN:
            _empty_root_dir(self.hostfs_root)
        fields = {"uml_dir": uml_dir}
        if os.path.isdir(os.path.dirname(self.shm_dir)):
            _root_dir(self.shm_dir, 0o755)
            tmp = self.tmp_dir(spec.name)
            private_dir(tmp, spec.uid)
            fields["tmpdir"] = tmp
        return fields

    def _vmm_environment(self, spec: GuestSpec, fields: dict) -> dict[str, str] | None:
        # UML reads TMP and TEMP before TMPDIR: only TMPDIR may say.
        env = {k: v for k, v in os.environ.items() if k not in ("TMP", "TEMP", "TMPDIR")}
        env["TMPDIR"] = fields.get("tmpdir") or self.vmm_dir(spec.name)
        return env

    def _record_fields(self, argv: list[str]) -> dict:
        return {"kernel_argv": _kernel_argv(argv),
                "kernel": {"path": self.kernel, "kind": self.kernel_kind}}

    def _after_kill(self, name: str, record: dict) -> None:
        self._learn_lpj(name)
        # UML's helpers (I/O threads, traced guest processes) can outlive a
        # killed main process, spinning and holding memory.
        helpers = _session_members(record)
        for helper in helpers:
            _signal_if_ours(helper, record, signal.SIGKILL)
        deadline = time.monotonic() + KILL_WAIT
        while helpers and time.monotonic() < deadline:
            _reap()
            helpers = [p for p in helpers if _is_ours(p, record, helper=True)]
            if helpers:
                self._sleep(0.01)
        if helpers:
            raise TemporaryError(f"uml guest {name}: helper processes {helpers} survived SIGKILL")
        uml_dir = record.get("uml_dir", "")
        if uml_dir and os.path.abspath(uml_dir).startswith(os.path.abspath(self.short_dir) + "/"):
            shutil.rmtree(uml_dir, ignore_errors=True)
        tmp = record.get("tmpdir", "")
        if tmp and os.path.abspath(tmp).startswith(os.path.abspath(self.shm_dir) + "/"):
            shutil.rmtree(tmp, ignore_errors=True)

    def _clean_unrecorded(self, name: str) -> None:
        # A start interrupted before it wrote a record may have left a short
        # UML dir and a TMPDIR.
        with contextlib.suppress(InvalidSpec):
            short = self.uml_dir(name)
            if short.startswith(self.short_dir.rstrip("/") + "/"):
                shutil.rmtree(short, ignore_errors=True)
        shutil.rmtree(self.tmp_dir(name), ignore_errors=True)

    def freeze(self, name: str) -> None:
        """Hold every process of the guest in its fence's cgroup freezer."""
        self._set_frozen(name, True, lambda record: self._freeze_fence(name, True))

    def thaw(self, name: str) -> None:
        self._set_frozen(name, False, lambda record: self._freeze_fence(name, False))

    def sync_disk(self, name: str) -> None:
        """The guest kernel's emergency sync (mconsole `sysrq s`), waited
        for until its console says it is complete (SYNC_WAIT at most: a
        guest that hides its kernel's messages is copied as it is)."""
        check_guest_name(name)
        record = self._load(name)
        if record is None or not self._alive(record):
            raise NotFound(f"uml guest {name} is not running")
        uml_dir = record.get("uml_dir") or self.uml_dir(name)
        console = self.console_path(name)
        seen = _size(console)
        try:
            err, reply = mconsole(self.mconsole_path(name, uml_dir), "sysrq s", client_dir=uml_dir,
                                  timeout=MCONSOLE_TIMEOUT)
        except OSError as e:
            raise TemporaryError(f"uml guest {name}: mconsole 'sysrq s': {e}") from None
        if err:
            raise TemporaryError(f"uml guest {name}: mconsole 'sysrq s': {reply}")
        deadline = time.monotonic() + SYNC_WAIT
        while time.monotonic() < deadline:
            if SYNC_DONE in _read_from(console, seen):
                return
            self._sleep(0.02)
        log.info("uml guest %s: no word of its sync within %g s: its disk is copied as it is", name,
                 SYNC_WAIT)

    def _write_disk(self, record: dict, path: str) -> None:
        """The image under the guest with its COW layer's sectors laid over it."""
        compose_cow(self.cow_path(record["name"]), record["spec"]["image_path"], path)

    def _freeze_fence(self, name: str, frozen: bool) -> None:
        if self.freezer is None:
            raise WrongState(f"uml guest {name} freezes in its fence (the Daemon's cgroup freezer), "
                             f"and this Agent has none")
        self.freezer(name, frozen)

    def _halt(self, record: dict, timeout: float) -> None:
        if record.get("frozen") and self.freezer is not None:
            # Held by the freezer it neither halts nor dies (v1 keeps even a
            # SIGKILL pending until thawed): let it go first.
            try:
                self.freezer(record["name"], False)
            except SodaError as exc:
                log.warning("uml guest %s: cannot thaw it to stop it: %s", record["name"], exc)
        if timeout <= 0:
            return
        deadline = time.monotonic() + timeout
        name = record["name"]
        uml_dir = record.get("uml_dir") or self.uml_dir(name)
        try:
            mconsole(self.mconsole_path(name, uml_dir), "halt", client_dir=uml_dir,
                     timeout=min(timeout, 1.0))
        except OSError as e:
            # No socket (not booted that far, or wedged) or no answer: if
            # the guest did not get the request, waiting is pointless.
            log.info("uml guest %s: halt over mconsole failed: %s", name, e)
            if not isinstance(e, TimeoutError):
                return
        self._wait_gone(record, max(0.0, deadline - time.monotonic()))

# ---- helpers (module level, so tests and other drivers can use them) -------

# UML's COW layer (arch/um/drivers/cow_user.c, version 3): a big-endian
# header (magic, version, mtime, disk size, sector size, alignment, format,
# the backing file's path), at the next multiple of the alignment a bitmap
# of the sectors written (bit i % 8 of byte i // 8 for sector i), then at
# the next multiple the data, each written sector at its own offset.
COW_MAGIC = 0x4F4F4F4D
_COW_V3 = struct.Struct(">IIIQIII4096s")
SYNC_DONE = b"Emergency Sync complete"
SYNC_WAIT = 5.0


def cow_sectors(cow: str) -> tuple[int, int, int, list[tuple[int, int]]]:
    """(disk size, sector size, data offset, [(first sector, count), ...])
    of the sectors a UML COW layer holds. A layer this cannot read is
    refused (InvalidSpec), never guessed at."""
    with open(cow, "rb") as f:
        head = f.read(_COW_V3.size)
        if len(head) < _COW_V3.size:
            raise InvalidSpec(f"{cow} is not a UML COW layer (too short)")
        magic, version, _, size, sector, align, _, _ = _COW_V3.unpack(head)
        if magic != COW_MAGIC or version != 3 or sector <= 0 or sector % 512 or align <= 0:
            raise InvalidSpec(f"{cow} is not a UML COW layer of version 3 "
                              f"(magic {magic:#x}, version {version})")
        sectors = -(-size // sector)
        bitmap_offset = -(-_COW_V3.size // align) * align
        bitmap_len = -(-sectors // 8)
        data_offset = -(-(bitmap_offset + bitmap_len) // align) * align
        f.seek(bitmap_offset)
        bitmap = f.read(bitmap_len)
    if len(bitmap) != bitmap_len:
        raise InvalidSpec(f"{cow}: its bitmap is cut short")
    runs: list[tuple[int, int]] = []
    for match in re.finditer(rb"[^\x00]+", bitmap):
        for byte in range(match.start(), match.end()):
            bits = bitmap[byte]
            for bit in range(8):
                if bits >> bit & 1:
                    i = byte * 8 + bit
                    if i >= sectors:
                        break
                    if runs and runs[-1][0] + runs[-1][1] == i:
                        runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                    else:
                        runs.append((i, 1))
    return size, sector, data_offset, runs


def compose_cow(cow: str, base: str, out: str) -> None:
    """Write to `out` (made anew, sparse) the disk a guest sees through
    the UML COW layer `cow` over the image `base`."""
    size, sector, data_offset, runs = cow_sectors(cow)
    if os.path.getsize(base) != size:
        raise InvalidSpec(f"{cow} is a layer of {size} bytes, its base {base} has "
                          f"{os.path.getsize(base)}")
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", base, out], check=True,
                   capture_output=True)
    with open(cow, "rb") as src, open(out, "r+b") as dst:
        for first, count in runs:
            left = count * sector
            offset = first * sector
            while left > 0:
                piece = min(left, 1 << 20)
                src.seek(data_offset + offset)
                data = src.read(piece)
                if len(data) != piece:
                    raise InvalidSpec(f"{cow}: sector data at {offset} is cut short")
                dst.seek(offset)
                dst.write(data)
                offset += piece
                left -= piece
        dst.truncate(size)
        dst.flush()
        os.fsync(dst.fileno())


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_from(path: str, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(1 << 20)
    except OSError:
        return b""


def _root_dir(path: str, mode: int) -> None:
    """`path` as root's directory with `mode`, made if missing; anything
    else there (a link, or a dir a VMM's uid made first in a world-writable
    parent such as /dev/shm) is refused."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise TemporaryError(f"{path} is not a directory of root's: remove it")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def _empty_root_dir(path: str) -> None:
    """An empty directory of root's that nobody may write (0555)."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    _root_dir(path, 0o555)
    if os.listdir(path):
        raise TemporaryError(f"{path}, the guests' hostfs root, is not empty: empty it")


def linked_files(binary: str) -> list[str]:
    """The loader and the shared libraries `binary` links (none for a
    static one), as ldd finds them on this host."""
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TemporaryError(f"cannot list the libraries of {binary}: {e}") from None
    files = []
    for line in out.splitlines():
        # "libc.so.6 => /lib/.../libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        path = line.partition("=>")[2] if "=>" in line else line
        path = path.strip().partition(" (")[0]
        if path.startswith("/"):
            files.append(path)
    return files


def _socket_paths_fit(uml_dir: str, name: str) -> bool:
    return (len(os.path.join(uml_dir, name, "mconsole")) <= SUN_PATH_MAX
            and len(uml_dir) + MCONSOLE_CLIENT_MAX <= SUN_PATH_MAX)


def _kernel_argv(argv: list[str]) -> list[str]:
    return argv[argv.index("--") + 1:]


def mconsole(socket_path: str, command: str, client_dir: str, timeout: float = 1.0) -> tuple[int, str]:
    """Send one command to a UML management console; returns (error, reply).

    The protocol (arch/um/include/shared/mconsole.h): a datagram
    `struct mc_request { u32 magic, version, len; char data[512]; }` in host
    byte order, answered by `struct mc_reply { u32 err, more, len; char
    data[512]; }` sent back to the client's address. The client binds a
    path, not an abstract address: abstract Unix addresses belong to a
    network namespace, and the guest's VMM may live in another one. The
    path is in `client_dir` (the guest's UML dir) and given to that dir's
    owner, the VMM's uid, which could not send its reply to root's socket.
    """
    data = command.encode()
    if len(data) >= MCONSOLE_MAX_DATA:
        raise ValueError(f"mconsole command too long: {command[:40]!r}...")
    client = os.path.join(client_dir, f"mc-{os.getpid()}-{threading.get_native_id() % 1000000}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(client)
        sock.bind(client)
        # The guest answers to this address as its own uid, which owns the
        # dir: it may write to a socket of its own only.
        owner = os.stat(client_dir)
        if owner.st_uid != os.geteuid():
            os.chown(client, owner.st_uid, owner.st_gid)
        sock.settimeout(timeout)
        sock.sendto(struct.pack("=III512s", MCONSOLE_MAGIC, MCONSOLE_VERSION, len(data), data),
                    socket_path)
        # A long answer (`proc FILE`) comes as several replies, each but
        # the last with `more` set.
        err, parts = 0, []
        while True:
            reply = sock.recv(12 + MCONSOLE_MAX_DATA)
            if len(reply) < 12:
                raise OSError(errno.EPROTO, f"short mconsole reply ({len(reply)} bytes)")
            err, more, length = struct.unpack_from("=III", reply)
            parts.append(reply[12:12 + length].split(b"\0", 1)[0])
            if not more:
                break
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(client)
    return err, b"".join(parts).decode(errors="replace")


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as {field: bytes}."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields = value.split()
        if fields and fields[0].isdigit():
            out[key.strip()] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def _spare_mib(booted_mib: int) -> int:
    """Free memory a shrunk guest keeps, so that it still runs: an eighth
    of its boot size, at least 8 MiB."""
    return max(8, booted_mib // 8)
