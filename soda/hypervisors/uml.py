"""The User-Mode Linux driver: each virtual node is a `linux.uml` process.

Owns `<state_dir>/uml/`: per guest a directory `<name>/` holding its record
(`guest.json`: pid, the process's start time, argv, spec, generation, the
kernel it booted: path and kind, see `soda.hypervisors.kernels`), its
copy-on-write layer (`cow.img`, over the read-only cached base image), its
console log (`console.log`) and UML's own control dir (`<name>/mconsole`,
`<name>/pid`, made by UML under `uml_dir=`), plus a lock file `<name>.lock`
beside it. When that control socket's path would not fit a Unix socket
address (108 bytes), UML's dir moves to `/run/soda-uml/<hash>/` and the
record says so.

A guest is spawned through `soda.hypervisors.launch`, which joins the
guest's cgroups, enters its network namespace, turns off address-space
randomisation and execs the kernel: the pid the driver records is the VMM's
from the first instruction. The VMM runs in a session of its own, so it
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
import shutil
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from soda.errors import InvalidSpec, NotFound, TemporaryError, WrongState
from soda.files import write_json_atomic
from soda.hypervisors import process
from soda.hypervisors.base import (check_guest_name, Clock, Fingerprint, guest_mac, GuestSpec,
                                   TUN_DEVICE)
from soda.hypervisors.kernels import AUTO, calibrated_lpj, find_uml_kernel
from soda.netns import NETNS_DIR
from soda.hypervisors.recorded import KILL_WAIT, RecordedGuestDriver

log = logging.getLogger(__name__)

COW = "cow.img"
CONSOLE = "console.log"
DEFAULT_SHORT_DIR = "/run/soda-uml"
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
EXIT_MARKERS = ("soda-launch:", "Kernel panic", "Cannot open root device", "Out of memory",
                "out of memory", "Killed process")


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


class UmlDriver(RecordedGuestDriver):
    Config = UmlConfig
    identity = _identity
    exit_markers = EXIT_MARKERS
    name = "uml"
    # UML's memory hot-unplug gives RAM back and takes it again, up to
    # what the guest booted with.
    live_memory = True
    memory_overhead = MEMORY_OVERHEAD

    default_short_dir = DEFAULT_SHORT_DIR

    def __init__(self, state_dir: str, runner: Any = None, clock: Clock = time.time,
                 kernel: str = AUTO, min_memory: int | None = None, **options: Any):
        """`options`: what every recorded driver takes (RecordedGuestDriver)."""
        super().__init__(state_dir, runner, clock, **options)
        # "auto": SODA's own kernel when one is built, else Debian's
        # (soda.hypervisors.kernels). Resolved once: every guest of this
        # driver boots the same kernel, and its record says which.
        found = find_uml_kernel(kernel)
        self.kernel = found.path
        self.kernel_kind = found.kind
        # Refuse what cannot boot instead of reporting a crash loop.
        self.min_memory = found.min_memory if min_memory is None else int(min_memory)
        self.kernel_label = f"{self.kernel} ({self.kernel_kind})"
        # The delay loop (loops_per_jiffy) a guest measured; 0 until one did.
        self.lpj = 0
        log.info("uml guests boot %s (%s kernel, at least %d MiB)", self.kernel, self.kernel_kind,
                 self.min_memory)

    # ---- paths -----------------------------------------------------------
    def cow_path(self, name: str) -> str:
        return os.path.join(self.guest_dir(name), COW)

    def console_path(self, name: str) -> str:
        return os.path.join(self.guest_dir(name), CONSOLE)

    def uml_dir(self, name: str) -> str:
        """Where UML makes `<name>/mconsole`: the guest's own dir, or a short
        one under `short_dir` when that socket path would be too long."""
        own = self.guest_dir(name) + "/"
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
        argv = self._launcher_argv(spec, "--no-aslr")
        argv += [self.kernel,
                 f"ubd0={self.cow_path(spec.name)},{spec.image_path}",
                 f"mem={spec.resources.memory}M",
                 "root=/dev/ubda", "rw",
                 f"init={spec.init}",
                 f"umid={spec.name}",
                 f"uml_dir={self.uml_dir(spec.name)}"]
        if spec.tap:
            argv.append(f"eth0=tuntap,{spec.tap},{guest_mac(spec.address)}")
        # con0 writes to fd 1, the launcher's log (a console on a closed
        # stdin would lose the guest's output); the other consoles exist,
        # on null channels, for images that run a getty or shell on tty1-6.
        argv += ["con=null", "con0=null,fd:1"]
        # No serial lines and no legacy ptys. Every tty device is a uevent,
        # and Debian's kernel runs /sbin/hotplug for each uevent
        # (CONFIG_UEVENT_HELPER_PATH): at boot its ~660 serial and legacy
        # pty devices had up to 166 helper threads alive at once (5 MiB),
        # which at mem=32M met a 4 MiB watermark boost and panicked "System
        # is deadlocked on memory" in 1-3 % of boots.
        argv += ["ssl=none", "pty.legacy_count=0"]
        # A kernel measures its delay loop at boot unless told the figure:
        # 40-200 ms of a ~0.3 s boot at HZ=100, the more the busier the host.
        # One guest measures it for those after it.
        if self.lpj:
            argv.append(f"lpj={self.lpj}")
        argv += list(self.boot_options)
        argv += [f"soda.ip={spec.address}/{spec.prefix_length}",
                 f"soda.gw={spec.gateway}",
                 f"soda.name={spec.name}",
                 f"soda.service={spec.service}"]
        return argv

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
                                  ("kernel", self.kernel)))

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
        if spec.netns and not os.path.exists(os.path.join(NETNS_DIR, spec.netns)):
            raise NotFound(f"network namespace {spec.netns} for {spec.name} does not exist")
        for directory in spec.cgroups:
            if not os.path.isfile(os.path.join(directory, "cgroup.procs")):
                raise NotFound(f"cgroup {directory} for {spec.name} does not exist")

    # ---- records and processes --------------------------------------------
    def _prepare_files(self, spec: GuestSpec) -> dict:
        uml_dir = self.uml_dir(spec.name)
        os.makedirs(uml_dir, exist_ok=True)
        return {"uml_dir": uml_dir}

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

    def _clean_unrecorded(self, name: str) -> None:
        # A start interrupted before it wrote a record may have left a short UML dir.
        with contextlib.suppress(InvalidSpec):
            short = self.uml_dir(name)
            if short.startswith(self.short_dir.rstrip("/") + "/"):
                shutil.rmtree(short, ignore_errors=True)

    def _halt(self, record: dict, timeout: float) -> None:
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
    network namespace, and the guest's VMM may live in another one.
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
