"""Memory changes of a running guest: the reconciler applies them live
through the driver (fake driver here) and the fence, in the right order,
boots the guest again past its boot size and says why, and shows a refused
change in the guest's status. Plus OOM kills counted across lives (the
mconsole client and /proc/meminfo parsing: tests/unit/test_uml_argv.py)."""

from dataclasses import replace

from soda.agent.plumbing import GuestPlumbing
from soda.agent.reconciler import Reconciler
from soda.errors import WrongState
from soda.hypervisors.fake import FakeDriver
from soda.model.state import Phase
from soda.model.usage import Usage

from tests.fakes import FakeClock, FakeImages, RecordingReporter
from tests.unit.test_reconciler import vnode, wait_for
from tests.unit.test_reconciler import image  # noqa: F401 - fixture


class OrderedPlumbing(GuestPlumbing):
    """Records prepare/update/release next to the driver's memory changes."""

    def __init__(self, log, oom_kills=0):
        self.log = log
        self.oom_kills = oom_kills

    def prepare(self, want, hypervisor):
        self.log.append(("prepare", want.resources.memory))
        return {}

    def update(self, want, hypervisor):
        self.log.append(("fence", want.resources.memory))

    def release(self, name, hypervisor):
        self.log.append(("release", name))

    def usage(self, name, hypervisor):
        return Usage(cpu_seconds=1.0, oom_kills=self.oom_kills)


class LoggingDriver(FakeDriver):
    def __init__(self, *a, log, refuse=None, **kw):
        super().__init__(*a, **kw)
        self.log = log
        self.refuse = refuse

    def set_memory(self, name, memory_mib):
        self.log.append(("guest", memory_mib))
        if self.refuse:
            raise self.refuse
        return super().set_memory(name, memory_mib)


def with_memory(v, memory):
    return replace(v, resources=replace(v.resources, memory=memory))


def running(tmp_path, image, refuse=None, oom_kills=0, clock=None):
    log = []
    driver = LoggingDriver(str(tmp_path / "state"), boot_seconds=0, log=log, refuse=refuse)
    reporter = RecordingReporter()
    rec = Reconciler({"fake": driver}, reporter, FakeImages(image),
                     plumbing=OrderedPlumbing(log, oom_kills), **({"clock": clock} if clock else {}))
    rec.replace_desired([vnode("web-0")])
    rec.reconcile_once()
    wait_for(lambda: driver.is_ready("web-0") and rec.status("web-0").phase == Phase.RUNNING)
    rec.wait_idle(5)
    log.clear()
    return rec, driver, reporter, log


def test_shrinking_gives_the_guest_memory_back_first_then_lowers_the_fence(tmp_path, image):
    rec, driver, _, log = running(tmp_path, image)
    rec.upsert_desired([with_memory(vnode("web-0"), 40)])
    rec.reconcile_once()
    rec.wait_idle(5)
    assert log == [("guest", 40), ("fence", 40)]
    assert driver.memory("web-0") == 40 and driver.start_counts()["web-0"] == 1
    # Growing back within the boot size: the fence first, then the guest.
    log.clear()
    rec.upsert_desired([with_memory(vnode("web-0"), 64)])
    rec.reconcile_once()
    rec.wait_idle(5)
    assert log == [("fence", 64), ("guest", 64)]
    assert driver.memory("web-0") == 64 and driver.start_counts()["web-0"] == 1
    rec.close()


def test_growing_past_the_boot_size_boots_again_and_says_why(tmp_path, image):
    rec, driver, reporter, log = running(tmp_path, image)
    rec.upsert_desired([with_memory(vnode("web-0"), 128)])
    rec.reconcile_once()
    rec.wait_idle(5)
    wait_for(lambda: driver.start_counts()["web-0"] == 2)
    assert ("guest", 128) in log and ("prepare", 128) in log
    assert any(s.phase == Phase.BOOTING and "restarting: 128 MiB of memory is more than it booted with"
               in s.reason for s in reporter.reports)
    wait_for(lambda: rec.status("web-0").phase == Phase.RUNNING)
    assert driver._load("web-0")["spec"]["resources"]["memory"] == 128
    rec.close()


