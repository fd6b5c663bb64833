"""The Agent against an in-memory fake Master: session, heartbeats, reports,
Master outages, Agent restarts; the image cache; capacity; soda-agent main."""

import hashlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from soda.agent.agent import Agent, StatusReporter, state_dir_problem
from soda.backoff import Backoff
from soda.agent.capacity import (DEFAULT_BANDWIDTH_MBIT, default_route_device, link_speed_mbit,
                                 measure_capacity)
from soda.agent.images import ImageCache
from soda.agent.main import build_agent, build_config, driver_configs, main, parse_args
from soda.agent.reconciler import Reconciler
from soda.config import CapacityConfig
from soda.errors import DataLoss, InvalidSpec, NotFound, Unavailable
from soda.hypervisors.base import RUNNING, drivers
from soda.hypervisors.fake import FakeDriver
from soda.model.spec import Resources
from soda.model.state import HeartbeatAnswer, Image, Node, Phase, VirtualNode, VirtualNodeStatus
from tests.support import free_port

IMAGE = b"a tiny root filesystem" * 100
DIGEST = "sha256:" + hashlib.sha256(IMAGE).hexdigest()
NODE = "n1"


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in time"
        time.sleep(0.01)


def vnode(name, generation=1):
    return VirtualNode(name=name, service="web", index=int(name.rsplit("-", 1)[1]),
                       resources=Resources(cpu=0.5, memory=64, bandwidth=10, disk=64), node=NODE,
                       address="10.233.1.5", prefix_length=24, gateway="10.233.1.1",
                       image_digest=DIGEST, hypervisor="fake", generation=generation)


class FakeMaster:
    """MasterClient's interface, in memory; can be taken down and brought back."""

    def __init__(self, vnodes=()):
        self.lock = threading.Lock()
        self.up = True
        self.known = True
        self.fail_reports = False
        self.assignments = {v.name: v for v in vnodes}
        self.images = {DIGEST: IMAGE}
        self.registrations = []
        self.heartbeats = []
        self.reports = []
        self.pulls = []
        self.watches = []
        self.heartbeat_seconds = 0      # 0: keep the Agent's own period
        self.closed = 0
        self.state = "READY"            # what a registration answers

    # -- the client interface --
    def _check(self):
        if not self.up:
            raise Unavailable("cannot reach the SODA Master at fake: connection refused")

    def register_node(self, name, address, capacity, hypervisors, limits=(), assumed=(), labels=None):
        self._check()
        with self.lock:
            self.registrations.append((name, address, capacity, tuple(hypervisors)))
            self.limits = tuple(limits)
            self.labels = dict(labels or {})
            self.known = True
        return Node(name=name, address=address, capacity=capacity, hypervisors=tuple(hypervisors),
                    subnet="10.233.1.0/24", gateway="10.233.1.1", labels=dict(labels or {}),
                    state=self.state)

    def heartbeat(self, node, statuses, image_cache=None):
        self._check()
        if not self.known:
            raise NotFound(f"node {node} not found")
        with self.lock:
            self.heartbeats.append({s.name: s for s in statuses})
        return HeartbeatAnswer(heartbeat_seconds=self.heartbeat_seconds)

    def report_status(self, node, statuses):
        self._check()
        if self.fail_reports:
            raise Unavailable("report refused")
        with self.lock:
            self.reports.extend(statuses)

    def watch_assignments(self, node):
        self._check()
        events = queue.Queue()
        with self.lock:
            self.watches.append(events)
            snapshot = list(self.assignments.values())
        yield "SNAPSHOT", snapshot
        while True:
            event = events.get()
            if event is None:
                return
            if isinstance(event, Exception):
                raise event
            yield event

    def watch_log_orders(self, node):
        # No console is asked for here (tests/unit/test_logs.py does): the
        # stream stays quiet until the client closes.
        self._check()
        closed = self.closed
        while self.closed == closed:
            time.sleep(0.05)
        return
        yield

    def pull_image(self, digest, out, layer=False):
        self._check()
        self.pulls.append(digest)
        data = self.images[digest]
        out.write(data)
        return Image(digest=digest, size=len(data))

    def close(self):
        self.closed += 1
        self._broadcast(None)

    # -- test controls --
    def _broadcast(self, event):
        with self.lock:
            watches, self.watches = self.watches, []
        for events in watches:
            events.put(event)
        with self.lock:
            if event is not None and not isinstance(event, Exception):
                self.watches.extend(watches)

    def upsert(self, *vnodes):
        with self.lock:
            self.assignments.update((v.name, v) for v in vnodes)
        self._broadcast(("UPSERT", list(vnodes)))

    def remove(self, *names):
        with self.lock:
            for name in names:
                self.assignments.pop(name, None)
        self._broadcast(("REMOVE", list(names)))

    def go_down(self):
        self.up = False
        self._broadcast(Unavailable("cannot reach the SODA Master at fake: stream reset"))

    def come_back(self):
        self.up = True

    def last_phase(self, name):
        with self.lock:
            phases = [s.phase for s in self.reports if s.name == name]
        return phases[-1] if phases else None

    def phases(self, name):
        with self.lock:
            return [s.phase for s in self.reports if s.name == name]

    def last_heartbeat(self):
        with self.lock:
            return self.heartbeats[-1] if self.heartbeats else {}


