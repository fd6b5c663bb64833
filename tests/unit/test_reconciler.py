"""The reconciler against the fake driver, a recording reporter, a fake
image cache and (where timing matters) a fake clock."""

import dataclasses
import threading
import time

import pytest

from soda.agent.plumbing import GuestPlumbing
from soda.agent.reconciler import Reconciler
from soda.errors import NotFound, Unavailable, WrongState
from soda.hypervisors.base import EXITED, RUNNING
from soda.hypervisors.fake import FakeDriver
from soda.model.spec import Resources
from soda.model.state import Phase, VirtualNode
from tests.fakes import FakeClock, FakeImages, RecordingReporter

DIGEST = "sha256:" + "b" * 64
P = Phase


def vnode(name, generation=1, **kw):
    kw.setdefault("image_digest", DIGEST)
    kw.setdefault("hypervisor", "fake")
    return VirtualNode(name=name, service=name.rsplit("-", 1)[0], index=int(name.rsplit("-", 1)[1]),
                       resources=Resources(cpu=0.5, memory=64, bandwidth=10, disk=64),
                       node="n1", address="10.233.1.2", prefix_length=24, gateway="10.233.1.1",
                       generation=generation, **kw)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "base.img"
    path.write_bytes(b"rootfs")
    return str(path)


class Setup:
    def __init__(self, tmp_path, image, clock=None, driver=None, images=None, **kw):
        self.clock = clock or FakeClock(100.0)
        self.driver = driver or FakeDriver(str(tmp_path / "state"), boot_seconds=0,
                                           sleep=lambda s: None)
        self.reporter = RecordingReporter()
        self.images = images or FakeImages(image)
        self.rec = Reconciler({"fake": self.driver}, self.reporter, self.images, clock=self.clock,
                              ready_poll=0.01, **kw)

    def converge(self):
        self.rec.reconcile_once()
        assert self.rec.wait_idle(5)

    def phase(self, name):
        status = self.rec.status(name)
        return status.phase if status else None


@pytest.fixture
def setup(tmp_path, image):
    s = Setup(tmp_path, image)
    yield s
    s.rec.close()


def test_starts_what_is_missing_through_every_phase(setup):
    setup.rec.replace_desired([vnode("web-0"), vnode("web-1")])
    setup.converge()
    for name in ("web-0", "web-1"):
        assert setup.reporter.phases(name) == [P.PENDING, P.PULLING, P.BOOTING, P.RUNNING]
        assert setup.phase(name) == P.RUNNING
    assert set(setup.driver.list()) == {"web-0", "web-1"}
    assert setup.images.pulled == [DIGEST, DIGEST]
    assert [s.name for s in setup.rec.statuses()] == ["web-0", "web-1"]
    assert setup.rec.status("web-0").generation == 1
    # Converged: another pass changes nothing.
    before = len(setup.reporter.reports)
    setup.converge()
    assert len(setup.reporter.reports) == before
    assert setup.driver.start_counts() == {"web-0": 1, "web-1": 1}


def test_stops_what_is_extra_then_forgets_it(setup):
    setup.rec.replace_desired([vnode("web-0"), vnode("web-1")])
    setup.converge()
    setup.rec.remove_desired(["web-1"])
    setup.converge()
    assert setup.reporter.phases("web-1")[-2:] == [P.STOPPING, P.STOPPED]
    assert set(setup.driver.list()) == {"web-0"}
    setup.converge()
    assert [s.name for s in setup.rec.statuses()] == ["web-0"]


def test_a_deleting_vnode_is_stopped_and_stays_reported_stopped(setup):
    setup.rec.replace_desired([vnode("web-0")])
    setup.converge()
    setup.rec.upsert_desired([vnode("web-0", deleting=True)])
    setup.converge()
    setup.converge()
    assert setup.driver.list() == {}
    assert setup.phase("web-0") == P.STOPPED


