"""One set of behaviours every hypervisor driver promises the Agent
(soda.hypervisors.base), checked the same way for `fake`, `uml`, `qemu` and
`echo` (a driver in a distribution of its own, tests/plugins/, found only
through its entry point):
start, readiness, idempotent start, graceful and forced stop, idempotent
stop, list, adoption by a new driver instance, crash detection, failure
reasons, and nothing left behind.

The real drivers boot the reference image (scripts/build-rootfs) on a TAP
in a network namespace this test creates (bridge + TAP, 192.168.252.0/24),
and results are checked outside the driver: HTTP from inside the namespace,
/proc, the state dir. QEMU boots under TCG take 7-9 s, so each test boots
at most one guest to its service, and the failure tests do not wait for
readiness at all.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from soda.errors import InvalidSpec, NotFound
from soda.hypervisors.base import EXITED, RUNNING, GuestSpec, driver_class, drivers
from soda.hypervisors.kernels import find_uml_kernel
from soda.model.spec import Resources
from soda.daemon.cgroups import open_backend
from tests.integration.conftest import CGROUP_ROOT, run
from tests.support import cpu_ticks

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GATEWAY = "192.168.252.1"
ADDRESS = "192.168.252.2"
BOOT_LIMIT = 60.0
UML_KERNEL = find_uml_kernel().path       # SODA's own where built (see test_uml_driver)
log = logging.getLogger(__name__)


def _missing(kind: str) -> str:
    if kind == "uml" and not os.access(UML_KERNEL, os.X_OK):
        return f"{UML_KERNEL} is missing (scripts/build-guest-kernel, or Debian's user-mode-linux)"
    if kind == "qemu":
        if not shutil.which("qemu-system-x86_64") or not shutil.which("qemu-img"):
            return "QEMU is missing (qemu-system-x86, qemu-utils)"
        if not glob.glob("/boot/vmlinuz-*"):
            return "no /boot/vmlinuz-* (linux-image-amd64)"
    if _real(kind) and not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun: guests cannot have a network"
    return ""


def _real(kind: str) -> bool:
    """Guests with a process, a network and a fence (the driver declares
    `plumbing`); the others are pretend guests kept as records."""
    registry = drivers()
    if kind not in registry:
        raise AssertionError(f"hypervisor driver {kind!r} is not registered (available: "
                             f"{', '.join(sorted(registry))}); scripts/test installs "
                             "tests/plugins/soda-driver-echo")
    return registry[kind].plumbing


REAL = [pytest.mark.root, pytest.mark.guest]
KINDS = [pytest.param("fake", id="fake"),
         pytest.param("echo", id="echo"),
         pytest.param("uml", id="uml", marks=REAL),
         pytest.param("qemu", id="qemu", marks=REAL)]


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("image") / "rootfs.img")
    r = subprocess.run([os.path.join(TOP, "scripts", "build-rootfs"), out], check=True,
                       capture_output=True, text=True)
    assert r.stdout.strip().splitlines()[-1] == out
    return out


@pytest.fixture(scope="module")
def initramfs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("initramfs") / "initramfs.img")
    r = subprocess.run([os.path.join(TOP, "scripts", "build-initramfs"), out], check=True,
                       capture_output=True, text=True, timeout=300)
    assert r.stdout.strip().splitlines()[-1] == out
    return out


class Harness:
    """What differs between drivers, behind one face: how to make one, the
    spec it boots, how to crash a guest, how to check its processes."""

    def __init__(self, kind, tmp_path, image, netns="", initramfs="", fence=None):
        self.kind = kind
        # The cgroups a UML guest freezes in (the Daemon's part, here
        # without a Daemon): its VMM joins them, its driver's freezer
        # freezes them.
        self.fence = fence
        self.tmp_path = tmp_path
        self.image = image
        self.netns = netns
        self.initramfs = initramfs
        self.pretend = not _real(kind)
        self.made = []

    def driver(self, **kw):
        state = str(self.tmp_path / "state")
        if self.pretend:
            kw.setdefault("boot_seconds", 0.3)
            d = driver_class(self.kind)(state, **kw)
        elif self.kind == "uml":
            from soda.hypervisors.uml import UmlDriver
            d = UmlDriver(state, kernel=UML_KERNEL, short_dir=str(self.tmp_path / "run"), **kw)
        else:
            from soda.hypervisors.qemu import QemuDriver
            d = QemuDriver(state, initramfs=self.initramfs, short_dir=str(self.tmp_path / "run"),
                           **kw)
        if self.fence is not None:
            d.freezer = self.fence.freeze
        self.made.append(d)
        return d

    def spec(self, name="web-0", image=None, memory=None):
        real = not self.pretend
        if memory is None:
            memory = 128 if self.kind == "qemu" else 64
        return GuestSpec(name=name, service="web", image_path=image or self.image,
                         image_digest="sha256:" + "0" * 64,
                         resources=Resources(cpu=1.0, memory=memory, bandwidth=10, disk=64),
                         address=ADDRESS, prefix_length=24, gateway=GATEWAY, port=80,
                         hypervisor=self.kind, generation=5, tap="tap0" if real else "",
                         netns=self.netns if real else "",
                         cgroups=self.fence.create(name) if self.fence is not None else ())

    def crash(self, driver, name):
        """The VMM dies under the driver (as when the OOM killer takes it)."""
        if self.pretend:
            driver.crash(name)
        else:
            os.kill(driver.info(name).pid, signal.SIGKILL)

    def serves(self, name):
        if self.pretend:
            return True
        code = ("import sys, urllib.request; "
                "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
        page = run(["ip", "netns", "exec", self.netns, sys.executable, "-c", code,
                    f"http://{ADDRESS}/"]).stdout
        return f"SODA virtual node {name} of service web" in page

    def processes(self, pid):
        """Live processes of a guest: the VMM and its session (UML helpers)."""
        if self.pretend:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if fields[0] != "Z" and (int(entry) == pid or int(fields[3]) == pid):
                found.append(int(entry))
        return found

    def cpu_ticks(self, pid):
        """CPU time (clock ticks) the guest's processes have used, from /proc."""
        return cpu_ticks(*self.processes(pid))

    def leftovers(self, driver):
        """Files of guests still under the driver's state dir (and sockets
        moved out of it); the fake driver's own lock and counters are not."""
        entries = sorted(os.listdir(driver.dir)) if os.path.isdir(driver.dir) else []
        if self.pretend:
            entries = [e for e in entries if e not in ("_lock", "_starts.json")]
        if self.kind == "qemu":
            entries = [e for e in entries if e != "_initramfs"]
        run_dir = self.tmp_path / "run"
        if run_dir.exists():
            entries += [f"run/{e}" for e in os.listdir(run_dir)]
        return entries

    def cleanup(self):
        for d in self.made[:1]:
            for name in list(d.list()):
                try:
                    d.stop(name, timeout=0)
                except Exception as e:       # keep cleaning; the test already reports
                    log.warning("cleanup of %s: %s", name, e)