class Harness:
    def __init__(self, tmp_path, master, driver=None, restart_backoff=0.05):
        self.master = master
        self.driver = driver or FakeDriver(str(tmp_path / "state"), boot_seconds=0,
                                           sleep=lambda s: None)
        self.images = ImageCache(str(tmp_path / "state" / "images"), master)
        self.reporter = StatusReporter(master, NODE)
        self.reconciler = Reconciler({"fake": self.driver}, self.reporter, self.images,
                                     interval=0.05, ready_poll=0.01,
                                     restart_backoff=restart_backoff)
        self.agent = Agent(master, self.reconciler, self.reporter, NODE, "127.0.0.1",
                           Resources(cpu=2, memory=1024, bandwidth=1000, disk=4096), ["fake"],
                           backoff=Backoff(0.01, 0.05), heartbeat_seconds=0.05)

    def __enter__(self):
        self.agent.start()
        return self

    def __exit__(self, *exc):
        self.agent.stop(timeout=5)

    def running(self, *names):
        return lambda: all(self.master.last_phase(n) == Phase.RUNNING for n in names)


# ---- the Agent --------------------------------------------------------------

def test_registers_follows_snapshot_upsert_remove_and_heartbeats_the_inventory(tmp_path):
    master = FakeMaster([vnode("web-0"), vnode("web-1")])
    with Harness(tmp_path, master) as h:
        assert h.agent.wait_registered(5)
        name, address, capacity, hypervisors = master.registrations[0]
        assert (name, address, hypervisors) == (NODE, "127.0.0.1", ("fake",))
        assert h.agent.node.subnet == "10.233.1.0/24"
        wait_for(h.running("web-0", "web-1"), what="snapshot running")
        # In order; the reporter may coalesce a phase that was overtaken
        # before it could be sent.
        seen = master.phases("web-0")
        assert seen == sorted(seen) and seen[-1] == Phase.RUNNING
        assert set(seen) <= {Phase.PENDING, Phase.PULLING, Phase.BOOTING, Phase.RUNNING}
        assert master.pulls == [DIGEST]          # one pull for both virtual nodes

        master.upsert(vnode("web-2"))
        wait_for(h.running("web-2"), what="upserted vnode running")
        master.remove("web-0")
        wait_for(lambda: master.last_phase("web-0") == Phase.STOPPED, what="removed vnode stopped")
        assert set(h.driver.list()) == {"web-1", "web-2"}
        wait_for(lambda: set(master.last_heartbeat()) == {"web-1", "web-2"}, what="heartbeat")
        assert all(s.phase == Phase.RUNNING for s in master.last_heartbeat().values())
    assert master.closed == 1
    # Stopping the Agent left the guests running.
    assert {n: i.state for n, i in h.driver.list().items()} == {"web-1": RUNNING, "web-2": RUNNING}
    assert len(master.registrations) == 1


def test_master_down_then_back_reregisters_and_never_restarts_guests(tmp_path):
    master = FakeMaster([vnode("web-0"), vnode("web-1")])
    with Harness(tmp_path, master) as h:
        wait_for(h.running("web-0", "web-1"))
        master.go_down()
        time.sleep(0.3)                          # several failed reconnects
        assert all(i.state == RUNNING for i in h.driver.list().values())
        # A guest that dies while the Master is away is still restarted:
        # its image is cached and the desired set is remembered.
        h.driver.crash("web-1")
        wait_for(lambda: h.driver.start_counts()["web-1"] == 2, what="restart without Master")
        master.assignments["web-2"] = vnode("web-2")    # changed while we were away
        master.come_back()
        wait_for(lambda: len(master.registrations) >= 2, what="re-registration")
        wait_for(h.running("web-0", "web-1", "web-2"), what="converged after outage")
        wait_for(lambda: set(master.last_heartbeat()) == {"web-0", "web-1", "web-2"})
    assert h.driver.start_counts() == {"web-0": 1, "web-1": 2, "web-2": 1}


