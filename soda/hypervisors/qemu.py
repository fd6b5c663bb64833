"""The QEMU driver: each virtual node is a `qemu-system-x86_64` process.

Owns `<state_dir>/qemu/`: per guest a directory `<name>/` holding its record
(`guest.json`: pid, the process's start time, argv, spec, generation, the
kernel, initramfs and accelerator it booted with, root's), its console log
(`console.log`: the serial console and the launcher's and QEMU's own
messages; the VMM's uid's, 0600, since QEMU opens it itself) and `vmm/`, the
VMM's uid's alone (0700): its disk (`overlay.qcow2`, 0600, a qcow2 layer
whose backing file is the read-only cached base image) and its QMP socket
(`qmp.sock`); plus a lock file `<name>.lock` beside it. When the socket's
path would not fit a Unix socket address it moves to
`/run/soda-qemu/<hash>/qmp.sock` (that dir the uid's too) and the record
says so.
`_initramfs/` caches the initramfs built by data/build-initramfs for the
kernel in use (when the driver is told to find it itself).

Guests boot Debian's kernel directly (`-kernel`, `-initrd`, `-append`): the
initramfs loads the virtio and ext4 modules and switch_roots into the
image's init, which reads the soda.* contract from /proc/cmdline. TCG is the
accelerator unless a bounded probe shows KVM really runs a kernel here.

A guest is spawned through `soda.hypervisors.launch` (cgroups, network
namespace, the drop to the guest's uid with no capabilities and
no_new_privs, then exec): the recorded pid is QEMU's from its first
instruction, in a session of its own, so it outlives the Agent. QEMU also
confines itself with `-sandbox` (seccomp: no obsolete system calls, no
setuid and the like, no fork or exec, no scheduler or CPU affinity
changes) when this QEMU has it, as the fingerprint's `sandbox` attribute
says. A new
driver on the same dir adopts it from the record; only a process whose start
time and command line match the record counts, and QMP `query-status` must
agree that the VM has not ended.

Readiness is a TCP connect to the guest's service port from inside its
network namespace (soda.hypervisors.probe). Stop asks over QMP
(`system_powerdown`; the reference guest ignores ACPI, so after a short
wait `quit`), then SIGTERM and SIGKILL to the recorded pid only (through a
pidfd, after checking it is still ours), then removes every file of the
guest. `freeze`/`thaw` pause and resume the VM (QMP `stop`/`cont`).

It does not create TAPs, namespaces or cgroups (the Agent and the Daemon
do), and it never signals a process it cannot prove it started.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import select
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from soda import command
from soda.errors import InvalidSpec, NotFound, WrongState
from soda.hypervisors import process
from soda.hypervisors.base import check_guest_name, Clock, contract_arguments, Fingerprint, guest_mac, GuestSpec, TUN_DEVICE
from soda.hypervisors.kernels import AUTO
from soda.netns import NETNS_DIR
from soda.hypervisors.recorded import RecordedGuestDriver, private_dir, private_file
from soda.hypervisors.qmp import qmp

log = logging.getLogger(__name__)

OVERLAY = "overlay.qcow2"
CONSOLE = "console.log"
QMP_SOCKET = "qmp.sock"
INITRAMFS_DIR = "_initramfs"          # "_" is not allowed in a guest name: no clash
QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
DEFAULT_SHORT_DIR = "/run/soda-qemu"
SUN_PATH_MAX = 107
# The smallest -m (MiB) a QEMU guest may have, enforced by build_argv/start
# (InvalidSpec) and exposed as QemuDriver.min_memory for admission. Measured
# with Debian's 6.1 kernel, scripts/build-initramfs and the reference image
# (TCG, pc): 64 resets before the first console line, 80 and 84 panic
# unpacking the initramfs ("System is deadlocked on memory"), 88 and 92 boot
# to the service; 96 keeps headroom above that edge.
MIN_MEMORY = 96
# What a QEMU process needs above -m: its device model and, under TCG, the
# translation cache (190-220 MiB RSS measured at -m 128M).
MEMORY_OVERHEAD = 160
QMP_TIMEOUT = 2.0
POWERDOWN_GRACE = 1.0                 # after system_powerdown, before quit
KVM_PROBE_SECONDS = 2.0
# QEMU's own seccomp filter, on top of the launcher's drop: deny what a
# device model never needs (obsolete calls, set*id, fork/exec, sched/affinity).
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
SANDBOX_PROBE_SECONDS = 10.0
# The initramfs builder ships inside the package (package data), so an
# installed SODA builds it as a checkout does.
BUILD_INITRAMFS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "build-initramfs")
# Console lines that explain why a guest died, most telling first.
EXIT_MARKERS = ("soda-launch:", "soda-initramfs:", "qemu-system-x86_64:", "Kernel panic",
                "Out of memory", "out of memory", "Killed process")
# QMP run states after which the VM will not run its guest again.
ENDED_STATES = ("shutdown", "guest-panicked", "internal-error", "io-error")

# Recognising, signalling and reaping the VMM (soda.hypervisors.process; this
# driver's records keep QEMU's own argv under "vmm_argv").
_identity = process.Identity("vmm_argv")
_is_ours, _signal_if_ours = _identity.is_ours, _identity.signal_if_ours
_key, _reap, _proc_starttime = process.key, process.reap, process.proc_starttime
_kvm_verdicts: dict[tuple[str, str], bool] = {}
_sandbox_verdicts: dict[str, str] = {}


@dataclass(frozen=True)
class QemuConfig:
    """The Agent config's `drivers: {qemu: ...}` section."""
    # "auto": the newest /boot/vmlinuz-* (linux-image-amd64); or a path.
    kernel: str = AUTO
    # "auto": built for that kernel by the packaged initramfs builder into
    # the state dir on first use; or a path.
    initramfs: str = AUTO
    # "auto": KVM if a bounded probe boots a kernel with it, else TCG.
    accel: str = AUTO
    # MiB each guest's QEMU process needs above its memory; 0 = the
    # driver's own figure (MEMORY_OVERHEAD, TCG).
    memory_overhead: int = 0
    # "auto": QEMU's -sandbox (SANDBOX) when a probe shows this QEMU runs
    # with it; "off": none.
    sandbox: str = AUTO