def test_restarts_a_crashed_guest_after_a_backoff_reporting_failed_between(setup):
    setup.rec.replace_desired([vnode("web-0")])
    setup.converge()
    setup.driver.crash("web-0")
    setup.converge()
    status = setup.rec.status("web-0")
    assert status.phase == P.FAILED and "guest exited: crashed" in status.reason
    setup.clock.now += 0.5                     # backoff (1 s) not over: left alone
    setup.converge()
    assert setup.driver.list()["web-0"].state == EXITED
    setup.clock.now += 0.5
    setup.converge()
    assert setup.phase("web-0") == P.RUNNING
    assert setup.driver.start_counts() == {"web-0": 2}
    assert setup.reporter.phases("web-0")[-4:] == [P.FAILED, P.PULLING, P.BOOTING, P.RUNNING]


def test_crash_marker_written_by_another_process_is_noticed(setup):
    setup.rec.replace_desired([vnode("web-0")])
    setup.converge()
    open(setup.driver.marker_path("web-0"), "w").close()
    setup.converge()
    assert setup.phase("web-0") == P.FAILED


def test_failed_start_is_reported_with_its_reason_and_retried_with_growing_backoff(tmp_path, image):
    driver = FakeDriver(str(tmp_path / "state"), boot_seconds=0, fail_start=["web-0"])
    s = Setup(tmp_path, image, driver=driver)
    s.rec.replace_desired([vnode("web-0"), vnode("web-1")])
    s.converge()
    failed = s.rec.status("web-0")
    assert failed.phase == P.FAILED
    assert "starting: command fake-vmm exited 1" in failed.reason
    assert "told to fail starting web-0" in failed.reason and "retry in 1s" in failed.reason
    assert s.phase("web-1") == P.RUNNING
    s.clock.now += 1
    s.converge()
    assert "retry in 2s" in s.rec.status("web-0").reason
    driver.fail_start = ()
    s.clock.now += 1                           # 2 s backoff not over yet
    s.converge()
    assert s.phase("web-0") == P.FAILED
    s.clock.now += 1
    s.converge()
    assert s.phase("web-0") == P.RUNNING
    s.rec.close()


def test_a_failure_with_a_temporary_cause_says_so(tmp_path, image):
    # The Daemon restarting: fencing web-0 fails for now, and its reason
    # says the cause is temporary (sodactl --wait waits for the retry); a
    # guest that failed by itself says no such thing.
    class DaemonRestarting(GuestPlumbing):
        down = True

        def prepare(self, want, hypervisor):
            if self.down and want.name == "web-0":
                raise Unavailable("cannot reach the SODA Daemon at /run/soda/daemon.sock")
            return {}

    plumbing = DaemonRestarting()
    driver = FakeDriver(str(tmp_path / "state"), boot_seconds=0, fail_start=["web-1"])
    s = Setup(tmp_path, image, driver=driver, plumbing=plumbing)
    s.rec.replace_desired([vnode("web-0"), vnode("web-1")])
    s.converge()
    assert s.rec.status("web-0").reason == ("starting: cannot reach the SODA Daemon at "
                                            "/run/soda/daemon.sock (temporary, retry in 1s)")
    assert s.rec.status("web-1").reason.endswith("told to fail starting web-1 (retry in 1s)")
    plumbing.down = False
    s.clock.now += 1
    s.converge()
    assert s.phase("web-0") == P.RUNNING
    s.rec.close()


def test_failed_pull_is_reported_and_nothing_boots(tmp_path, image):
    images = FakeImages(image, fail=Unavailable("cannot reach the SODA Master"))
    s = Setup(tmp_path, image, images=images)
    s.rec.replace_desired([vnode("web-0")])
    s.converge()
    status = s.rec.status("web-0")
    assert status.phase == P.FAILED
    assert status.reason.startswith(f"pulling image {DIGEST}: cannot reach the SODA Master")
    assert s.driver.list() == {}
    s.rec.close()