def test_an_agent_restart_adopts_guests_and_reports_them_running(tmp_path):
    master = FakeMaster([vnode("web-0"), vnode("web-1")])
    with Harness(tmp_path, master) as first:
        wait_for(first.running("web-0", "web-1"))
    restarted = FakeMaster([vnode("web-0"), vnode("web-1")])
    with Harness(tmp_path, restarted) as second:
        wait_for(second.running("web-0", "web-1"))
        wait_for(lambda: set(restarted.last_heartbeat()) == {"web-0", "web-1"})
    assert restarted.phases("web-0") == [Phase.RUNNING]
    assert second.driver.start_counts() == {"web-0": 1, "web-1": 1}
    assert restarted.pulls == []


def test_a_node_back_from_lost_stops_what_it_no_longer_owns_before_it_reports(tmp_path):
    master = FakeMaster([vnode("web-0"), vnode("web-1")])
    with Harness(tmp_path, master) as first:
        wait_for(first.running("web-0", "web-1"))
    # Meanwhile the Master declared the node LOST: web-1 runs elsewhere now,
    # web-0 was placed again here in a new epoch (generation).
    back = FakeMaster([vnode("web-0", generation=2)])
    back.state = "LOST"
    slow_stop = threading.Event()
    second = Harness(tmp_path, back)
    real_stop = second.driver.stop

    def stop(name, *args, **kwargs):
        slow_stop.wait(5)
        return real_stop(name, *args, **kwargs)
    second.driver.stop = stop          # before the Agent starts: its first pass stops web-1
    with second:
        assert second.agent.wait_registered(5)
        time.sleep(0.3)
        # The old guests still run: not one heartbeat yet.
        assert back.heartbeats == []
        assert set(second.driver.list()) == {"web-0", "web-1"}
        slow_stop.set()
        wait_for(lambda: back.heartbeats, what="first heartbeat once the old guests are gone")
        # Whatever ran then was the new epoch only: web-1 is gone or listed
        # as STOPPED (the Master reads a STOPPED guest as not running).
        first_beat = back.heartbeats[0]
        assert "web-1" not in first_beat or first_beat["web-1"].phase == Phase.STOPPED, first_beat
        assert "web-1" not in second.driver.list()
        wait_for(second.running("web-0"))
    assert second.driver.list()["web-0"].generation == 2


def test_an_agent_that_starts_while_the_master_is_down_keeps_guests(tmp_path):
    master = FakeMaster([vnode("web-0")])
    with Harness(tmp_path, master) as first:
        wait_for(first.running("web-0"))
    master.go_down()
    with Harness(tmp_path, master) as second:
        time.sleep(0.3)
        assert not second.agent.wait_registered(0)
        assert second.driver.list()["web-0"].state == RUNNING
        master.come_back()
        assert second.agent.wait_registered(5)
        wait_for(lambda: master.last_heartbeat().get("web-0") is not None
                 and master.last_heartbeat()["web-0"].phase == Phase.RUNNING)
    assert second.driver.start_counts() == {"web-0": 1}


def test_failed_reports_are_tolerated_and_the_heartbeat_carries_the_phases(tmp_path):
    master = FakeMaster([vnode("web-0")])
    master.fail_reports = True
    with Harness(tmp_path, master) as h:
        wait_for(lambda: "web-0" in master.last_heartbeat()
                 and master.last_heartbeat()["web-0"].phase == Phase.RUNNING)
        assert master.reports == []
        assert h.agent.failure is None


def test_a_master_that_forgot_the_node_gets_a_new_registration(tmp_path):
    master = FakeMaster([vnode("web-0")])
    with Harness(tmp_path, master) as h:
        wait_for(h.running("web-0"))
        master.known = False
        wait_for(lambda: len(master.registrations) >= 2, what="re-registration")
        wait_for(lambda: master.known and master.last_heartbeat().get("web-0") is not None)