def test_a_refused_shrink_leaves_the_fence_and_shows_in_the_status(tmp_path, image):
    clock = FakeClock(100.0)
    rec, driver, reporter, log = running(tmp_path, image, refuse=WrongState("has 3 MiB free"),
                                         clock=clock)
    rec.upsert_desired([with_memory(vnode("web-0"), 16)])
    rec.reconcile_once()
    rec.wait_idle(5)
    rec.reconcile_once()
    assert ("fence", 16) not in log                       # the limit never dropped under the guest
    status = rec.status("web-0")
    assert status.phase == Phase.RUNNING and "new limits not applied yet: has 3 MiB free" in status.reason
    driver.refuse = None
    clock.now += 1.0                                      # its retry is due
    rec.reconcile_once()
    rec.wait_idle(5)
    rec.reconcile_once()
    assert rec.status("web-0").reason == "" and driver.memory("web-0") == 16
    rec.close()


def test_oom_kills_add_the_fence_and_the_guest_kernel_and_survive_a_reboot(tmp_path, image):
    rec, driver, _, _ = running(tmp_path, image, oom_kills=1)
    driver.oom_kill("web-0")
    driver.oom_kill("web-0")
    [status] = rec.statuses_with_usage()
    assert status.usage.oom_kills == 3                    # 1 by the cgroup + 2 by the guest's kernel
    driver.crash("web-0")                                  # e.g. the memory cgroup killed the VMM
    rec.reconcile_once()
    wait_for(lambda: rec.status("web-0").phase == Phase.FAILED)
    [status] = rec.statuses_with_usage()
    assert status.phase == Phase.FAILED and status.usage.oom_kills == 3
    rec._plumbing.oom_kills = 2                           # the cgroup's count when it is released
    wait_for(lambda: (rec.reconcile_once() or True) and driver.start_counts()["web-0"] == 2, timeout=10)
    rec._plumbing.oom_kills = 0                           # a new fence for the new boot
    wait_for(lambda: rec.status("web-0").phase == Phase.RUNNING)
    [status] = rec.statuses_with_usage()
    assert status.usage.oom_kills == 4                    # 2 + 2 from the first life, none since
    rec.close()


def test_a_reboot_for_more_memory_waits_for_a_boot_slot(tmp_path, image):
    """Growing past the boot size boots the guest again, and that boot
    counts against max_parallel_boots like any other."""
    import threading
    import time

    lock = threading.Lock()
    booting, most = set(), [0]

    class CountingDriver(FakeDriver):
        def start(self, spec):
            with lock:
                booting.add(spec.name)
                most[0] = max(most[0], len(booting))
            return super().start(spec)

        def is_ready(self, name):
            ready = super().is_ready(name)
            if ready:
                with lock:
                    booting.discard(name)
            return ready

    driver = CountingDriver(str(tmp_path / "state"), boot_seconds=0.3)
    rec = Reconciler({"fake": driver}, RecordingReporter(), FakeImages(image), max_parallel_boots=1)
    rec.replace_desired([vnode("web-0")])
    rec.reconcile_once()
    wait_for(lambda: rec.status("web-0") is not None and rec.status("web-0").phase == Phase.RUNNING)
    rec.wait_idle(5)
    # A bigger web-0 and a new web-1 at once: two boots, one slot.
    rec.replace_desired([with_memory(vnode("web-0"), 128), vnode("web-1")])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rec.reconcile_once()
        if driver.start_counts().get("web-0") == 2 and all(
                rec.status(n) is not None and rec.status(n).phase == Phase.RUNNING
                for n in ("web-0", "web-1")):
            break
        time.sleep(0.05)
    assert driver.start_counts() == {"web-0": 2, "web-1": 1}
    assert most[0] == 1, "two guests booted at once with max_parallel_boots=1"
    rec.close()