def test_a_restarted_agent_adopts_running_guests_without_starting_them(tmp_path, image):
    first = Setup(tmp_path, image)
    first.rec.replace_desired([vnode("web-0"), vnode("web-1")])
    first.converge()
    first.rec.close()                          # the Agent stops: guests keep running
    assert all(i.state == RUNNING for i in first.driver.list().values())

    second = Setup(tmp_path, image, driver=FakeDriver(str(tmp_path / "state"), boot_seconds=0))
    second.converge()                          # no desired set yet: observe only
    assert second.phase("web-0") == P.RUNNING
    second.rec.replace_desired([vnode("web-0"), vnode("web-1")])
    second.converge()
    assert second.reporter.phases("web-0") == [P.RUNNING]
    assert second.driver.start_counts() == {"web-0": 1, "web-1": 1}
    assert second.images.pulled == []
    second.rec.close()


def test_nothing_is_stopped_before_the_first_desired_set(setup):
    setup.rec.replace_desired([vnode("web-0")])
    setup.converge()
    other = Reconciler({"fake": setup.driver}, RecordingReporter(), setup.images)
    other.reconcile_once()
    assert other.wait_idle(5)
    assert set(setup.driver.list()) == {"web-0"}
    with pytest.raises(WrongState):
        other.upsert_desired([vnode("web-1")])
    with pytest.raises(WrongState):
        other.remove_desired(["web-0"])
    other.close()


def test_a_new_generation_restarts_the_guest(setup):
    setup.rec.replace_desired([vnode("web-0")])
    setup.converge()
    setup.rec.upsert_desired([vnode("web-0", generation=2)])
    setup.converge()
    assert setup.reporter.phases("web-0")[-2:] == [P.STOPPING, P.STOPPED]
    setup.converge()
    assert setup.rec.status("web-0").phase == P.RUNNING
    assert setup.rec.status("web-0").generation == 2
    assert setup.driver.list()["web-0"].generation == 2
    assert setup.driver.start_counts() == {"web-0": 2}


def test_a_hypervisor_this_node_lacks_is_a_failure_with_a_reason(setup):
    setup.rec.replace_desired([vnode("web-0", hypervisor="qemu")])
    setup.converge()
    status = setup.rec.status("web-0")
    assert status.phase == P.FAILED
    assert "hypervisor 'qemu' is not available on this node (available: fake)" in status.reason


def test_a_guest_that_never_gets_ready_times_out_and_is_stopped(tmp_path, image):
    clock = FakeClock(100.0)
    driver = FakeDriver(str(tmp_path / "state"), clock=clock, boot_seconds=1000, sleep=lambda s: None)
    s = Setup(tmp_path, image, clock=clock, driver=driver, boot_timeout=30)
    s.rec.replace_desired([vnode("web-0")])
    s.rec.reconcile_once()
    wait_for(lambda: s.phase("web-0") == P.BOOTING)
    clock.now += 31
    assert s.rec.wait_idle(5)
    assert s.phase("web-0") == P.FAILED
    assert "not answering on port 80 30s after start (boot_timeout)" in s.rec.status("web-0").reason
    assert driver.list() == {}
    s.rec.close()