# Seconds for qemu-img to write a guest's disk out whole.
EXPORT_TIMEOUT = 600.0


class QemuDriver(RecordedGuestDriver):
    Config = QemuConfig
    identity = _identity
    exit_markers = EXIT_MARKERS
    name = "qemu"
    # Memory changes boot the guest again: its initramfs loads no
    # virtio-balloon driver. QMP stop/cont pause it in place.
    can_freeze = True
    # A move freezes the guest (QMP `stop`, which flushes its disks to the
    # overlay) and carries its disk; live migration is not offered yet.
    migration = "copy"
    memory_overhead = MEMORY_OVERHEAD

    default_short_dir = DEFAULT_SHORT_DIR

    def __init__(self, state_dir: str, runner: Any = None, clock: Clock = time.time,
                 qemu: str = QEMU, qemu_img: str = QEMU_IMG, kernel: str = AUTO,
                 initramfs: str = AUTO, accel: str = AUTO, machine: str = "pc",
                 min_memory: int = MIN_MEMORY, powerdown_grace: float = POWERDOWN_GRACE,
                 sandbox: str = AUTO, **options: Any):
        """`options`: what every recorded driver takes (RecordedGuestDriver)."""
        super().__init__(state_dir, runner, clock, **options)
        self.qemu = shutil.which(qemu) or qemu
        self.qemu_img = shutil.which(qemu_img) or qemu_img
        self.kernel = find_kernel() if kernel == AUTO else kernel
        self.kernel_version = _kernel_version(self.kernel)
        if initramfs == AUTO:
            if not self.kernel_version and kernel != AUTO:
                raise InvalidSpec(f"QEMU kernel {self.kernel}: its version is not in its name "
                                  f"(vmlinuz-VERSION): name the initramfs explicitly")
            # No kernel installed: start() says so (NotFound), so that a node
            # without one still runs its other drivers.
            self.initramfs = os.path.join(self.dir, INITRAMFS_DIR,
                                          f"initramfs-{self.kernel_version or 'none'}.img")
            self._build_initramfs = True
        else:
            self.initramfs = os.path.abspath(initramfs)
            self._build_initramfs = False
        if accel == AUTO:
            accel = "kvm" if kvm_works(self.qemu, self.kernel) else "tcg"
        if accel not in ("tcg", "kvm"):
            raise InvalidSpec(f"QEMU accelerator {accel!r}: use auto, tcg or kvm")
        self.accel = accel
        # TCG emulates every instruction: a systemd image takes tens of
        # seconds to its service where KVM takes a few.
        self.boot_timeout = 60.0 if accel == "kvm" else 240.0
        if sandbox not in (AUTO, "off"):
            raise InvalidSpec(f"QEMU sandbox {sandbox!r}: use auto or off")
        # What the fingerprint says of it: the -sandbox value, or why none.
        self.sandbox_note = sandbox_support(self.qemu) if sandbox == AUTO else "off (configured)"
        self.sandbox = SANDBOX if self.sandbox_note == SANDBOX else ""
        self.machine = machine
        self.min_memory = int(min_memory)
        self.kernel_label = self.kernel
        self.powerdown_grace = powerdown_grace
        # Guests whose VM QMP has confirmed, by (pid, start time).
        self._verified: set[tuple[int, int]] = set()
        self._initramfs_lock = threading.Lock()
        self._initramfs_checked = False

    # ---- paths -----------------------------------------------------------
    def overlay_path(self, name: str) -> str:
        return os.path.join(self.vmm_dir(name), OVERLAY)

    def console_path(self, name: str) -> str:
        return os.path.join(self.guest_dir(name), CONSOLE)

    def qmp_path(self, name: str) -> str:
        own = os.path.join(self.vmm_dir(name), QMP_SOCKET)
        if len(own) <= SUN_PATH_MAX:
            return own
        digest = hashlib.sha256(self.guest_dir(name).encode()).hexdigest()[:16]
        short = os.path.join(self.short_dir, digest, QMP_SOCKET)
        if len(short) > SUN_PATH_MAX:
            raise InvalidSpec(f"QMP socket path for {name} is too long even under {self.short_dir}")
        return short


    # ---- the driver interface ------------------------------------------
    def build_argv(self, spec: GuestSpec) -> list[str]:
        check_guest_name(spec.name)
        self._check_spec(spec)
        name = spec.name
        argv = self._launcher_argv(spec)
        append = ["console=ttyS0", "root=/dev/vda", "rw", "panic=-1", f"init={spec.init}"]
        append += list(self.boot_options)
        append += contract_arguments(spec)
        argv += [self.qemu,
                 "-name", f"soda-{name}",
                 "-machine", self.machine, "-accel", self.accel,
                 "-m", f"{spec.resources.memory}M", "-smp", "1",
                 "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                 *(["-sandbox", self.sandbox] if self.sandbox else []),
                 "-kernel", self.kernel, "-initrd", self.initramfs,
                 "-append", " ".join(append),
                 "-chardev", f"file,id=console,path={self.console_path(name)},append=on",
                 "-serial", "chardev:console",
                 "-qmp", f"unix:{self.qmp_path(name)},server=on,wait=off",
                 "-drive", f"file={self.overlay_path(name)},format=qcow2,if=virtio,"
                           f"cache=writeback,discard=unmap"]
        if spec.tap:
            argv += ["-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no",
                     "-device", f"virtio-net-pci,netdev=n0,mac={guest_mac(spec.address)}"]
        else:
            argv += ["-nic", "none"]
        return argv

    # ---- beyond the interface ----------------------------------------------
    def status(self, name: str) -> str:
        """The VM's run state as QMP reports it ("running", "paused", ...)."""
        record = self._running_record(name)
        return qmp(record["qmp"], "query-status", timeout=QMP_TIMEOUT)["status"]

    def freeze(self, name: str) -> None:
        """Pause the guest's virtual CPUs (QMP `stop`); its memory stays."""
        self._set_frozen(name, True, lambda record: qmp(record["qmp"], "stop", timeout=QMP_TIMEOUT))

    def thaw(self, name: str) -> None:
        """Resume a frozen guest (QMP `cont`)."""
        self._set_frozen(name, False, lambda record: qmp(record["qmp"], "cont", timeout=QMP_TIMEOUT))

    def _write_disk(self, record: dict, path: str) -> None:
        """The overlay with its base, as one raw file (qemu-img convert;
        -U: the paused VMM still holds the overlay's lock)."""
        command.run([self.qemu_img, "convert", "-U", "-q", "-f", "qcow2", "-O", "raw",
                     self.overlay_path(record["name"]), path], timeout=EXPORT_TIMEOUT,
                    hint="Debian package qemu-utils")

    def _running_record(self, name: str) -> dict:
        check_guest_name(name)
        _reap()
        record = self._load(name)
        if record is None:
            raise NotFound(f"no qemu guest {name}")
        if not self._alive(record):
            raise WrongState(f"qemu guest {name} is not running")
        return record

    # ---- checks ----------------------------------------------------------
    def _check_spec(self, spec: GuestSpec) -> None:
        # Commas split QEMU's option values; blanks would split the kernel
        # command line.
        self._check_command_line(spec, "a QEMU guest needs to boot", "QEMU",
                                 (("image path", spec.image_path), ("state dir", self.dir),
                                  ("kernel", self.kernel), ("initramfs", self.initramfs)))

    def fingerprint(self) -> Fingerprint:
        if not os.access(self.qemu, os.X_OK):
            return Fingerprint(False, f"QEMU {self.qemu} is missing (Debian package qemu-system-x86)")
        if not os.access(self.qemu_img, os.X_OK):
            return Fingerprint(False, f"{self.qemu_img} is missing (Debian package qemu-utils)")
        if not os.path.isfile(self.kernel):
            return Fingerprint(False, f"QEMU guest kernel {self.kernel} is missing (linux-image-amd64)")
        if not os.path.exists(TUN_DEVICE):
            return Fingerprint(False, f"no {TUN_DEVICE}: guests could have no network")
        return Fingerprint(True, attributes={"accel": self.accel,
                                             "kernel_version": self.kernel_version,
                                             "sandbox": self.sandbox_note})

    def _check_host(self, spec: GuestSpec) -> None:
        if not os.access(self.qemu, os.X_OK):
            raise NotFound(f"QEMU {self.qemu} is missing (Debian package qemu-system-x86)")
        if not os.path.isfile(self.kernel):
            raise NotFound(f"QEMU guest kernel {self.kernel} is missing (linux-image-amd64)")
        if not self._build_initramfs and not os.path.isfile(self.initramfs):
            raise NotFound(f"initramfs {self.initramfs} is missing (scripts/build-initramfs)")
        if not os.path.isfile(spec.image_path):
            raise NotFound(f"image {spec.image_path} for {spec.name} does not exist")
        if spec.netns and not os.path.exists(os.path.join(NETNS_DIR, spec.netns)):
            raise NotFound(f"network namespace {spec.netns} for {spec.name} does not exist")
        for directory in spec.cgroups:
            if not os.path.isfile(os.path.join(directory, "cgroup.procs")):
                raise NotFound(f"cgroup {directory} for {spec.name} does not exist")
        self._check_reachable(spec, (("QEMU", self.qemu, os.X_OK),
                                     ("kernel", self.kernel, os.R_OK),
                                     ("image", spec.image_path, os.R_OK)))

    def _ensure_initramfs(self) -> None:
        if not self._build_initramfs:
            return
        with self._initramfs_lock:
            # Once per driver: the script keeps its own cache key (kernel,
            # busybox, itself), so a run over a current image is a no-op.
            if self._initramfs_checked:
                return
            argv = ["bash", BUILD_INITRAMFS, self.initramfs, "--kernel-version", self.kernel_version]
            if not os.path.isfile(BUILD_INITRAMFS):
                raise NotFound(f"initramfs {self.initramfs} is missing and {BUILD_INITRAMFS} "
                               f"is not there to build it")
            log.info("checking the QEMU initramfs for kernel %s", self.kernel_version)
            command.run(argv, timeout=300)
            self._initramfs_checked = True

    def _create_overlay(self, spec: GuestSpec) -> None:
        path = self.overlay_path(spec.name)
        argv = [self.qemu_img, "create", "-q", "-f", "qcow2", "-F", "raw",
                "-b", os.path.abspath(spec.image_path), path]
        command.run(argv, timeout=30, hint="Debian package qemu-utils")

    # ---- records and processes --------------------------------------------
    def _vm_ended(self, record: dict) -> str:
        """"" while the VM may still run its guest, else why not. Asked over
        QMP once per process and driver (adoption); a VM that does not
        answer yet (still starting) is given the benefit of the doubt."""
        if _key(record) in self._verified:
            return ""
        try:
            status = qmp(record["qmp"], "query-status", timeout=QMP_TIMEOUT)["status"]
        except (OSError, KeyError, TypeError) as e:
            log.debug("qemu guest %s: query-status: %s", record["name"], e)
            return ""
        if status in ENDED_STATES:
            return f"QEMU reports the VM {status}"
        self._verified.add(_key(record))
        return ""

    def _prepare_files(self, spec: GuestSpec) -> dict:
        self._ensure_initramfs()
        self._check_reachable(spec, (("initramfs", self.initramfs, os.R_OK),))
        qmp_path = self.qmp_path(spec.name)
        if os.path.dirname(qmp_path) != self.vmm_dir(spec.name):
            os.makedirs(self.short_dir, mode=0o755, exist_ok=True)
            private_dir(os.path.dirname(qmp_path), spec.uid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(qmp_path)
        # A new overlay for every boot: the guest starts afresh.
        self._create_overlay(spec)
        private_file(self.overlay_path(spec.name), spec.uid)
        # QEMU opens its console file itself, as the guest's uid.
        console = self.console_path(spec.name)
        with open(console, "ab"):
            pass
        private_file(console, spec.uid)
        return {"qmp": qmp_path}

    def _record_fields(self, argv: list[str]) -> dict:
        return {"vmm_argv": _vmm_argv(argv), "kernel": self.kernel, "initramfs": self.initramfs,
                "accel": self.accel}

    def _console_note(self) -> str:
        return f" (accel {self.accel})"

    def _after_kill(self, name: str, record: dict) -> None:
        self._remove_short_socket(record.get("qmp", ""))

    def _clean_unrecorded(self, name: str) -> None:
        with contextlib.suppress(InvalidSpec):
            self._remove_short_socket(self.qmp_path(name))

    def _remove_short_socket(self, sock: str) -> None:
        """A QMP socket (and its dir) under short_dir; those in the guest's
        dir go with it."""
        short = os.path.abspath(self.short_dir)
        if not sock or not os.path.abspath(sock).startswith(short + "/"):
            return
        parent = os.path.dirname(os.path.abspath(sock))
        if parent != short:
            shutil.rmtree(parent, ignore_errors=True)
        else:                         # the flat layout of records before the uid drop
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)

    def _halt(self, record: dict, timeout: float) -> None:
        """system_powerdown, a short wait for the guest to power off, then
        quit (QEMU exits at once; the overlay is thrown away anyway)."""
        if timeout <= 0:
            return
        deadline = time.monotonic() + timeout
        name = record["name"]
        sock = record["qmp"]
        try:
            qmp(sock, "system_powerdown", timeout=min(timeout, QMP_TIMEOUT))
        except OSError as e:
            log.info("qemu guest %s: system_powerdown failed: %s", name, e)
        else:
            self._wait_gone(record, min(self.powerdown_grace, max(0.0, deadline - time.monotonic())))
        if not self._alive(record):
            return
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            qmp(sock, "quit", timeout=min(left, QMP_TIMEOUT))
        except OSError as e:
            # QEMU may close the socket as it quits before answering.
            log.debug("qemu guest %s: quit: %s", name, e)
        self._wait_gone(record, max(0.0, deadline - time.monotonic()))