def test_a_bug_in_one_vnode_leaves_the_agent_and_the_other_vnodes_going(tmp_path):
    class BrokenDriver(FakeDriver):
        def start(self, spec):
            if spec.name == "web-1":
                raise RuntimeError("driver bug")
            return super().start(spec)

    master = FakeMaster([vnode("web-0"), vnode("web-1")])
    with Harness(tmp_path, master, driver=BrokenDriver(str(tmp_path / "state"),
                                                       boot_seconds=0, sleep=lambda s: None)) as h:
        wait_for(h.running("web-0"))
        wait_for(lambda: master.last_phase("web-1") == Phase.FAILED)
        beats = len(master.heartbeats)
        master.upsert(vnode("web-2"))
        wait_for(h.running("web-2"))
        wait_for(lambda: len(master.heartbeats) > beats + 2, what="heartbeats going on")
        assert not h.agent.stopped.is_set() and h.agent.failure is None
        assert "driver bug" in master.last_heartbeat()["web-1"].reason


def test_a_thread_that_raises_is_started_again_and_the_agent_keeps_going(tmp_path):
    master = FakeMaster([vnode("web-0")])
    h = Harness(tmp_path, master)
    real = h.reconciler.statuses_with_usage
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) <= 2:
            raise ValueError("heartbeat bug")
        return real()

    h.reconciler.statuses_with_usage = flaky
    h.agent._thread_backoff = Backoff(0.01, 0.05)
    with h:
        wait_for(h.running("web-0"))
        wait_for(lambda: master.last_heartbeat().get("web-0") is not None, what="a heartbeat")
        assert h.agent.thread_failures >= 2
        assert not h.agent.stopped.is_set() and h.agent.failure is None


def test_an_agent_that_cannot_work_here_stops_with_one_line(tmp_path):
    master = FakeMaster([])
    h = Harness(tmp_path, master)
    h.agent._health_check = lambda: "state dir /x is not writable: Read-only file system"
    with h:
        assert h.agent.stopped.wait(5)
        assert str(h.agent.failure) == "state dir /x is not writable: Read-only file system"


def test_state_dir_problem_names_an_unwritable_dir(tmp_path):
    assert state_dir_problem(str(tmp_path)) == ""
    missing = str(tmp_path / "gone")
    assert state_dir_problem(missing).startswith(f"state dir {missing} is not writable: ")


