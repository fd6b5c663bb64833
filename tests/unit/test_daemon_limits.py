"""LimitManager over the v1 backend on a fake tree and a fake shaper, no root."""

import os
import shutil

import pytest

from soda import errors
from soda.daemon.cgroups import CgroupV1
from soda.daemon.config import DaemonConfig
from soda.daemon.limits import LimitManager
from soda.daemon.plan import MIB
from soda.daemon.tc import Shaper, Shaping, TrafficCounters, ifb_name
from soda.model.spec import Resources

from tests.unit.test_daemon_cgroups import make_v1_tree
from tests.fakes import FakeClock


class FakeShaper(Shaper):
    """Keeps what the kernel would hold: {vnode: Shaping}; TAPs in `taps`."""

    def __init__(self, scope="soda", taps=("tap-web0", "tap-web1")):
        self.scope = scope
        self.taps = set(taps)
        self.state: dict[str, Shaping] = {}
        self.calls: list[tuple] = []
        self.closed = False

    def apply(self, vnode, tap, rate_bit, burst_bytes):
        self.calls.append(("apply", vnode, tap, rate_bit))
        if tap not in self.taps:
            raise errors.NotFound(f"TAP {tap} does not exist")
        ifb = ifb_name(self.scope, vnode)
        self.state[vnode] = Shaping(tap=tap, ifb=ifb, rate_bit=rate_bit, burst_bytes=burst_bytes)
        return ifb

    def release(self, vnode):
        self.calls.append(("release", vnode))
        return self.state.pop(vnode, None) is not None

    def read(self, vnode):
        return self.state.get(vnode)

    def counters(self, vnode):
        if vnode not in self.state:
            return None
        return TrafficCounters(bytes_to_guest=100, bytes_from_guest=200)

    def close(self):
        self.closed = True


class FakeKernelCgroups(CgroupV1):
    """A v1 backend on a fake tree whose kill() acts like the kernel: the
    process leaves every cgroup.procs. Pids in `stubborn` never die; each
    pid in `forks` spawns its value into the cgroup when killed."""

    def __init__(self, root, parent="soda", freezer=False):
        super().__init__(make_v1_tree(root), parent, rmdir=shutil.rmtree, sleep=lambda s: None,
                         freezer=freezer)
        self.killed: list[int] = []
        self.stubborn: set[int] = set()
        self.forks: dict[int, int] = {}

    def add_pid(self, name, pid, controllers=("cpu", "cpuacct", "memory", "pids")):
        for c in controllers:
            path = os.path.join(self.root, c, self.parent, name, "cgroup.procs")
            with open(path, "a") as f:
                f.write(f"{pid}\n")

    def kill(self, name, pid, sig=9):
        if pid in self.stubborn:
            return True
        self.killed.append(pid)
        for path in self.paths(name):
            procs = os.path.join(path, "cgroup.procs")
            if os.path.exists(procs):
                with open(procs) as f:
                    left = [p for p in f.read().split() if int(p) != pid]
                with open(procs, "w") as f:
                    f.write("".join(f"{p}\n" for p in left))
        if pid in self.forks:
            self.add_pid(name, self.forks.pop(pid))
        return True


def make_manager(tmp_path, **cfg):
    cgroups = FakeKernelCgroups(tmp_path / "cg")
    shaper = FakeShaper()
    clock = FakeClock(0.0)
    manager = LimitManager(cgroups, shaper, DaemonConfig(**cfg), clock=clock, sleep=clock.sleep)
    return manager, cgroups, shaper


def read(path):
    with open(path) as f:
        return f.read().strip()


WEB = Resources(cpu=0.5, memory=64, bandwidth=10, disk=256)


def test_apply_fences_cgroups_and_tap(tmp_path):
    m, cg, sh = make_manager(tmp_path)
    fence = m.apply("web-0", WEB, "uml", 32, "tap-web0", cpu_cap=True)
    assert fence.cgroups == cg.paths("web-0")
    assert fence.cgroup_version == "v1"
    assert (fence.tap, fence.ifb) == ("tap-web0", ifb_name("soda", "web-0"))
    assert fence.limits.cpu_shares == 512 and fence.limits.cpu_quota_us == 50_000
    cpu_dir = fence.cgroups[0]
    assert read(os.path.join(cpu_dir, "cpu.shares")) == "512"
    assert read(os.path.join(cpu_dir, "cpu.cfs_quota_us")) == "50000"
    assert read(os.path.join(fence.cgroups[2], "memory.limit_in_bytes")) == str(96 * MIB)
    assert sh.state["web-0"].rate_bit == 10_000_000


def test_apply_again_changes_limits_in_place(tmp_path):
    m, cg, sh = make_manager(tmp_path)
    first = m.apply("web-0", WEB, "uml", 32, "tap-web0", cpu_cap=True)
    second = m.apply("web-0", Resources(cpu=1.0, memory=128, bandwidth=50), "uml", 32, "tap-web0",
                     cpu_cap=False)
    assert second.cgroups == first.cgroups
    assert read(os.path.join(second.cgroups[0], "cpu.shares")) == "1024"
    assert read(os.path.join(second.cgroups[0], "cpu.cfs_quota_us")) == "-1"
    assert read(os.path.join(second.cgroups[2], "memory.limit_in_bytes")) == str(160 * MIB)
    assert sh.state["web-0"].rate_bit == 50_000_000
    assert m.list() == [second]


