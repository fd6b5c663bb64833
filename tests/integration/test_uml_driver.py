"""The UML driver against real guests: boot the reference image on a TAP in
a network namespace this test creates, serve HTTP, be adopted by a fresh
driver, halt, be forced, die and be swept. Results are checked outside the
driver: HTTP from inside the namespace, /proc, cgroup files, the state dir.

Traffic goes only to 192.168.250.0/24 inside the test's own namespace."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from soda.hypervisors.base import EXITED, RUNNING, GuestSpec
from soda.hypervisors.kernels import find_uml_kernel
from soda.hypervisors.uml import UmlDriver
from soda.model.spec import Resources
from tests.integration.conftest import CGROUP_ROOT, run

pytestmark = [pytest.mark.root, pytest.mark.guest]
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The kernel SODA boots (its own, built by scripts/build-guest-kernel, which
# scripts/test runs first; Debian's where it is missing): Debian's 6.1 dies
# at its first process on a CPU with AMX (soda.hypervisors.uml.EXIT_MARKERS).
KERNEL = find_uml_kernel().path
GATEWAY = "192.168.250.1"
BOOT_LIMIT = 30.0

if not os.access(KERNEL, os.X_OK):
    pytest.skip(f"{KERNEL} is missing (scripts/build-guest-kernel, or Debian's user-mode-linux)",
                allow_module_level=True)
if not os.path.exists("/dev/net/tun"):
    pytest.skip("no /dev/net/tun: UML guests cannot have a network", allow_module_level=True)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("image") / "rootfs.img")
    r = subprocess.run([os.path.join(TOP, "scripts", "build-rootfs"), out], check=True,
                       capture_output=True, text=True)
    assert r.stdout.strip().splitlines()[-1] == out
    return out


@pytest.fixture
def guest_net(netns):
    """A bridge with the gateway address and two TAPs on it, all inside the
    test's namespace (deleting the namespace deletes them)."""
    run(["ip", "-n", netns, "link", "set", "lo", "up"])
    run(["ip", "-n", netns, "link", "add", "br0", "type", "bridge"])
    run(["ip", "-n", netns, "addr", "add", f"{GATEWAY}/24", "dev", "br0"])
    run(["ip", "-n", netns, "link", "set", "br0", "up"])
    for tap in ("tap0", "tap1"):
        run(["ip", "-n", netns, "tuntap", "add", "dev", tap, "mode", "tap"])
        run(["ip", "-n", netns, "link", "set", tap, "master", "br0"])
        run(["ip", "-n", netns, "link", "set", tap, "up"])
    return netns


@pytest.fixture
def drivers(tmp_path):
    """Make UML drivers on the test's state dir; afterwards stop whatever
    they recorded (the driver signals only its own, checked pids)."""
    made = []

    def make(**kw):
        kw.setdefault("kernel", KERNEL)
        kw.setdefault("short_dir", str(tmp_path / "run"))
        d = UmlDriver(str(tmp_path / "state"), **kw)
        made.append(d)
        return d

    yield make
    for d in made[:1]:
        for name in list(d.list()):
            try:
                d.stop(name, timeout=0)
            except Exception as e:           # keep cleaning; the test already reports
                logging.getLogger(__name__).warning("cleanup of %s: %s", name, e)


# 64 MiB like a default service (either kernel boots at 32 MiB:
# tests/system/test_boot_reliability.py).
def guest_spec(image, name="web-0", address="192.168.250.2", tap="tap0", netns="", memory=64,
               cgroups=()):
    return GuestSpec(name=name, service="web", image_path=image, image_digest="sha256:" + "0" * 64,
                     resources=Resources(cpu=1.0, memory=memory, bandwidth=10, disk=64),
                     address=address, prefix_length=24, gateway=GATEWAY, port=80, hypervisor="uml",
                     generation=7, tap=tap, netns=netns, cgroups=tuple(cgroups))


def wait_ready(driver, name, limit=BOOT_LIMIT) -> float:
    began = time.monotonic()
    while not driver.is_ready(name):
        info = driver.info(name)
        assert info is not None and info.state == RUNNING, f"guest died while booting: {info}"
        assert time.monotonic() - began < limit, f"{name} not ready after {limit}s"
        time.sleep(0.02)
    return time.monotonic() - began