class CountingDriver(FakeDriver):
    """Counts guests between start() and readiness: the boots in flight."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.lock = threading.Lock()
        self.booting = set()
        self.most = 0

    def start(self, spec):
        with self.lock:
            self.booting.add(spec.name)
            self.most = max(self.most, len(self.booting))
        return super().start(spec)

    def is_ready(self, name):
        ready = super().is_ready(name)
        if ready:
            with self.lock:
                self.booting.discard(name)
        return ready


def test_boots_run_in_parallel_but_no_more_than_max_parallel_boots(tmp_path, image):
    driver = CountingDriver(str(tmp_path / "state"), boot_seconds=0.1)
    s = Setup(tmp_path, image, clock=time.monotonic, driver=driver, max_parallel_boots=2)
    s.rec.replace_desired([vnode(f"web-{i}") for i in range(6)])
    s.converge()
    assert all(s.phase(f"web-{i}") == P.RUNNING for i in range(6))
    assert driver.most == 2
    s.rec.close()


def test_a_vnode_removed_while_queued_is_never_started(tmp_path, image):
    driver = CountingDriver(str(tmp_path / "state"), boot_seconds=0.2)
    s = Setup(tmp_path, image, clock=time.monotonic, driver=driver, max_parallel_boots=1)
    s.rec.replace_desired([vnode("web-0"), vnode("web-1")])
    s.rec.reconcile_once()
    s.rec.remove_desired(["web-1"])            # web-1 waits behind web-0's boot
    assert s.rec.wait_idle(5)
    s.converge()
    assert driver.start_counts() == {"web-0": 1}
    assert [st.name for st in s.rec.statuses()] == ["web-0"]
    s.rec.close()


def test_run_loop_converges_and_close_leaves_guests_running(setup):
    stop = threading.Event()
    loop = threading.Thread(target=setup.rec.run, args=(stop,))
    loop.start()
    setup.rec.replace_desired([vnode("web-0")])
    wait_for(lambda: setup.phase("web-0") == P.RUNNING)
    setup.rec.close()
    loop.join(5)
    assert not loop.is_alive()
    assert setup.driver.list()["web-0"].state == RUNNING


def test_a_bug_in_one_vnodes_start_fails_that_vnode_only_and_is_retried(tmp_path, image):
    class BrokenDriver(FakeDriver):
        def start(self, spec):
            if spec.name == "web-1":
                raise RuntimeError("driver bug")
            return super().start(spec)

    clock = FakeClock(100.0)
    s = Setup(tmp_path, image, clock=clock, driver=BrokenDriver(str(tmp_path / "state")))
    s.rec.replace_desired([vnode("web-0"), vnode("web-1"), vnode("web-2")])
    s.converge()
    assert s.phase("web-0") == s.phase("web-2") == P.RUNNING
    failed = s.rec.status("web-1")
    assert failed.phase == P.FAILED
    assert "driver bug" in failed.reason and "retry in 1s" in failed.reason
    s.converge()                                   # reconciling goes on, nothing raises
    assert s.phase("web-0") == s.phase("web-2") == P.RUNNING
    clock.now += 1.0
    s.converge()                                   # retried after the backoff, failing again
    assert "retry in 2s" in s.rec.status("web-1").reason
    s.rec.close()


def test_a_bug_in_a_stop_fails_that_vnode_only_and_is_retried(tmp_path, image):
    class BrokenStop(FakeDriver):
        broken = True

        def stop(self, name, timeout):
            if name == "web-0" and self.broken:
                raise KeyError("stop bug")
            return super().stop(name, timeout)

    clock = FakeClock(100.0)
    driver = BrokenStop(str(tmp_path / "state"))
    s = Setup(tmp_path, image, clock=clock, driver=driver)
    s.rec.replace_desired([vnode("web-0"), vnode("web-1")])
    s.converge()
    s.rec.replace_desired([vnode("web-1"), vnode("web-2")])
    s.converge()
    assert s.phase("web-0") == P.FAILED and "stop bug" in s.rec.status("web-0").reason
    assert s.phase("web-1") == s.phase("web-2") == P.RUNNING
    driver.broken = False
    clock.now += 1.0
    s.converge()
    s.converge()
    assert "web-0" not in driver.list() and s.phase("web-0") is None
    s.rec.close()


def test_a_bug_in_a_limit_change_keeps_the_guest_running_and_backs_off(tmp_path, image):
    calls = []

    class BrokenPlumbing(GuestPlumbing):
        def prepare(self, want, hypervisor):
            return {}

        def update(self, want, hypervisor):
            calls.append(want.name)
            raise ZeroDivisionError("update bug")

        def release(self, name, hypervisor):
            pass

        def usage(self, name, hypervisor):
            return None

    clock = FakeClock(100.0)
    s = Setup(tmp_path, image, clock=clock, plumbing=BrokenPlumbing())
    s.rec.replace_desired([vnode("web-0")])
    s.converge()
    s.converge()                                    # adopted limits differ from nothing: no update yet
    resized = dataclasses.replace(vnode("web-0"), resources=Resources(cpu=1.0, memory=64,
                                                                      bandwidth=10, disk=64))
    s.rec.replace_desired([resized])
    s.converge()
    status = s.rec.status("web-0")
    assert status.phase == P.RUNNING and "update bug" in status.reason
    tries = len(calls)
    s.converge()
    s.converge()
    assert len(calls) == tries                      # held back until the backoff passes
    clock.now += 1.0
    s.converge()
    assert len(calls) == tries + 1
    s.rec.close()


def test_picks_the_driver_a_vnode_names_or_the_preferred_one_and_moves_between_them(tmp_path, image):
    # Two fake drivers stand in for two hypervisors (each keeps its own dir).
    fake = FakeDriver(str(tmp_path / "a"), boot_seconds=0, sleep=lambda s: None)
    other = FakeDriver(str(tmp_path / "b"), boot_seconds=0, sleep=lambda s: None)
    reporter = RecordingReporter()
    clock = FakeClock(100.0)
    rec = Reconciler({"fake": fake, "uml": other}, reporter, FakeImages(image), clock=clock,
                     ready_poll=0.01)
    rec.replace_desired([vnode("web-0"), vnode("web-1", hypervisor="uml"),
                         vnode("web-2", hypervisor="")])
    rec.reconcile_once()
    assert rec.wait_idle(5)
    assert set(fake.list()) == {"web-0", "web-2"}       # "": the node's first driver
    assert set(other.list()) == {"web-1"}
    rec.upsert_desired([vnode("web-0", generation=2, hypervisor="uml")])
    for _ in range(2):                                  # stop on fake, then start on uml
        rec.reconcile_once()
        assert rec.wait_idle(5)
    assert set(fake.list()) == {"web-2"}
    assert set(other.list()) == {"web-0", "web-1"}
    assert rec.status("web-0").phase == P.RUNNING and rec.status("web-0").generation == 2
    rec.close()


def test_a_failed_stop_is_reported_and_retried_after_a_backoff(tmp_path, image):
    from soda.errors import CommandError

    class StubbornDriver(FakeDriver):
        refusals = 1

        def stop(self, name, timeout):
            if self.refusals:
                self.refusals -= 1
                raise CommandError(["fake-vmm", "halt", name], 1, err="device busy")
            super().stop(name, timeout)

    s = Setup(tmp_path, image, driver=StubbornDriver(str(tmp_path / "state"), boot_seconds=0,
                                                     sleep=lambda s: None))
    s.rec.replace_desired([vnode("web-0")])
    s.converge()
    s.rec.remove_desired(["web-0"])
    s.converge()
    failed = s.rec.status("web-0")
    assert failed.phase == P.FAILED and failed.reason.startswith("stopping: command fake-vmm exited 1")
    s.converge()                                        # backoff not over: not hammered
    assert s.driver.refusals == 0 and "web-0" in s.driver.list()
    s.clock.now += 1
    s.converge()
    s.converge()
    assert s.driver.list() == {} and s.rec.statuses() == []
    s.rec.close()


class RecordingPlumbing(GuestPlumbing):
    """Prepares like NodePlumbing would for any hypervisor, and records calls."""

    def __init__(self, fail_prepare=None):
        self.calls = []
        self.fail_prepare = fail_prepare

    def prepare(self, want, hypervisor):
        self.calls.append(("prepare", want.name))
        if self.fail_prepare:
            raise self.fail_prepare
        return {"tap": f"st-{want.name}", "netns": "ns1", "cgroups": (f"/cg/{want.name}",)}

    def release(self, name, hypervisor):
        self.calls.append(("release", name))


def test_plumbing_wraps_the_guest_lifecycle(tmp_path, image):
    driver = FakeDriver(str(tmp_path / "state"), boot_seconds=0)
    plumbing = RecordingPlumbing()
    rec = Reconciler({"fake": driver}, RecordingReporter(), FakeImages(image), plumbing=plumbing)
    rec.replace_desired([vnode("web-0")])
    rec.reconcile_once()
    wait_for(lambda: driver.is_ready("web-0"))
    spec = driver._load("web-0")["spec"]
    assert (spec["tap"], spec["netns"], spec["cgroups"]) == ("st-web-0", "ns1", ["/cg/web-0"])
    rec.remove_desired(["web-0"])
    # A pass passes a guest by while its start is still in flight (the
    # driver may answer ready before the start action returns): pass again,
    # as the Agent's loop does.
    wait_for(lambda: rec.reconcile_once() or ("release", "web-0") in plumbing.calls)
    assert plumbing.calls == [("prepare", "web-0"), ("release", "web-0")]
    rec.close()


def test_failed_plumbing_is_undone_and_reported(tmp_path, image):
    from soda.errors import SodaError
    driver = FakeDriver(str(tmp_path / "state"), boot_seconds=0)
    plumbing = RecordingPlumbing(fail_prepare=SodaError("no such bridge"))
    reporter = RecordingReporter()
    rec = Reconciler({"fake": driver}, reporter, FakeImages(image), plumbing=plumbing)
    rec.replace_desired([vnode("web-0")])
    rec.reconcile_once()
    wait_for(lambda: P.FAILED in reporter.phases("web-0"))
    assert "no such bridge" in reporter.last("web-0").reason
    assert plumbing.calls == [("prepare", "web-0"), ("release", "web-0")]
    assert driver.list() == {}
    rec.close()


def test_changed_cpu_is_applied_live_without_a_restart(tmp_path, image):
    driver = FakeDriver(str(tmp_path / "state"), boot_seconds=0)
    plumbing = RecordingPlumbing()
    updates = []
    plumbing.update = lambda want, hypervisor: updates.append((want.name, want.resources.cpu))
    rec = Reconciler({"fake": driver}, RecordingReporter(), FakeImages(image), plumbing=plumbing)
    rec.replace_desired([vnode("web-0")])
    rec.reconcile_once()
    wait_for(lambda: driver.is_ready("web-0"))
    rec.reconcile_once()
    assert updates == []                                   # limits already in force
    from dataclasses import replace
    grown = replace(vnode("web-0"), resources=Resources(cpu=1.0, memory=64, bandwidth=10, disk=64))
    rec.upsert_desired([grown])
    rec.reconcile_once()
    wait_for(lambda: updates == [("web-0", 1.0)])
    rec.reconcile_once()
    assert updates == [("web-0", 1.0)]
    assert driver._read_counters()["starts"]["web-0"] == 1   # never restarted
    rec.close()


def test_statuses_with_usage_ask_the_plumbing_for_running_guests_only(tmp_path, image):
    from soda.model.usage import Usage
    driver = FakeDriver(str(tmp_path / "state"), boot_seconds=0)
    plumbing = RecordingPlumbing()
    asked = []

    def usage(name, hypervisor):
        asked.append((name, hypervisor))
        return Usage(cpu_seconds=2.5, memory_bytes=1 << 20) if name == "web-0" else None
    plumbing.usage = usage
    rec = Reconciler({"fake": driver}, RecordingReporter(), FakeImages(image), plumbing=plumbing)
    rec.replace_desired([vnode("web-0"), vnode("web-1")])
    rec.reconcile_once()
    wait_for(lambda: driver.is_ready("web-0") and driver.is_ready("web-1"))
    rec.reconcile_once()
    wait_for(lambda: all(s.phase == P.RUNNING for s in rec.statuses()) and len(rec.statuses()) == 2)
    got = {s.name: s for s in rec.statuses_with_usage()}
    assert got["web-0"].usage == Usage(cpu_seconds=2.5, memory_bytes=1 << 20)
    assert got["web-1"].usage is None
    assert sorted(asked) == [("web-0", "fake"), ("web-1", "fake")]
    # The plain inventory (phase reports) never carries usage.
    assert all(s.usage is None for s in rec.statuses())
    rec.close()


def test_a_fence_that_could_not_be_released_is_released_again_before_it_is_forgotten(tmp_path, image):
    """The Daemon down while a guest stops: the guest is gone, its fence and
    network are not. They are released again after the backoff, and the
    virtual node stays known (FAILED, then STOPPED) until they are."""
    from soda.errors import Unavailable

    class FlakyRelease(GuestPlumbing):
        def __init__(self):
            self.failures_left = 1
            self.released = []

        def prepare(self, want, hypervisor):
            return {}

        def update(self, want, hypervisor):
            pass

        def release(self, name, hypervisor):
            if self.failures_left:
                self.failures_left -= 1
                raise Unavailable("the SODA Daemon is not serving")
            self.released.append(name)

        def usage(self, name, hypervisor):
            return None

    clock = FakeClock()
    plumbing = FlakyRelease()
    s = Setup(tmp_path, image, clock=clock, plumbing=plumbing)
    s.rec.replace_desired([vnode("web-0")])
    s.converge()
    s.rec.replace_desired([])
    s.converge()
    assert "web-0" not in s.driver.list()
    status = s.rec.status("web-0")
    assert status.phase == P.FAILED and "releasing its fence" in status.reason
    s.converge()                                   # before the backoff: still known, not forgotten
    assert s.rec.status("web-0") is not None and plumbing.released == []
    clock.now += 1.0
    s.converge()
    assert plumbing.released == ["web-0"]
    s.converge()
    assert s.rec.status("web-0") is None           # released, then forgotten
    s.rec.close()


class LeftoverPlumbing(GuestPlumbing):
    """The fences and TAPs the node holds, by virtual node (what NodePlumbing
    lists from the Daemon and the kernel), with listings and releases that
    fail a given number of times as with the Daemon down."""

    def __init__(self, found, listing_failures=0, release_failures=0):
        self.found = set(found)
        self.listing_failures = listing_failures
        self.release_failures = release_failures
        self.listings = 0
        self.released = []               # (how, name)

    def leftovers(self):
        self.listings += 1
        if self.listing_failures:
            self.listing_failures -= 1
            raise Unavailable("the SODA Daemon is not serving")
        return set(self.found)

    def release(self, name, hypervisor):
        self.released.append(("release", name))
        self.found.discard(name)

    def release_leftover(self, name):
        if self.release_failures:
            self.release_failures -= 1
            raise Unavailable("the SODA Daemon is not serving")
        self.released.append(("leftover", name))
        self.found.discard(name)


def test_a_restarted_agent_releases_the_fences_an_earlier_one_left_and_only_those(tmp_path, image):
    """An Agent killed between a guest's stop and the release of its fence
    leaves the fence and TAP behind, and only it knew. The next Agent lists
    them at its first desired set and releases those of virtual nodes that
    are neither wanted nor running; a running guest (even one it cannot
    stop) and a wanted one keep theirs."""
    from soda.errors import CommandError

    class StubbornDriver(FakeDriver):
        def stop(self, name, timeout):
            if name == "extra-4":
                raise CommandError(["fake-vmm", "halt", name], 1, err="device busy")
            super().stop(name, timeout)

    earlier = Setup(tmp_path, image)
    earlier.rec.replace_desired([vnode("web-0"), vnode("extra-4")])
    earlier.converge()
    earlier.rec.close()

    plumbing = LeftoverPlumbing({"web-0", "web-1", "old-2", "gone-3", "extra-4"})
    s = Setup(tmp_path, image, plumbing=plumbing,
              driver=StubbornDriver(str(tmp_path / "state"), boot_seconds=0, sleep=lambda s: None))
    s.converge()                 # before the first desired set: nothing to judge by
    assert plumbing.listings == 0 and plumbing.released == []
    s.rec.replace_desired([vnode("web-0"), vnode("web-1"), vnode("gone-3", deleting=True)])
    for _ in range(3):
        s.converge()
    assert sorted(plumbing.released) == [("leftover", "gone-3"), ("leftover", "old-2")]
    assert plumbing.listings == 1
    assert set(s.driver.list()) == {"web-0", "web-1", "extra-4"}
    assert s.phase("web-0") == s.phase("web-1") == P.RUNNING
    assert s.phase("extra-4") == P.FAILED            # its stop failed: it runs on, fenced
    assert s.phase("old-2") is None                  # released, never reported
    s.rec.close()


def test_leftovers_are_listed_and_released_again_with_backoff_while_the_daemon_is_down(tmp_path, image):
    plumbing = LeftoverPlumbing({"old-2"}, listing_failures=1, release_failures=1)
    clock = FakeClock(100.0)
    s = Setup(tmp_path, image, clock=clock, plumbing=plumbing)
    s.rec.replace_desired([])
    s.converge()
    s.converge()
    assert plumbing.listings == 1                    # failed; not asked again before the backoff
    clock.now += 1.0
    s.converge()                                     # listed
    s.converge()                                     # its release fails
    s.converge()
    assert plumbing.listings == 2 and plumbing.released == []
    clock.now += 1.0
    s.converge()
    assert plumbing.released == [("leftover", "old-2")]
    s.converge()
    assert plumbing.listings == 2 and plumbing.released == [("leftover", "old-2")]
    assert s.rec.statuses() == []
    s.rec.close()



def test_node_plumbing_finds_fences_and_taps_by_virtual_node_and_releases_them():
    from types import SimpleNamespace

    from soda.agent.plumbing import NodePlumbing
    from soda.model.state import DriverCapabilities

    calls = []

    class Daemon:
        def list(self):
            return [SimpleNamespace(name="old-2"), SimpleNamespace(name="web-0")]    # Fences

        def release_limits(self, name):
            calls.append(("release_limits", name))

    class Network:
        def plugged(self):
            return {"web-0", "tap-only-5"}

        def unplug(self, name):
            calls.append(("unplug", name))

    caps = {"uml": DriverCapabilities("uml", plumbing=True)}
    plumbing = NodePlumbing(Network(), Daemon(), caps)
    assert plumbing.leftovers() == {"old-2", "web-0", "tap-only-5"}
    plumbing.release_leftover("old-2")
    assert calls == [("release_limits", "old-2"), ("unplug", "old-2")]
    assert NodePlumbing(Network(), None, caps).leftovers() == {"web-0", "tap-only-5"}
    assert GuestPlumbing().leftovers() == set()


def test_a_services_own_boot_timeout_wins_over_the_drivers(tmp_path, image):
    clock = FakeClock(100.0)
    driver = FakeDriver(str(tmp_path / "state"), clock=clock, boot_seconds=1000, sleep=lambda s: None)
    assert driver.boot_timeout == 60.0
    s = Setup(tmp_path, image, clock=clock, driver=driver)
    s.rec.replace_desired([dataclasses.replace(vnode("web-0"), boot_timeout=5.0, port=8080)])
    s.rec.reconcile_once()
    wait_for(lambda: s.phase("web-0") == P.BOOTING)
    clock.now += 6
    assert s.rec.wait_idle(5)
    assert s.phase("web-0") == P.FAILED
    reason = s.rec.status("web-0").reason
    assert "not answering on port 8080 5s after start (boot_timeout); console: " in reason, reason
    assert "retry in" in reason
    assert s.rec.console_of("web-0") == ("", "")
    with pytest.raises(NotFound):
        s.rec.console_of("web-9")
    s.rec.close()