def test_fake_guest_without_tap_gets_only_cgroups(tmp_path):
    m, cg, sh = make_manager(tmp_path)
    fence = m.apply("web-0", Resources(cpu=1, memory=64, bandwidth=10), "fake", 0, "")
    assert (fence.tap, fence.ifb, fence.limits.rate_bit) == ("", "", 0)
    assert fence.limits.memory_bytes == 64 * MIB
    assert "web-0" not in sh.state


def test_dropping_the_bandwidth_removes_shaping(tmp_path):
    m, cg, sh = make_manager(tmp_path)
    m.apply("web-0", WEB, "uml", 32, "tap-web0")
    fence = m.apply("web-0", Resources(cpu=0.5, memory=64, bandwidth=0), "uml", 32, "tap-web0")
    assert fence.ifb == "" and fence.limits.rate_bit == 0
    assert "web-0" not in sh.state


def test_missing_tap_is_not_found(tmp_path):
    m, cg, sh = make_manager(tmp_path)
    with pytest.raises(errors.NotFound, match="TAP"):
        m.apply("web-0", WEB, "uml", 32, "tap-nothere")


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="Web_0"), "virtual node name"),
    (dict(name="../x"), "virtual node name"),
    (dict(hypervisor="Xen 4"), "hypervisor name"),
    (dict(memory_overhead=-1), "memory overhead"),
    (dict(tap="a-tap-name-too-long"), "TAP name"),
    (dict(tap="tap/0"), "TAP name"),
    (dict(resources=Resources(cpu=0, memory=64)), "cpu"),
])
def test_bad_requests_change_nothing(tmp_path, kwargs, match):
    m, cg, sh = make_manager(tmp_path)
    args = dict(name="web-0", resources=WEB, hypervisor="uml", memory_overhead=32, tap="tap-web0")
    args.update(kwargs)
    with pytest.raises(errors.InvalidSpec, match=match):
        m.apply(**args)
    assert cg.names() == [] and sh.state == {}


def test_release_kills_removes_and_unshapes(tmp_path):
    m, cg, sh = make_manager(tmp_path)
    m.apply("web-0", WEB, "uml", 32, "tap-web0")
    cg.add_pid("web-0", 4242)
    cg.add_pid("web-0", 4243, controllers=("memory",))     # joined only one hierarchy
    cg.forks[4242] = 4244                                    # forks while we kill
    done = m.release("web-0")
    assert done.existed and done.killed == 3
    assert sorted(cg.killed) == [4242, 4243, 4244]
    assert not cg.exists("web-0")
    assert sh.state == {}
    assert m.list() == []


def test_release_is_idempotent(tmp_path):
    m, cg, sh = make_manager(tmp_path)
    assert m.release("never-was").existed is False
    m.apply("web-0", WEB, "uml", 32, "tap-web0")
    assert m.release("web-0").existed is True
    assert m.release("web-0").existed is False


def test_release_gives_up_on_unkillable_processes(tmp_path):
    m, cg, sh = make_manager(tmp_path, kill_timeout_seconds=1.0)
    m.apply("web-0", WEB, "uml", 32, "tap-web0")
    cg.add_pid("web-0", 4242)
    cg.stubborn.add(4242)
    with pytest.raises(errors.TemporaryError, match="4242"):
        m.release("web-0")
    assert cg.exists("web-0")          # nothing removed under a live process


def test_a_new_manager_finds_everything_again(tmp_path):
    m, cg, sh = make_manager(tmp_path)
    a = m.apply("web-0", WEB, "uml", 32, "tap-web0", cpu_cap=True)
    b = m.apply("web-1", Resources(cpu=1, memory=32), "fake", 0, "")
    # A "restart": new backend and manager objects over the same kernel state.
    again = LimitManager(CgroupV1(cg.root, "soda"), sh, DaemonConfig())
    assert again.list() == [a, b]
    assert again.get("web-0") == a
    with pytest.raises(errors.NotFound):
        again.get("web-9")


def test_usage_combines_cgroup_and_traffic_counters(tmp_path):
    m, cg, sh = make_manager(tmp_path)
    fence = m.apply("web-0", WEB, "uml", 32, "tap-web0")
    with open(os.path.join(fence.cgroups[1], "cpuacct.usage"), "w") as f:
        f.write("1000000000\n")
    u = m.usage("web-0")
    assert u.cpu_seconds == 1.0
    assert u.memory_limit_bytes == 96 * MIB
    assert (u.bytes_to_guest, u.bytes_from_guest) == (100, 200)
    with pytest.raises(errors.NotFound):
        m.usage("web-9")


def test_manager_without_shaper_fences_cgroups_only(tmp_path):
    cg = FakeKernelCgroups(tmp_path / "cg")
    m = LimitManager(cg, None, DaemonConfig())
    assert m.apply("web-0", WEB, "fake", 0, "").ifb == ""
    with pytest.raises(errors.WrongState, match="shapes no traffic"):
        m.apply("web-1", WEB, "uml", 32, "tap-web1")
    assert m.release("web-0").existed