def test_backoff_doubles_to_its_cap_and_resets():
    backoff = Backoff(0.2, 5.0, rng=lambda: 0.5)     # no jitter at the midpoint
    assert [round(backoff.next(), 2) for _ in range(7)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    backoff.reset()
    assert backoff.next() == pytest.approx(0.2)
    jittered = Backoff(0.2, 5.0, rng=lambda: 1.0)
    assert jittered.next() == pytest.approx(0.24)


# ---- the image cache -----------------------------------------------------------

class PullingClient:
    def __init__(self, data=IMAGE, header_digest=DIGEST, header_size=None, fail_after=None,
                 delay=0.0):
        self.data, self.header_digest = data, header_digest
        self.header_size = len(data) if header_size is None else header_size
        self.fail_after, self.delay = fail_after, delay
        self.pulls = 0

    def pull_image(self, digest, out, layer=False):
        self.pulls += 1
        time.sleep(self.delay)
        if self.fail_after is not None:
            out.write(self.data[:self.fail_after])
            raise DataLoss(f"image {digest} arrived damaged")
        out.write(self.data)
        return Image(digest=self.header_digest, size=self.header_size)


def test_image_cache_pulls_once_and_reuses(tmp_path):
    client = PullingClient()
    cache = ImageCache(str(tmp_path / "images"), client)
    path = cache.ensure(DIGEST)
    assert path == str(tmp_path / "images" / ("sha256-" + DIGEST.split(":")[1]))
    assert open(path, "rb").read() == IMAGE
    assert not os.access(path, os.W_OK) or os.geteuid() == 0
    assert os.stat(path).st_mode & 0o222 == 0
    assert cache.ensure(DIGEST) == path
    assert ImageCache(str(tmp_path / "images"), client).ensure(DIGEST) == path
    assert client.pulls == 1


def test_concurrent_ensure_of_one_digest_pulls_once(tmp_path):
    client = PullingClient(delay=0.1)
    cache = ImageCache(str(tmp_path / "images"), client)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(cache.ensure(DIGEST))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert client.pulls == 1 and len(set(paths)) == 1 and len(paths) == 8


@pytest.mark.parametrize("client, message", [
    (PullingClient(fail_after=10), "arrived damaged"),
    (PullingClient(header_digest="sha256:" + "0" * 64), "asked the Master for image"),
    (PullingClient(header_size=len(IMAGE) + 1), "arrived with"),
])
def test_a_failed_or_wrong_pull_leaves_nothing_behind(tmp_path, client, message):
    cache = ImageCache(str(tmp_path / "images"), client)
    with pytest.raises(DataLoss, match=message):
        cache.ensure(DIGEST)
    assert os.listdir(tmp_path / "images") == []


def test_image_cache_refuses_bad_digests_and_sweeps_leftovers(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / ".pull-abc123").write_bytes(b"half an image")
    cache = ImageCache(str(images), PullingClient())
    assert os.listdir(images) == []
    for bad in ("sha256:../../etc", "busybox", "sha256:" + "A" * 64):
        with pytest.raises(InvalidSpec):
            cache.ensure(bad)


# ---- capacity -----------------------------------------------------------------

class FakeProbe:
    def __init__(self, speed=0):
        self.speed = speed

    def cpu_count(self):
        return 8

    def memory_total_mib(self):
        return 16384

    def disk_free_mib(self, path):
        return 50000

    def uplink_speed_mbit(self):
        return self.speed


def test_capacity_is_measured_unless_configured(tmp_path):
    measured = measure_capacity(CapacityConfig(), str(tmp_path), FakeProbe(speed=10000))
    assert measured.resources == Resources(cpu=8.0, memory=16384 - 1638, bandwidth=10000, disk=50000)
    assert measured.assumed == ()
    configured = measure_capacity(CapacityConfig(cpu=2, memory=512, bandwidth=100, disk=1000),
                                  str(tmp_path), FakeProbe())
    assert configured.resources == Resources(cpu=2, memory=512, bandwidth=100, disk=1000)
    assert configured.assumed == ()
    real = measure_capacity(CapacityConfig(), str(tmp_path)).resources
    assert real.cpu >= 1 and real.memory > 0 and real.disk > 0 and real.bandwidth > 0


def test_an_uplink_without_a_speed_gives_the_default_bandwidth_marked_assumed(tmp_path):
    got = measure_capacity(CapacityConfig(), str(tmp_path), FakeProbe(speed=0))
    assert got.resources.bandwidth == DEFAULT_BANDWIDTH_MBIT and got.assumed == ("bandwidth",)


def test_the_uplink_is_the_default_routes_interface_and_its_speed_comes_from_sysfs(tmp_path):
    route = tmp_path / "route"
    route.write_text("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
                     "eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
                     "eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")
    assert default_route_device(str(route)) == "eth0"
    assert default_route_device(str(tmp_path / "none")) == ""
    net = tmp_path / "net"
    for dev, speed in (("eth0", "25000\n"), ("veth0", "-1\n")):
        (net / dev).mkdir(parents=True)
        (net / dev / "speed").write_text(speed)
    (net / "tap0").mkdir()                        # reading fails: no speed file
    assert link_speed_mbit("eth0", str(net)) == 25000
    assert link_speed_mbit("veth0", str(net)) == 0
    assert link_speed_mbit("tap0", str(net)) == 0


# ---- soda-agent main ------------------------------------------------------------

def test_usage_errors_exit_2(capsys):
    for argv in (["--hypervisor", "xen"], ["--log-level", "LOUD"], ["--bogus"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    # The built-in drivers, and any a plugin adds (scripts/test installs one).
    available = ", ".join(sorted(drivers()))
    assert {"fake", "qemu", "uml"} <= set(drivers())
    assert f"unknown hypervisor driver 'xen' (available: {available})" in capsys.readouterr().err


def test_bad_config_is_one_clear_line_and_exit_2(tmp_path, capsys):
    config = tmp_path / "agent.yaml"
    config.write_text("master: 127.0.0.1:7070\nmax_paralel_boots: 3\n")
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key(s) max_paralel_boots" in err
    assert main(["--name", "Bad_Name", "--state-dir", str(tmp_path)]) == 2
    assert "invalid node name 'Bad_Name'" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config" in capsys.readouterr().err


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text("master: 10.0.0.1:7070\nname: from-file\nmax_parallel_boots: 2\n"
                      "drivers: {fake: {boot_seconds: 0.5}}\n")
    effective = build_config(parse_args(["--config", str(config), "--name", "from-flag",
                                         "--hypervisor", "fake,fake", "--hypervisor", "fake",
                                         "--log-level", "debug"]))
    assert effective.name == "from-flag" and effective.master == "10.0.0.1:7070"
    assert effective.hypervisors == ("fake",) and effective.log_level == "DEBUG"
    assert effective.max_parallel_boots == 2
    assert driver_configs(effective)["fake"].boot_seconds == 0.5
    assert build_config(parse_args([])).name        # defaults to the host name


def test_the_agent_registers_its_address_and_labels_from_flags(tmp_path):
    master = FakeMaster([])
    config = build_config(parse_args(["--state-dir", str(tmp_path / "state"), "--hypervisor", "fake",
                                      "--address", "192.0.2.10", "--label", "zone=a",
                                      "--label", "rack=r1"]))
    agent = build_agent(config, master, threading.Event())
    agent.start()
    try:
        assert agent.wait_registered(5)
        [(name, address, _, _)] = master.registrations
        assert (name, address) == (config.name, "192.0.2.10")
        assert master.labels == {"rack": "r1", "zone": "a"}
        assert agent.node.labels == {"rack": "r1", "zone": "a"}
    finally:
        agent.stop(timeout=5)


def test_soda_agent_runs_without_a_master_tells_systemd_and_stops_on_sigterm(tmp_path):
    state = tmp_path / "state"
    # A guest left by an earlier Agent: SIGTERM must not take it down.
    image = tmp_path / "base.img"
    image.write_bytes(b"rootfs")
    from tests.unit.test_fake_driver import spec
    FakeDriver(str(state), boot_seconds=0).start(spec(str(image), "old-0"))

    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "soda.agent.main", "--master", f"127.0.0.1:{free_port()}",
         "--name", "n1", "--state-dir", str(state), "--hypervisor", "fake",
         "--log-level", "debug"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert notify.recv(100) == b"READY=1"
        time.sleep(0.5)                 # a few failed registrations
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    assert proc.returncode == 0, err
    assert out == ""
    assert "agent n1 starting" in err and "received SIGTERM" in err
    assert "cannot reach the SODA Master" in err
    assert FakeDriver(str(state)).list()["old-0"].state == RUNNING


def test_heartbeats_carry_what_the_daemon_measured(tmp_path):
    from soda.agent.plumbing import GuestPlumbing
    from soda.model.usage import Usage

    class MeasuredPlumbing(GuestPlumbing):
        def usage(self, name, hypervisor):
            return Usage(cpu_seconds=7.0, bytes_in=5)

    master = FakeMaster([vnode("web-0")])
    h = Harness(tmp_path, master)
    h.reconciler = Reconciler({"fake": h.driver}, h.reporter, h.images, interval=0.05,
                              ready_poll=0.01, plumbing=MeasuredPlumbing())
    h.agent = Agent(master, h.reconciler, h.reporter, NODE, "127.0.0.1",
                    Resources(cpu=2, memory=1024, bandwidth=1000, disk=4096), ["fake"],
                    backoff=Backoff(0.01, 0.05), heartbeat_seconds=0.05)
    with h:
        wait_for(lambda: master.last_heartbeat().get("web-0") is not None
                 and master.last_heartbeat()["web-0"].usage == Usage(cpu_seconds=7.0, bytes_in=5),
                 what="usage in a heartbeat")


def test_a_status_report_waits_for_a_heartbeat_in_flight():
    """A heartbeat's snapshot may predate a phase change: the report of that
    change must reach the Master after it, never before (or the Master would
    keep the older phase until the next heartbeat)."""
    sent = []

    class Client:
        def report_status(self, node, batch):
            sent.append([s.phase for s in batch])

    reporter = StatusReporter(Client(), NODE)
    thread = threading.Thread(target=reporter.run, daemon=True)
    thread.start()
    try:
        with reporter.sending:          # what a heartbeat holds while it sends
            reporter.report([VirtualNodeStatus("web-0", Phase.RUNNING, "", 0.1, 1)])
            time.sleep(0.2)
            assert sent == []
        wait_for(lambda: sent == [[Phase.RUNNING]])
    finally:
        reporter.close()
        thread.join(5)


def test_each_driver_section_is_its_drivers_dataclass_checked_at_load(tmp_path, capsys):
    config = tmp_path / "agent.yaml"
    config.write_text("hypervisors: [fake]\ndrivers: {fake: {boot_seconds: 0.5}, uml: {kernel: /k}}\n")
    sections = driver_configs(build_config(parse_args(["--config", str(config)])))
    # Every section is built, also of a driver the node does not offer (a
    # typo there shows at load, not when someone enables it).
    assert sections["fake"] == FakeDriver.Config(boot_seconds=0.5)
    assert sections["uml"].kernel == "/k" and sections["uml"].memory_overhead == 0
    for text, error in [
            ("drivers: {fake: {boot_secs: 1}}\n", "drivers.fake: unknown key(s) boot_secs"),
            ("drivers: {xen: {}}\n", "drivers: no hypervisor driver named xen (available: "),
            ("drivers: {fake: 3}\n", "expected a mapping of mappings"),
            ("drivers: {uml: {memory_overhead: lots}}\n",
             "drivers.uml.memory_overhead: expected a number, got 'lots'")]:
        config.write_text(text)
        assert main(["--config", str(config), "--state-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert error in err and err.count("\n") == 1, err


def test_teardown_refuses_while_guests_run_and_removes_nothing(tmp_path, monkeypatch, capsys):
    import soda.agent.main as agent_main

    from soda.hypervisors.base import EXITED, RUNNING, GuestInfo

    class Running(FakeDriver):
        def list(self):
            # An exited guest's leftover record is no guest on the node.
            return {"web-1": GuestInfo("web-1", RUNNING), "old-1": GuestInfo("old-1", EXITED),
                    "web-2": GuestInfo("web-2", RUNNING)}

    removed = []
    monkeypatch.setattr(agent_main, "build_drivers",
                        lambda config: agent_main.Drivers({"fake": Running(str(tmp_path))}, {}))
    monkeypatch.setattr(agent_main.NodeNetwork, "remove_node",
                        lambda **kw: removed.append(kw) or ["bridge soda0"])
    monkeypatch.setattr(agent_main, "HostRoutes", lambda **kw: removed.append(kw))
    code = main(["--teardown", "--name", "n1", "--master", "127.0.0.1:1", "--state-dir",
                 str(tmp_path), "--hypervisor", "fake"])
    err = capsys.readouterr().err
    assert code == 1
    assert removed == []
    assert "2 guest(s) still on this node: web-1 (fake), web-2 (fake)" in err
    assert "sodactl node drain n1 --wait" in err and "nothing was removed" in err


def test_keep_routes_without_teardown_is_a_usage_error(tmp_path, capsys):
    code = main(["--keep-routes", "--name", "n1", "--master", "127.0.0.1:1", "--state-dir",
                 str(tmp_path), "--hypervisor", "fake"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "soda-agent: --keep-routes goes with --teardown"


def test_with_no_hypervisor_named_the_agent_offers_every_real_driver_usable_here(tmp_path, monkeypatch):
    from soda.agent.main import DriverUnusable, build_drivers
    from soda.hypervisors.base import Fingerprint
    from soda.hypervisors.qemu import QemuDriver
    from soda.hypervisors.uml import UmlDriver

    import soda.agent.main as agent_main
    builtin = {n: c for n, c in drivers().items() if n in ("fake", "uml", "qemu")}
    monkeypatch.setattr(agent_main, "drivers", lambda: builtin)     # no plugins installed for tests
    monkeypatch.setattr(UmlDriver, "fingerprint", lambda self: Fingerprint(False, "no UML kernel"))
    monkeypatch.setattr(QemuDriver, "fingerprint", lambda self: Fingerprint(True))
    config = build_config(parse_args(["--state-dir", str(tmp_path), "--name", "n1"]))
    assert config.hypervisors == ()
    made = build_drivers(config)
    assert list(made.drivers) == ["qemu"]            # fake is never offered unless named
    monkeypatch.setattr(QemuDriver, "fingerprint", lambda self: Fingerprint(False, "no qemu-system-x86_64"))
    with pytest.raises(DriverUnusable, match="uml: no UML kernel; qemu: no qemu-system-x86_64"):
        build_drivers(config)
    # Named, a driver must work: its reason is the error.
    named = build_config(parse_args(["--state-dir", str(tmp_path), "--name", "n1", "--hypervisor", "uml"]))
    with pytest.raises(DriverUnusable, match="hypervisor uml cannot run guests here: no UML kernel"):
        build_drivers(named)