# ---- host discovery -------------------------------------------------------------

def find_kernel() -> str:
    """The newest installed Debian kernel (/boot/vmlinuz-VERSION)."""
    found = sorted(glob.glob("/boot/vmlinuz-*"), key=_version_key)
    if not found:
        # Reported on start (NotFound), so a node without it can still run UML.
        return "/boot/vmlinuz"
    return found[-1]


def _version_key(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def _kernel_version(kernel: str) -> str:
    base = os.path.basename(kernel)
    return base[len("vmlinuz-"):] if base.startswith("vmlinuz-") else ""


def kvm_works(qemu: str = QEMU, kernel: str | None = None,
              seconds: float = KVM_PROBE_SECONDS) -> bool:
    """Whether KVM really runs a guest here: boot the guest kernel under
    `-accel kvm` and wait (bounded) for its first console line. A VMM that
    merely opens /dev/kvm proves nothing: on a PVM backend QEMU starts, then
    the guest hangs without printing a byte (seen one boot in three)."""
    qemu = shutil.which(qemu) or qemu
    kernel = kernel or find_kernel()
    cache_key = (qemu, kernel)
    if cache_key in _kvm_verdicts:
        return _kvm_verdicts[cache_key]
    verdict = os.access("/dev/kvm", os.R_OK | os.W_OK) and accel_boots(qemu, kernel, "kvm",
                                                                       seconds)
    log.info("KVM %s here: QEMU guests use %s", "works" if verdict else "does not work",
             "kvm" if verdict else "tcg")
    _kvm_verdicts[cache_key] = verdict
    return verdict


def sandbox_support(qemu: str = QEMU, seconds: float = SANDBOX_PROBE_SECONDS) -> str:
    """SANDBOX when this QEMU starts under `-sandbox SANDBOX` (a machine of
    nothing, asked to quit on its monitor: the filter is really installed),
    else why not, in a few words. Once per binary and process."""
    qemu = shutil.which(qemu) or qemu
    if qemu in _sandbox_verdicts:
        return _sandbox_verdicts[qemu]
    argv = [qemu, "-sandbox", SANDBOX, "-machine", "none", "-nodefaults", "-no-user-config",
            "-display", "none", "-S", "-monitor", "stdio", "-serial", "none"]
    if not os.access(qemu, os.X_OK):
        verdict = f"unknown: {qemu} is missing"
    else:
        try:
            r = subprocess.run(argv, input="quit\n", capture_output=True, text=True,
                               timeout=seconds)
        except (OSError, subprocess.TimeoutExpired) as e:
            verdict = f"unsupported: the probe failed ({e})"
        else:
            lines = [line for line in r.stderr.splitlines() if line.strip()]
            verdict = SANDBOX if r.returncode == 0 else \
                f"unsupported: {lines[-1] if lines else f'exit status {r.returncode}'}"
    if verdict != SANDBOX:
        log.warning("QEMU guests run without -sandbox: %s", verdict)
    _sandbox_verdicts[qemu] = verdict
    return verdict


def accel_boots(qemu: str, kernel: str, accel: str, seconds: float) -> bool:
    """Whether `kernel` under `-accel ACCEL` prints its first console line
    within `seconds` (the VMM is killed either way)."""
    verdict = False
    if os.access(qemu, os.X_OK) and os.path.isfile(kernel):
        # 128 MiB: at 64 Debian's kernel resets before printing anything.
        argv = [qemu, "-accel", accel, "-machine", "pc", "-m", "128", "-nodefaults",
                "-no-user-config", "-display", "none", "-no-reboot", "-kernel", kernel,
                "-append", "earlyprintk=ttyS0 console=ttyS0 panic=-1", "-serial", "stdio"]
        try:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, close_fds=True)
        except OSError:
            child = None
        if child is not None:
            out = b""
            deadline = time.monotonic() + seconds
            try:
                while b"Linux version" not in out:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    r, _, _ = select.select([child.stdout], [], [], left)
                    if not r:
                        break
                    chunk = os.read(child.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    out += chunk
                verdict = b"Linux version" in out
            finally:
                child.kill()
                child.wait()
                child.stdout.close()
    return verdict


def _vmm_argv(argv: list[str]) -> list[str]:
    return argv[argv.index("--") + 1:]