@pytest.fixture(params=KINDS)
def harness(request, tmp_path, rootfs):
    kind = request.param
    why = _missing(kind)
    if why:
        pytest.skip(why)
    netns = ""
    initramfs = ""
    if _real(kind):
        netns = request.getfixturevalue("netns")
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        run(["ip", "-n", netns, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", netns, "addr", "add", f"{GATEWAY}/24", "dev", "br0"])
        run(["ip", "-n", netns, "link", "set", "br0", "up"])
        run(["ip", "-n", netns, "tuntap", "add", "dev", "tap0", "mode", "tap"])
        run(["ip", "-n", netns, "link", "set", "tap0", "master", "br0"])
        run(["ip", "-n", netns, "link", "set", "tap0", "up"])
    if kind == "qemu":
        initramfs = request.getfixturevalue("initramfs")
    fence = None
    if kind == "uml":
        fence = open_backend(CGROUP_ROOT, request.getfixturevalue("cgroup_parent"))
    h = Harness(kind, tmp_path, rootfs, netns, initramfs, fence)
    try:
        yield h
    finally:
        h.cleanup()


def wait_for(predicate, limit, what):
    began = time.monotonic()
    while not predicate():
        assert time.monotonic() - began < limit, f"{what} not within {limit}s"
        time.sleep(0.02)
    return time.monotonic() - began


def wait_ready(driver, name):
    def ready():
        info = driver.info(name)
        assert info is not None and info.state == RUNNING, f"guest died while booting: {info}"
        return driver.is_ready(name)
    return wait_for(ready, BOOT_LIMIT, f"{name} ready")


def test_lifecycle_start_ready_adopt_and_graceful_stop(harness):
    driver = harness.driver()
    spec = harness.spec()
    assert driver.list() == {}
    info = driver.start(spec)
    assert info.state == RUNNING and info.generation == 5 and info.pid
    took = wait_ready(driver, "web-0")
    print(f"\n{harness.kind}: ready {took:.2f}s after start")
    assert harness.serves("web-0")
    pid = info.pid
    members = harness.processes(pid)
    assert harness.pretend or pid in members

    # Starting a running guest returns it untouched.
    again = driver.start(spec)
    assert again.pid == pid and again.state == RUNNING
    listed = driver.list()
    assert list(listed) == ["web-0"] and listed["web-0"].ready and listed["web-0"].pid == pid

    if driver.can_freeze:
        # Drivers that declare it: freeze/thaw pause the guest and keep it,
        # and say so (a frozen guest is never ready); either is idempotent.
        if driver.migration:
            driver.sync_disk("web-0")       # as a move does before it freezes
        driver.freeze("web-0")
        driver.freeze("web-0")
        frozen = driver.info("web-0")
        assert frozen.frozen and not frozen.ready and frozen.pid == pid and frozen.state == RUNNING
        used = harness.cpu_ticks(pid)
        time.sleep(0.5)
        assert harness.cpu_ticks(pid) - used <= 1, "a frozen guest's processes ran"
        assert harness.driver().info("web-0").frozen            # a restarted Agent sees it too
        if driver.migration:
            # A move carries the frozen guest's disk: the whole disk it sees.
            export = os.path.join(harness.tmp_path, "export.img")
            driver.export_disk("web-0", export)
            assert os.path.getsize(export) == os.path.getsize(spec.image_path)
            if harness.kind == "uml":
                # What the guest wrote at boot (its init's /etc/soda.env, never
                # synced) is on it: the sync before the freeze wrote it out.
                env = subprocess.run([shutil.which("debugfs") or "/sbin/debugfs", "-R", "cat /etc/soda.env",
                                      export], capture_output=True, text=True).stdout
                assert "SODA_NAME=web-0" in env, env
            os.unlink(export)
        driver.thaw("web-0")
        driver.thaw("web-0")
        assert not driver.info("web-0").frozen
        wait_ready(driver, "web-0")
        assert harness.serves("web-0")

    # A restarted Agent: a new driver instance on the same state dir adopts it.
    fresh = harness.driver()
    adopted = fresh.list()
    assert list(adopted) == ["web-0"]
    assert adopted["web-0"].state == RUNNING and adopted["web-0"].pid == pid
    assert adopted["web-0"].ready and adopted["web-0"].generation == 5
    assert fresh.start(spec).pid == pid, "an adopted guest was booted again"
    if harness.pretend:
        assert fresh.start_counts() == {"web-0": 1}

    if fresh.can_freeze:
        # A frozen guest stops like any other (the service is deleted while
        # its guest rests in a warm pool): the v1 freezer would hold even a
        # SIGKILL, so the driver lets it go first.
        fresh.freeze("web-0")
    began = time.monotonic()
    fresh.stop("web-0", timeout=10)
    print(f"{harness.kind}: graceful stop took {time.monotonic() - began:.2f}s")
    assert wait_for(lambda: not harness.processes(pid), 5, "guest processes gone") is not None
    assert fresh.list() == {} and driver.info("web-0") is None
    assert harness.leftovers(fresh) == []
    fresh.stop("web-0", timeout=10)                     # absent: succeeds
    assert fresh.list() == {}


def test_crash_is_detected_and_forced_stop_cleans_up(harness):
    driver = harness.driver()
    spec = harness.spec()
    pid = driver.start(spec).pid
    if not harness.pretend:
        # Past the launcher: the VMM itself is what dies.
        wait_for(lambda: open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0]
                 != sys.executable.encode(), 10, "the VMM's exec")
    harness.crash(driver, "web-0")
    wait_for(lambda: driver.info("web-0").state == EXITED, 10, "crash noticed")
    dead = driver.list()["web-0"]
    assert dead.state == EXITED and not dead.ready and dead.exit_reason
    if not harness.pretend:
        assert "signal 9" in dead.exit_reason, dead.exit_reason
    assert not driver.is_ready("web-0")
    driver.stop("web-0", timeout=1)
    assert driver.list() == {} and harness.leftovers(driver) == []

    # A guest that will not halt in time is forced (timeout 0: no asking).
    pid = driver.start(spec).pid
    assert driver.info("web-0").state == RUNNING
    began = time.monotonic()
    driver.stop("web-0", timeout=0)
    assert time.monotonic() - began < 10
    assert harness.processes(pid) == [] or \
        wait_for(lambda: not harness.processes(pid), 5, "forced guest gone") is not None
    assert driver.list() == {} and harness.leftovers(driver) == []
    driver.stop("web-0", timeout=0)


def test_a_missing_image_is_a_clear_error(harness, tmp_path):
    driver = harness.driver()
    missing = str(tmp_path / "no-such-image.img")
    with pytest.raises(NotFound, match="no-such-image.img"):
        driver.start(harness.spec(image=missing))
    assert driver.list() == {} and harness.leftovers(driver) == []


def test_memory_below_the_drivers_minimum_is_refused(harness):
    driver = harness.driver()
    floor = getattr(driver, "min_memory", 0)
    if not floor:
        pytest.skip(f"{harness.kind} guests may be of any size")
    # The floor is what the Agent registers for admission at the Master.
    assert harness.kind != "qemu" or floor >= 96, "QEMU guests below 88 MiB do not boot"
    small = harness.spec(memory=floor - 1)
    for attempt in (driver.build_argv, driver.start):
        with pytest.raises(InvalidSpec, match=f"below the {floor} MiB"):
            attempt(small)
    assert driver.list() == {} and harness.leftovers(driver) == []
    assert driver.start(harness.spec(memory=floor)).state == RUNNING
    driver.stop("web-0", timeout=0)
    assert driver.list() == {} and harness.leftovers(driver) == []


def test_an_unbootable_image_reports_why(harness, tmp_path):
    if not drivers()[harness.kind].disk_bound:
        pytest.skip(f"{harness.kind} guests do not read their image")
    garbage = tmp_path / "garbage.img"
    with open(garbage, "wb") as f:
        f.truncate(8 << 20)
    driver = harness.driver()
    pid = driver.start(harness.spec(image=str(garbage))).pid
    wait_for(lambda: driver.info("web-0").state == EXITED, BOOT_LIMIT, "the failed boot's end")
    reason = driver.info("web-0").exit_reason
    print(f"\n{harness.kind}: {reason}")
    assert any(word in reason for word in ("Kernel panic", "root", "mount")), reason
    driver.stop("web-0", timeout=1)
    # A panicked UML's helpers were SIGKILLed by stop(); the kernel may still
    # be tearing one down (not yet a zombie) for a moment.
    wait_for(lambda: not harness.processes(pid), 5, "the panicked guest's processes gone")
    assert driver.list() == {} and harness.leftovers(driver) == []
