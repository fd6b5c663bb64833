"""The real LimitManager on the real kernel: cgroup v1 files and tc in a
test's own network namespace, checked with `cat` and `tc`, not with the
code under test."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from soda import errors
from soda.daemon.config import DaemonConfig
from soda.daemon.main import build_manager
from soda.daemon.plan import MIB
from soda.daemon.tc import NetlinkThread, ifb_name
from soda.model.spec import Resources

from tests.integration.conftest import CGROUP_ROOT, V1_CONTROLLERS, link_names, make_tap, run
from tests.support import cpu_ticks

# A guest joins the freezer's hierarchy too where it is mounted.
FREEZER = os.path.isfile(os.path.join(CGROUP_ROOT, "freezer", "cgroup.procs"))
HIERARCHIES = V1_CONTROLLERS + (("freezer",) if FREEZER else ())

pytestmark = pytest.mark.root

TAP = "tap-t0"
UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def cg(controller: str, parent: str, vnode: str, *filename: str) -> str:
    return os.path.join(CGROUP_ROOT, controller, parent, vnode, *filename)


def tc(netns: str, *args: str) -> str:
    return run(["ip", "netns", "exec", netns, "tc", *args]).stdout


def qdiscs(netns: str, dev: str) -> list[dict]:
    return json.loads(tc(netns, "-j", "qdisc", "show", "dev", dev) or "[]")


def htb_rate(netns: str, dev: str) -> int:
    """Rate of class 1:10 in bit/s, parsed from `tc class show` (this
    iproute2 prints htb classes only as text)."""
    out = tc(netns, "class", "show", "dev", dev)
    m = re.search(r"class htb 1:10 .*?\brate (\d+(?:\.\d+)?)([KMGT]?bit)", out)
    assert m, f"no htb class 1:10 on {dev}: {out!r}"
    return round(float(m.group(1)) * UNITS[m.group(2).lower()])


def ingress_redirect(netns: str, dev: str) -> list[str]:
    out = tc(netns, "filter", "show", "dev", dev, "ingress")
    return re.findall(r"Redirect to device (\S+)\)", out)


@pytest.fixture
def tap(netns):
    return make_tap(netns, TAP)


@pytest.fixture
def manager(netns, cgroup_parent):
    m = build_manager(DaemonConfig(cgroup_parent=cgroup_parent, netns=netns))
    yield m
    m.shaper.close()


@pytest.fixture
def sleeper():
    """A `sleep` we started; killed by its own pid if the test leaves it."""
    procs = []

    def start(argv=("sleep", "1000"), **kw):
        p = subprocess.Popen(list(argv), **kw)
        procs.append(p)
        return p
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def join(pid: int, directories) -> None:
    for d in directories:
        with open(os.path.join(d, "cgroup.procs"), "w") as f:
            f.write(str(pid))


WEB = Resources(cpu=0.5, memory=64, bandwidth=10, disk=256)


def test_apply_writes_cgroups_and_shapes_both_ways(manager, netns, cgroup_parent, tap):
    fence = manager.apply("web-0", WEB, "uml", 32, tap, cpu_cap=True)
    assert fence.cgroups == tuple(cg(c, cgroup_parent, "web-0") for c in HIERARCHIES)
    assert read(cg("cpu", cgroup_parent, "web-0", "cpu.shares")) == "512"
    assert read(cg("cpu", cgroup_parent, "web-0", "cpu.cfs_period_us")) == "100000"
    assert read(cg("cpu", cgroup_parent, "web-0", "cpu.cfs_quota_us")) == "50000"
    assert read(cg("memory", cgroup_parent, "web-0", "memory.limit_in_bytes")) == str(96 * MIB)
    assert read(cg("pids", cgroup_parent, "web-0", "pids.max")) == "512"

    ifb = ifb_name(cgroup_parent, "web-0")
    assert fence.ifb == ifb and fence.tap == tap
    kinds = {(q["kind"], q["handle"]) for q in qdiscs(netns, tap)}
    assert kinds == {("htb", "1:"), ("ingress", "ffff:")}
    assert htb_rate(netns, tap) == 10_000_000
    assert htb_rate(netns, ifb) == 10_000_000
    assert ingress_redirect(netns, tap) == [ifb]
    link = json.loads(run(["ip", "-n", netns, "-j", "link", "show", ifb]).stdout)[0]
    assert "UP" in link["flags"]
    assert link["txqlen"] >= 1000, "a 32-packet IFB queue drops a guest's TCP bursts"
    assert "vnode=web-0" in link.get("ifalias", "") and f"tap={tap}" in link["ifalias"]


def test_live_change_keeps_everything_in_place(manager, netns, cgroup_parent, tap, sleeper):
    manager.apply("web-0", WEB, "uml", 32, tap, cpu_cap=True)
    ifb = ifb_name(cgroup_parent, "web-0")
    ifb_index = json.loads(run(["ip", "-n", netns, "-j", "link", "show", ifb]).stdout)[0]["ifindex"]
    p = sleeper()
    join(p.pid, manager.cgroups.paths("web-0"))

    manager.apply("web-0", Resources(cpu=1.5, memory=128, bandwidth=50), "uml", 32, tap, cpu_cap=False)
    assert read(cg("cpu", cgroup_parent, "web-0", "cpu.shares")) == "1536"
    assert read(cg("cpu", cgroup_parent, "web-0", "cpu.cfs_quota_us")) == "-1"
    assert read(cg("memory", cgroup_parent, "web-0", "memory.limit_in_bytes")) == str(160 * MIB)
    assert htb_rate(netns, tap) == 50_000_000
    assert htb_rate(netns, ifb) == 50_000_000
    # Same process still inside, same IFB, one root and one ingress qdisc.
    assert str(p.pid) in read(cg("cpu", cgroup_parent, "web-0", "cgroup.procs")).split()
    assert json.loads(run(["ip", "-n", netns, "-j", "link", "show", ifb]).stdout)[0]["ifindex"] == ifb_index
    assert sorted(q["kind"] for q in qdiscs(netns, tap)) == ["htb", "ingress"]
    assert ingress_redirect(netns, tap) == [ifb]


def test_a_restarted_daemon_finds_and_updates_without_duplicates(manager, netns, cgroup_parent, tap):
    first = manager.apply("web-0", WEB, "qemu", 160, tap)
    cfg = DaemonConfig(cgroup_parent=cgroup_parent, netns=netns)
    again = build_manager(cfg)
    try:
        listed = again.list()
        assert [f.name for f in listed] == ["web-0"]
        assert listed[0].limits.rate_bit == 10_000_000
        assert listed[0].limits.memory_bytes == first.limits.memory_bytes == (64 + 160) * MIB
        assert (listed[0].tap, listed[0].ifb) == (tap, first.ifb)
        again.apply("web-0", Resources(cpu=0.5, memory=64, bandwidth=20), "qemu", 160, tap)
        assert sorted(q["kind"] for q in qdiscs(netns, tap)) == ["htb", "ingress"]
        assert len(re.findall(r"class htb 1:10\b", tc(netns, "class", "show", "dev", tap))) == 1
        assert htb_rate(netns, tap) == 20_000_000
        assert ingress_redirect(netns, tap) == [first.ifb]
    finally:
        again.shaper.close()


@pytest.mark.parametrize("handle", ["5:", "1:"])
def test_a_tap_that_had_foreign_qdiscs_is_taken_over(manager, netns, tap, handle):
    run(["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", tap, "root", "handle", handle,
         "tbf", "rate", "1mbit", "burst", "10kb", "latency", "50ms"])
    manager.apply("web-0", WEB, "uml", 32, tap)
    assert sorted((q["kind"], q["handle"]) for q in qdiscs(netns, tap)) == [("htb", "1:"), ("ingress", "ffff:")]


def test_release_kills_removes_and_keeps_the_tap(manager, netns, cgroup_parent, tap, sleeper):
    fence = manager.apply("web-0", WEB, "uml", 32, tap)
    p = sleeper()
    join(p.pid, fence.cgroups)
    child = sleeper()                          # in one hierarchy only, like a stray helper
    join(child.pid, [fence.cgroups[2]])

    done = manager.release("web-0")
    assert done.existed and done.killed == 2
    assert p.wait(timeout=10) == -signal.SIGKILL
    assert child.wait(timeout=10) == -signal.SIGKILL
    for c in HIERARCHIES:
        assert not os.path.exists(cg(c, cgroup_parent, "web-0"))
    assert [q["kind"] for q in qdiscs(netns, tap) if q["kind"] in ("htb", "ingress")] == []
    names = link_names(netns)
    assert tap in names
    assert fence.ifb not in names
    assert manager.release("web-0").existed is False


SPIN = (sys.executable, "-c", "while True: pass")


@pytest.mark.skipif(not FREEZER, reason="this kernel's cgroup v1 has no freezer hierarchy mounted")
def test_freeze_holds_every_process_in_place_and_a_release_still_kills_them(
        manager, cgroup_parent, sleeper):
    fence = manager.apply("web-0", WEB, "uml", 32, "")
    spinner = sleeper(SPIN)
    join(spinner.pid, fence.cgroups)
    time.sleep(0.3)
    assert cpu_ticks(spinner.pid) > 0
    frozen = manager.freeze("web-0", True)
    assert frozen.frozen and manager.get("web-0").frozen
    assert read(cg("freezer", cgroup_parent, "web-0", "freezer.state")) == "FROZEN"
    held = cpu_ticks(spinner.pid)
    time.sleep(0.5)
    assert cpu_ticks(spinner.pid) == held, "a frozen process ran"
    assert manager.freeze("web-0", True).frozen                 # idempotent
    thawed = manager.freeze("web-0", False)
    assert not thawed.frozen and read(cg("freezer", cgroup_parent, "web-0", "freezer.state")) == "THAWED"
    time.sleep(0.3)
    assert cpu_ticks(spinner.pid) > held, "a thawed process did not run again"
    # Frozen again, then released: the kill reaches it (the v1 freezer
    # holds a SIGKILL until it thaws), and it never ran in between.
    manager.freeze("web-0", True)
    done = manager.release("web-0")
    assert done.killed == 1 and spinner.wait(timeout=10) == -signal.SIGKILL
    assert not os.path.exists(cg("freezer", cgroup_parent, "web-0"))
    with pytest.raises(errors.NotFound, match="not fenced"):
        manager.freeze("web-0", True)


def test_unshaped_fake_guest_gets_cgroups_only(manager, netns, cgroup_parent):
    fence = manager.apply("fake-0", Resources(cpu=1, memory=64, bandwidth=10), "fake", 0, "")
    assert fence.ifb == ""
    assert read(cg("memory", cgroup_parent, "fake-0", "memory.limit_in_bytes")) == str(64 * MIB)
    assert [n for n in link_names(netns) if n.startswith("ifb-")] == []
    assert manager.release("fake-0").existed


def test_missing_tap_is_not_found(manager):
    with pytest.raises(errors.NotFound, match="tap-none"):
        manager.apply("web-0", WEB, "uml", 32, "tap-none")


def test_usage_counts_cpu_memory_pids_and_traffic(manager, netns, tap, sleeper):
    fence = manager.apply("web-0", WEB, "uml", 32, tap)
    # Burn CPU only once inside the cgroup: wait for a line on stdin first.
    busy = sleeper([sys.executable, "-c",
                    "import sys, time\nsys.stdin.readline()\nx = bytearray(8 << 20)\n"
                    "end = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
                    "sys.stdout.write('done\\n'); sys.stdout.flush(); time.sleep(1000)\n"],
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    join(busy.pid, fence.cgroups)
    busy.stdin.write("go\n")
    busy.stdin.flush()
    assert busy.stdout.readline() == "done\n"
    u = manager.usage("web-0")
    assert u.cpu_seconds >= 0.25
    assert u.memory_bytes >= 8 * MIB
    assert u.memory_peak_bytes >= u.memory_bytes
    assert u.memory_limit_bytes == 96 * MIB
    assert u.pids >= 1

    # Traffic both ways, unequal so that swapped counters show.
    got = exchange(netns, tap, to_guest=TO_GUEST, from_guest=FROM_GUEST)
    assert got >= TO_GUEST * DATAGRAM_ON_WIRE                      # the "guest" really got it
    after = manager.usage("web-0")
    check_counted(u, after)
    assert manager.release("web-0").killed == 1


def test_usage_counts_forks_refused_at_the_pids_limit(manager, cgroup_parent, tap, sleeper):
    fence = manager.apply("web-0", WEB, "uml", 32, tap)
    # The test narrows the limit (the Daemon's is 512) so that a few forks hit it.
    with open(cg("pids", cgroup_parent, "web-0", "pids.max"), "w") as f:
        f.write("3")
    forker = sleeper([sys.executable, "-c",
                      "import os, sys, time\nsys.stdin.readline()\nrefused = 0\n"
                      "for _ in range(6):\n"
                      "    try:\n        pid = os.fork()\n    except BlockingIOError:\n"
                      "        refused += 1\n        continue\n"
                      "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
                      "print(refused, flush=True)\ntime.sleep(1000)\n"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    join(forker.pid, fence.cgroups)
    forker.stdin.write("go\n")
    forker.stdin.flush()
    refused = int(forker.stdout.readline())
    assert refused >= 3                                    # seen by the process itself
    assert manager.usage("web-0").pids_refused == refused  # and counted by the Daemon
    assert manager.release("web-0").killed >= 1


def test_a_missing_netns_is_not_found():
    with pytest.raises(errors.NotFound, match="network namespace"):
        NetlinkThread("sodat-does-not-exist")
    assert not os.path.exists("/run/netns/sodat-does-not-exist")


# Attach to the TAP like a guest would, send frames "from the guest", then
# send UDP "to the guest" from the host side and read it back. Runs inside
# the namespace (ip netns exec); prints the bytes it read.
TAP_PEER = r'''
import fcntl, os, socket, struct, sys, time
TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000
tap, to_guest, from_guest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
time.sleep(1.5)     # carrier on: let linkwatch activate the qdiscs
frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"x" * 986
for _ in range(from_guest):
    os.write(fd, frame)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(to_guest):
    s.sendto(b"y" * 1000, ("10.99.0.2", 9))
time.sleep(0.5)
os.set_blocking(fd, False)
got = 0
while True:
    try:
        got += len(os.read(fd, 65536))
    except BlockingIOError:
        break
print(got)
'''
FRAME = 1000                         # bytes of each frame the "guest" sends
DATAGRAM_ON_WIRE = 1000 + 8 + 20 + 14  # a 1000-byte UDP payload as an Ethernet frame
TO_GUEST, FROM_GUEST = 60, 20
# What else crosses a TAP that just came up (IPv6 DAD, MLD, router
# solicitations): small, but counted too.
CHATTER = 8 * 1024


def exchange(netns: str, tap: str, to_guest: int, from_guest: int) -> int:
    """Send `to_guest` UDP datagrams to a stand-in guest on `tap` and
    `from_guest` frames from it, all inside `netns`; the bytes it got."""
    run(["ip", "-n", netns, "addr", "replace", "10.99.0.1/24", "dev", tap])
    run(["ip", "-n", netns, "neigh", "replace", "10.99.0.2", "lladdr", "02:00:00:00:00:02",
         "dev", tap, "nud", "permanent"])
    out = run(["ip", "netns", "exec", netns, sys.executable, "-c", TAP_PEER, tap, str(to_guest),
               str(from_guest)], timeout=60).stdout
    return int(out.strip())


def check_counted(before, after) -> None:
    """The Daemon's traffic counters grew by what was sent each way: at
    least all of it, and not the other direction's."""
    to_guest = after.bytes_to_guest - before.bytes_to_guest
    from_guest = after.bytes_from_guest - before.bytes_from_guest
    assert TO_GUEST * DATAGRAM_ON_WIRE <= to_guest <= TO_GUEST * DATAGRAM_ON_WIRE + CHATTER, to_guest
    assert FROM_GUEST * FRAME <= from_guest <= FROM_GUEST * FRAME + CHATTER, from_guest


def sent_bytes(netns: str, dev: str) -> int:
    out = tc(netns, "-s", "class", "show", "dev", dev)
    m = re.search(r"class htb 1:10 .*?\n\s*Sent (\d+) bytes", out)
    assert m, out
    return int(m.group(1))


def test_traffic_both_ways_goes_through_the_classes(manager, netns, tap):
    fence = manager.apply("web-0", Resources(cpu=1, memory=64, bandwidth=100), "uml", 32, tap)
    before = manager.usage("web-0")
    classes_before = sent_bytes(netns, tap), sent_bytes(netns, fence.ifb)
    assert exchange(netns, tap, TO_GUEST, FROM_GUEST) >= TO_GUEST * DATAGRAM_ON_WIRE
    # tc's own view: the HTB class on the TAP (to the guest) and the one on
    # the IFB the TAP's ingress is redirected to (from the guest).
    to_guest = sent_bytes(netns, tap) - classes_before[0]
    from_guest = sent_bytes(netns, fence.ifb) - classes_before[1]
    assert to_guest >= TO_GUEST * DATAGRAM_ON_WIRE
    assert FROM_GUEST * FRAME <= from_guest < TO_GUEST * DATAGRAM_ON_WIRE
    check_counted(before, manager.usage("web-0"))