def fetch_in_netns(netns, url):
    """GET `url` from inside `netns`, in a separate process (not the driver's code)."""
    code = ("import sys, urllib.request; "
            "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())")
    return run(["ip", "netns", "exec", netns, sys.executable, "-c", code, url]).stdout


def stat_fields(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None


def alive(pid):
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def session_of(pid):
    """Live processes in the session led by `pid` (UML's helpers), read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields and fields[0] != "Z" and int(fields[3]) == pid:
                found.append(int(entry))
    return sorted(found)


def vmms_using(cow):
    """Session leaders (VMM main processes) whose command line boots from `cow`."""
    found = []
    for entry in os.listdir("/proc"):
        fields = stat_fields(int(entry)) if entry.isdigit() else None
        if fields and fields[0] != "Z" and int(fields[3]) == int(entry):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            except FileNotFoundError:
                continue
            if any(a.startswith(f"ubd0={cow},") for a in argv):
                found.append(int(entry))
    return found


def wait_gone(pids, limit=5.0):
    deadline = time.monotonic() + limit
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [p for p in pids if alive(p)]


def record_of(driver, name):
    with open(os.path.join(driver.guest_dir(name), "guest.json")) as f:
        return json.load(f)


def assert_nothing_left(driver, tmp_path):
    assert os.listdir(driver.dir) == [], "state dir not empty after stop"
    run_dir = tmp_path / "run"
    assert not run_dir.exists() or os.listdir(run_dir) == []


def test_guest_boots_serves_is_adopted_and_halts(rootfs, guest_net, drivers, cgroup_parent, tmp_path):
    cgroups = []
    for controller in ("pids", "memory"):
        path = os.path.join(CGROUP_ROOT, controller, cgroup_parent, "web-0")
        os.makedirs(path)
        cgroups.append(path)
    driver = drivers()
    spec = guest_spec(rootfs, netns=guest_net, cgroups=cgroups)
    info = driver.start(spec)
    assert info.state == RUNNING and info.generation == 7
    boot = wait_ready(driver, "web-0")
    print(f"\nUML guest ready {boot:.2f}s after start")

    page = fetch_in_netns(guest_net, "http://192.168.250.2/")
    assert "SODA virtual node web-0 of service web" in page
    assert "SODA_NAME=web-0" in fetch_in_netns(guest_net, "http://192.168.250.2/cgi-bin/info")

    pid = info.pid
    record = record_of(driver, "web-0")
    assert record["pid"] == pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[0] == KERNEL.encode()
    with open(f"/proc/{pid}/personality") as f:
        assert int(f.read(), 16) & 0x0040000, "address-space randomisation is still on"
    members = session_of(pid)
    assert pid in members and len(members) >= 3
    assert vmms_using(driver.cow_path("web-0")) == [pid]
    for path in cgroups:
        with open(os.path.join(path, "cgroup.procs")) as f:
            in_cgroup = {int(p) for p in f.read().split()}
        assert set(members) <= in_cgroup, f"guest processes outside {path}"
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")

    # A restarted Agent: a new driver on the same state dir adopts the guest.
    fresh = drivers()
    adopted = fresh.list()
    assert list(adopted) == ["web-0"]
    assert adopted["web-0"].state == RUNNING and adopted["web-0"].pid == pid
    assert adopted["web-0"].ready and adopted["web-0"].generation == 7
    assert fresh.start(spec).pid == pid
    assert vmms_using(driver.cow_path("web-0")) == [pid], "a running guest was booted again"

    began = time.monotonic()
    fresh.stop("web-0", timeout=10)
    print(f"graceful stop took {time.monotonic() - began:.3f}s")
    assert wait_gone(members) == []
    assert fresh.list() == {} and driver.info("web-0") is None
    assert_nothing_left(fresh, tmp_path)
    fresh.stop("web-0", timeout=10)                      # absent: succeeds


def test_forced_stop_of_a_guest_that_cannot_be_asked_to_halt(rootfs, guest_net, drivers, tmp_path,
                                                             caplog):
    driver = drivers(term_grace=0.0)
    info = driver.start(guest_spec(rootfs, netns=guest_net))
    wait_ready(driver, "web-0")
    members = session_of(info.pid)
    # Without its control socket the guest cannot be asked to halt.
    os.unlink(driver.mconsole_path("web-0", record_of(driver, "web-0")["uml_dir"]))
    caplog.set_level(logging.INFO, logger="soda.hypervisors")
    began = time.monotonic()
    driver.stop("web-0", timeout=0.2)
    took = time.monotonic() - began
    assert "SIGTERM" in caplog.text
    assert wait_gone(members) == []
    assert took < 5.0
    assert_nothing_left(driver, tmp_path)


def test_a_wedged_guest_is_killed(rootfs, guest_net, drivers, tmp_path, caplog):
    driver = drivers(term_grace=0.3)
    info = driver.start(guest_spec(rootfs, netns=guest_net))
    wait_ready(driver, "web-0")
    members = session_of(info.pid)
    # A stopped VMM answers no halt request and leaves SIGTERM pending.
    os.kill(info.pid, signal.SIGSTOP)
    caplog.set_level(logging.INFO, logger="soda.hypervisors")
    began = time.monotonic()
    driver.stop("web-0", timeout=0.5)
    took = time.monotonic() - began
    assert "did not stop" in caplog.text and "ignored SIGTERM: SIGKILL" in caplog.text
    assert wait_gone(members) == [], "the VMM or its helpers survived"
    assert 0.5 <= took < 5.0
    assert_nothing_left(driver, tmp_path)


def test_a_killed_vmm_is_reported_and_its_helpers_swept(rootfs, guest_net, drivers, tmp_path):
    driver = drivers()
    info = driver.start(guest_spec(rootfs, netns=guest_net, tap="tap1", address="192.168.250.3"))
    wait_ready(driver, "web-0")
    members = session_of(info.pid)
    # As when the memory cgroup OOM-kills the main UML process.
    os.kill(info.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while driver.info("web-0").state != EXITED and time.monotonic() < deadline:
        time.sleep(0.01)
    dead = driver.info("web-0")
    assert dead.state == EXITED and "signal 9" in dead.exit_reason
    assert not driver.is_ready("web-0")
    driver.stop("web-0", timeout=1)
    assert wait_gone(members) == [], "UML helpers survived the stop"
    assert_nothing_left(driver, tmp_path)


def test_an_unbootable_image_reports_why(drivers, tmp_path):
    image = tmp_path / "garbage.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    driver = drivers()
    driver.start(guest_spec(str(image), tap=""))
    deadline = time.monotonic() + BOOT_LIMIT
    while driver.info("web-0").state == RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    info = driver.info("web-0")
    assert info.state == EXITED
    assert "Kernel panic" in info.exit_reason or "root" in info.exit_reason, info.exit_reason
    driver.stop("web-0", timeout=1)
    assert_nothing_left(driver, tmp_path)


def test_a_new_life_gets_a_fresh_copy_on_write_layer(rootfs, guest_net, drivers, tmp_path):
    driver = drivers()
    spec = guest_spec(rootfs, netns=guest_net)
    first = driver.start(spec)
    wait_ready(driver, "web-0")
    cow = driver.cow_path("web-0")
    assert os.path.getsize(cow) > 0
    assert os.stat(cow).st_blocks * 512 < 4 << 20, "the COW layer should be sparse"
    members = session_of(first.pid)
    os.kill(first.pid, signal.SIGKILL)
    while driver.info("web-0").state == RUNNING:
        time.sleep(0.01)
    # Starting a guest that died boots it again, from a new COW layer.
    second = driver.start(spec)
    assert second.pid != first.pid
    assert wait_gone(members) == []
    wait_ready(driver, "web-0")
    assert "web-0" in fetch_in_netns(guest_net, "http://192.168.250.2/")
    driver.stop("web-0", timeout=10)
    assert_nothing_left(driver, tmp_path)
