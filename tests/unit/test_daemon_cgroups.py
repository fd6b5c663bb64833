"""The cgroup v1 backend against a fake directory tree (same file names), no root."""

import os
from dataclasses import replace
import shutil
import signal
import subprocess

import pytest

from soda import errors
from soda.daemon import cgroups
from soda.daemon.cgroups import CgroupV1, CgroupV2, check_parent, open_backend, os_error, probe
from soda.model.fence import Limits
from soda.model.usage import VnodeUsage

LIMITS = Limits(cpu_shares=512, cpu_quota_us=50_000, cpu_period_us=100_000,
                memory_bytes=96 << 20, pids_max=512, rate_bit=0, burst_bytes=0)


def make_v1_tree(root):
    """A directory tree shaped like /sys/fs/cgroup with v1 controllers."""
    for rel in cgroups.V1_PROBE_FILES:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("0\n")
    return str(root)


def fake_backend(root, parent="soda", proc_root="/proc"):
    return CgroupV1(make_v1_tree(root), parent, proc_root=proc_root, rmdir=shutil.rmtree,
                    sleep=lambda s: None)


def read(path):
    with open(path) as f:
        return f.read().strip()


def test_create_makes_one_dir_per_controller(tmp_path):
    b = fake_backend(tmp_path / "cg")
    paths = b.create("web-0")
    assert paths == tuple(str(tmp_path / "cg" / c / "soda" / "web-0")
                          for c in ("cpu", "cpuacct", "memory", "pids"))
    assert all(os.path.isdir(p) for p in paths)
    assert b.create("web-0") == paths                     # idempotent
    assert b.exists("web-0") and not b.exists("web-1")


def test_set_limits_writes_kernel_files_and_reads_them_back(tmp_path):
    b = fake_backend(tmp_path / "cg")
    b.set_limits("web-0", LIMITS)
    cg = tmp_path / "cg"
    assert read(cg / "cpu/soda/web-0/cpu.shares") == "512"
    assert read(cg / "cpu/soda/web-0/cpu.cfs_period_us") == "100000"
    assert read(cg / "cpu/soda/web-0/cpu.cfs_quota_us") == "50000"
    assert read(cg / "memory/soda/web-0/memory.limit_in_bytes") == str(96 << 20)
    assert read(cg / "pids/soda/web-0/pids.max") == "512"
    assert b.read_limits("web-0") == LIMITS


def test_uncapped_and_unlimited_pids(tmp_path):
    b = fake_backend(tmp_path / "cg")
    b.set_limits("web-0", Limits(1024, -1, 100_000, 64 << 20, 0, 0, 0))
    assert read(tmp_path / "cg/cpu/soda/web-0/cpu.cfs_quota_us") == "-1"
    assert read(tmp_path / "cg/pids/soda/web-0/pids.max") == "max"
    assert b.read_limits("web-0").pids_max == 0


def test_names_lists_vnodes_under_the_parent_only(tmp_path):
    b = fake_backend(tmp_path / "cg")
    b.create("web-0")
    b.create("db-1")
    os.makedirs(tmp_path / "cg/cpu/other/web-9")           # another parent
    os.makedirs(tmp_path / "cg/memory/soda/Not_A_Vnode")    # not a name we make
    os.makedirs(tmp_path / "cg/pids/soda/half-2")           # partly created counts
    assert b.names() == ["db-1", "half-2", "web-0"]
    assert fake_backend(tmp_path / "cg", parent="nothing-here").names() == []


def test_nested_parent(tmp_path):
    b = fake_backend(tmp_path / "cg", parent="soda.slice/guests")
    assert b.create("web-0")[0] == str(tmp_path / "cg/cpu/soda.slice/guests/web-0")
    assert b.names() == ["web-0"]


@pytest.mark.parametrize("parent", ["", "/soda", "../soda", "soda/../x", "soda//x", "soda/."])
def test_parent_cannot_escape(parent):
    with pytest.raises(errors.InvalidSpec):
        check_parent(parent)


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "UPPER", "-x", "x" * 64])
def test_bad_vnode_names_never_become_paths(tmp_path, name):
    b = fake_backend(tmp_path / "cg")
    with pytest.raises(errors.InvalidSpec):
        b.create(name)


def test_remove_is_idempotent(tmp_path):
    b = fake_backend(tmp_path / "cg")
    b.set_limits("web-0", LIMITS)
    assert b.remove("web-0") is True
    assert not b.exists("web-0")
    assert b.remove("web-0") is False


def test_remove_retries_while_busy(tmp_path):
    calls = []

    def busy_twice(path):
        calls.append(path)
        if len(calls) <= 2:
            raise OSError(16, "Device or resource busy")
        shutil.rmtree(path)

    b = CgroupV1(make_v1_tree(tmp_path / "cg"), "soda", rmdir=busy_twice, sleep=lambda s: None)
    b.create("web-0")
    assert b.remove("web-0")
    assert not b.exists("web-0")


def test_remove_gives_up_on_a_cgroup_that_stays_busy(tmp_path):
    def busy(path):
        raise OSError(16, "Device or resource busy")

    b = CgroupV1(make_v1_tree(tmp_path / "cg"), "soda", rmdir=busy, sleep=lambda s: None)
    b.create("web-0")
    with pytest.raises(errors.WrongState, match="cannot remove cgroup"):
        b.remove("web-0")


def test_pids_is_the_union_over_controllers(tmp_path):
    b = fake_backend(tmp_path / "cg")
    paths = b.create("web-0")
    for path, pids in zip(paths, ["10\n11\n", "11\n", "12\n", ""]):
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(pids)
    assert b.pids("web-0") == {10, 11, 12}
    assert b.pids("nobody") == set()


def write_proc(proc_root, pid, text):
    os.makedirs(proc_root / str(pid), exist_ok=True)
    (proc_root / str(pid) / "cgroup").write_text(text)


def test_contains_reads_proc_pid_cgroup(tmp_path):
    proc = tmp_path / "proc"
    b = fake_backend(tmp_path / "cg", proc_root=str(proc))
    write_proc(proc, 10, "12:pids:/soda/web-0\n5:cpu:/soda/web-0\n1:name=systemd:/\n")
    write_proc(proc, 11, "5:cpu,cpuacct:/soda/web-0/sub\n")
    write_proc(proc, 12, "5:cpu:/soda/web-00\n4:memory:/\n")
    write_proc(proc, 13, "0::/soda/web-0\n")                    # v2 line: not our hierarchy
    assert b.contains("web-0", 10)
    assert b.contains("web-0", 11)
    assert not b.contains("web-0", 12)
    assert not b.contains("web-0", 13)
    assert not b.contains("web-0", 99)                          # no such process


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "60"])
    yield p
    if p.poll() is None:
        p.kill()
    p.wait()


def test_kill_signals_a_member(tmp_path, sleeper):
    proc = tmp_path / "proc"
    b = fake_backend(tmp_path / "cg", proc_root=str(proc))
    write_proc(proc, sleeper.pid, "5:cpu:/soda/web-0\n")
    assert b.kill("web-0", sleeper.pid) is True
    assert sleeper.wait(timeout=5) == -signal.SIGKILL


def test_kill_spares_a_process_that_is_not_in_the_cgroup(tmp_path, sleeper):
    proc = tmp_path / "proc"
    b = fake_backend(tmp_path / "cg", proc_root=str(proc))
    write_proc(proc, sleeper.pid, "5:cpu:/elsewhere\n")
    assert b.kill("web-0", sleeper.pid) is False
    assert sleeper.poll() is None


def test_kill_of_a_gone_process_is_false(tmp_path):
    p = subprocess.Popen(["true"])
    p.wait()
    b = fake_backend(tmp_path / "cg", proc_root=str(tmp_path / "proc"))
    assert b.kill("web-0", p.pid) is False


def test_usage_reads_counters(tmp_path):
    b = fake_backend(tmp_path / "cg")
    b.set_limits("web-0", LIMITS)
    cg = tmp_path / "cg"
    (cg / "cpuacct/soda/web-0/cpuacct.usage").write_text("2500000000\n")
    (cg / "cpu/soda/web-0/cpu.stat").write_text("nr_periods 10\nnr_throttled 2\nthrottled_time 500000000\n")
    (cg / "memory/soda/web-0/memory.usage_in_bytes").write_text(f"{20 << 20}\n")
    (cg / "memory/soda/web-0/memory.max_usage_in_bytes").write_text(f"{30 << 20}\n")
    (cg / "memory/soda/web-0/memory.failcnt").write_text("3\n")
    (cg / "memory/soda/web-0/memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    (cg / "pids/soda/web-0/pids.current").write_text("6\n")
    u = b.usage("web-0")
    assert u.cpu_seconds == 2.5
    assert u.cpu_throttled_seconds == 0.5
    assert (u.memory_bytes, u.memory_peak_bytes, u.memory_limit_bytes) == (20 << 20, 30 << 20, 96 << 20)
    assert (u.memory_failcnt, u.oom_kills, u.pids) == (3, 1, 6)


def test_usage_of_unknown_vnode_is_not_found(tmp_path):
    with pytest.raises(errors.NotFound):
        fake_backend(tmp_path / "cg").usage("web-0")


def test_write_errors_are_typed(tmp_path):
    with pytest.raises(errors.NotFound, match="cannot write"):
        cgroups.write_file(str(tmp_path / "missing" / "cpu.shares"), 1)
    with pytest.raises(errors.SodaError, match="cannot write"):
        cgroups.write_file(str(tmp_path), 1)                   # a directory: EISDIR


@pytest.mark.parametrize("code, cls", [
    (2, errors.NotFound), (22, errors.InvalidSpec), (34, errors.InvalidSpec),
    (16, errors.WrongState), (13, errors.WrongState), (1, errors.WrongState),
    (12, errors.TemporaryError), (5, errors.SodaError),
])
def test_os_errors_map_by_errno(code, cls):
    exc = os_error(OSError(code, os.strerror(code)), "doing it")
    assert type(exc) is cls
    assert "doing it" in exc.message


def test_probe_finds_v1(tmp_path):
    assert probe(make_v1_tree(tmp_path / "cg")) == "v1"
    assert open_backend(str(tmp_path / "cg"), "soda").version == "v1"


def test_probe_sees_v2_and_opens_the_v2_backend(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert probe(str(tmp_path)) == "v2"
    backend = open_backend(str(tmp_path), "soda")
    assert isinstance(backend, CgroupV2) and backend.version == "v2"
    assert open_backend(str(tmp_path), "soda", cpuset="0").cpuset == "0"
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    with pytest.raises(errors.WrongState, match="no cpuset controller"):
        open_backend(str(tmp_path), "soda", cpuset="0")


def test_v2_cpuset_enables_the_controller_and_confines_each_guest(tmp_path):
    b = CgroupV2(make_v2_tree(tmp_path), "soda", rmdir=shutil.rmtree, sleep=lambda s: None, cpuset="0")
    (path,) = b.create("web-0")
    assert read(os.path.join(path, "cpuset.cpus")) == "0"
    for level in (tmp_path, tmp_path / "soda"):
        assert "cpuset" in read(level / "cgroup.subtree_control").replace("+", "").split()


# ---- cgroup v2 against a fake unified tree ------------------------------------------

def make_v2_tree(root):
    os.makedirs(root, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("\n")
    return str(root)


def v2_backend(root, parent="soda", base="", proc_root="/proc"):
    return CgroupV2(make_v2_tree(root), parent, proc_root=proc_root, base=base,
                    rmdir=shutil.rmtree, sleep=lambda s: None)


def test_v2_shares_map_to_weights_proportionally_and_back():
    assert cgroups.shares_to_weight(1024) == 100          # v1 default -> v2 default
    assert [cgroups.shares_to_weight(s) for s in (512, 2048, 256)] == [50, 200, 25]
    assert cgroups.shares_to_weight(2) == 1 and cgroups.shares_to_weight(10 ** 7) == 10_000
    assert all(cgroups.weight_to_shares(cgroups.shares_to_weight(s)) == s for s in (256, 512, 1024, 3072))


def test_v2_create_enables_controllers_down_to_the_parent(tmp_path):
    b = v2_backend(tmp_path / "cg", parent="soda/guests")
    assert b.create("web-0") == (str(tmp_path / "cg" / "soda" / "guests" / "web-0"),)
    for level in ("", "soda", "soda/guests"):
        assert read(tmp_path / "cg" / level / "cgroup.subtree_control").split() == ["+cpu", "+memory", "+pids"]
    assert not (tmp_path / "cg/soda/guests/web-0/cgroup.subtree_control").exists()
    # Already enabled (the kernel lists them without '+'): nothing is written.
    (tmp_path / "cg" / "soda" / "cgroup.subtree_control").write_text("cpu io memory pids\n")
    b.create("web-1")
    assert read(tmp_path / "cg" / "soda" / "cgroup.subtree_control") == "cpu io memory pids"


def test_v2_set_limits_writes_v2_files_and_reads_them_back(tmp_path):
    b = v2_backend(tmp_path / "cg")
    b.set_limits("web-0", LIMITS)
    d = tmp_path / "cg" / "soda" / "web-0"
    assert read(d / "cpu.weight") == "50"
    assert read(d / "cpu.max") == "50000 100000"
    assert read(d / "memory.max") == str(96 << 20)
    assert read(d / "pids.max") == "512"
    assert b.read_limits("web-0") == LIMITS
    uncapped = replace(LIMITS, cpu_quota_us=-1, cpu_shares=2048)
    b.set_limits("web-0", uncapped)
    assert read(d / "cpu.max") == "max 100000" and read(d / "cpu.weight") == "200"
    assert b.read_limits("web-0") == uncapped


def test_v2_usage_reads_cpu_stat_memory_events_and_peak(tmp_path):
    b = v2_backend(tmp_path / "cg")
    b.set_limits("web-0", LIMITS)
    d = tmp_path / "cg" / "soda" / "web-0"
    (d / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"
                                "nr_periods 10\nnr_throttled 3\nthrottled_usec 750000\n")
    (d / "memory.current").write_text(f"{20 << 20}\n")
    (d / "memory.peak").write_text(f"{30 << 20}\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 1\noom_group_kill 0\n")
    (d / "pids.current").write_text("6\n")
    u = b.usage("web-0")
    assert u == VnodeUsage(name="web-0", cpu_seconds=2.5, cpu_throttled_seconds=0.75,
                           memory_bytes=20 << 20, memory_peak_bytes=30 << 20,
                           memory_limit_bytes=96 << 20, memory_failcnt=4, oom_kills=1, pids=6)
    (d / "memory.peak").unlink()                          # before Linux 5.19
    assert b.usage("web-0").memory_peak_bytes == 20 << 20
    with pytest.raises(errors.NotFound):
        b.usage("web-9")


def test_v2_names_pids_contains_kill_and_remove(tmp_path):
    proc = tmp_path / "proc"
    b = v2_backend(tmp_path / "cg", proc_root=str(proc))
    b.create("web-0")
    b.create("web-1")
    os.makedirs(tmp_path / "cg" / "soda" / "not_a_vnode")
    assert b.names() == ["web-0", "web-1"]
    d = tmp_path / "cg" / "soda" / "web-0"
    (d / "cgroup.procs").write_text("11\n12\n")
    assert b.pids("web-0") == {11, 12} and b.pids("web-1") == set()
    for pid, path in ((11, "/soda/web-0"), (12, "/soda/web-00"), (13, "/soda/web-0/inner")):
        os.makedirs(proc / str(pid))
        (proc / str(pid) / "cgroup").write_text(f"0::{path}\n")
    assert b.contains("web-0", 11) and not b.contains("web-0", 12) and b.contains("web-0", 13)
    assert not b.contains("web-0", 99)
    assert b.kill_all("web-0") is False                    # no cgroup.kill: an old kernel
    (d / "cgroup.kill").write_text("0")
    assert b.kill_all("web-0") is True and read(d / "cgroup.kill") == "1"
    assert b.remove("web-0") is True and b.remove("web-0") is False
    assert b.names() == ["web-1"]


# ---- delegation under systemd ------------------------------------------------------

def write_proc_self(tmp_path, text):
    path = tmp_path / "self-cgroup"
    path.write_text(text)
    return str(path)


def test_delegated_base_v2_is_the_units_cgroup(tmp_path):
    path = write_proc_self(tmp_path, "0::/system.slice/soda-daemon.service\n")
    assert cgroups.delegated_base("v2", proc_self_cgroup=path) == "system.slice/soda-daemon.service"
    # After the Daemon moved itself into its leaf, the base is still the unit.
    moved = write_proc_self(tmp_path, "0::/system.slice/soda-daemon.service/daemon\n")
    assert cgroups.delegated_base("v2", proc_self_cgroup=moved) == "system.slice/soda-daemon.service"


def test_delegated_base_v1_needs_one_cgroup_for_every_controller(tmp_path):
    same = write_proc_self(tmp_path, "12:pids:/system.slice/soda-daemon.service\n"
                           "5:cpu,cpuacct:/system.slice/soda-daemon.service\n"
                           "4:memory:/system.slice/soda-daemon.service\n"
                           "3:cpuset:/\n1:name=systemd:/system.slice/soda-daemon.service\n"
                           "0::/system.slice/soda-daemon.service\n")
    assert cgroups.delegated_base("v1", proc_self_cgroup=same) == "system.slice/soda-daemon.service"
    split = write_proc_self(tmp_path, "5:cpu,cpuacct:/a.service\n4:memory:/b.service\n")
    with pytest.raises(errors.WrongState, match="different cgroups"):
        cgroups.delegated_base("v1", proc_self_cgroup=split)
    root = write_proc_self(tmp_path, "0::/\n")
    with pytest.raises(errors.WrongState, match="root cgroup"):
        cgroups.delegated_base("v2", proc_self_cgroup=root)


def test_open_backend_delegated_puts_the_parent_below_the_unit(tmp_path):
    root = make_v2_tree(tmp_path / "cg")
    me = write_proc_self(tmp_path, "0::/system.slice/soda-daemon.service\n")
    b = open_backend(root, "guests", version="v2", delegated=True, proc_self_cgroup=me)
    assert b.parent == "system.slice/soda-daemon.service/guests"
    assert b.paths("web-0") == (f"{root}/system.slice/soda-daemon.service/guests/web-0",)
    b.rmdir = shutil.rmtree
    b.create("web-0")
    # Controllers are enabled from the unit's cgroup down, never above it
    # (systemd owns those levels).
    assert read(tmp_path / "cg" / "cgroup.subtree_control") == ""
    assert not (tmp_path / "cg/system.slice/cgroup.subtree_control").exists()
    unit = tmp_path / "cg/system.slice/soda-daemon.service"
    assert read(unit / "cgroup.subtree_control").split() == ["+cpu", "+memory", "+pids"]
    assert b.evacuate(4242) == str(unit / "daemon") and read(unit / "daemon/cgroup.procs") == "4242"
    v1 = open_backend(make_v1_tree(tmp_path / "v1"), "guests", version="v1", delegated=True,
                      proc_self_cgroup=write_proc_self(tmp_path, "5:cpu,cpuacct:/soda.service\n"
                                                       "4:memory:/soda.service\n3:pids:/soda.service\n"))
    assert v1.paths("web-0")[0] == str(tmp_path / "v1" / "cpu" / "soda.service" / "guests" / "web-0")


def test_v1_cpuset_joins_the_cpuset_hierarchy_and_fills_each_level(tmp_path):
    root = make_v1_tree(tmp_path / "cg")
    os.makedirs(tmp_path / "cg" / "cpuset")
    (tmp_path / "cg" / "cpuset" / "cpuset.mems").write_text("0\n")
    b = CgroupV1(root, "soda/test", cpuset="0", rmdir=shutil.rmtree, sleep=lambda s: None)
    paths = b.create("web-0")
    assert paths[-1] == str(tmp_path / "cg" / "cpuset" / "soda" / "test" / "web-0")
    for level in ("soda", "soda/test", "soda/test/web-0"):
        assert read(tmp_path / "cg" / "cpuset" / level / "cpuset.cpus") == "0"
        assert read(tmp_path / "cg" / "cpuset" / level / "cpuset.mems") == "0"
    assert b.names() == ["web-0"]
    assert b.remove("web-0") and not b.exists("web-0")


def test_probe_says_what_is_missing(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("")       # cgroup2 without controllers
    os.makedirs(tmp_path / "cpu")
    (tmp_path / "cpu" / "cpu.shares").write_text("1024")
    with pytest.raises(errors.WrongState) as info:
        probe(str(tmp_path))
    assert "memory/memory.limit_in_bytes" in info.value.message
    assert "no controllers" in info.value.message


def test_v1_joins_the_freezer_where_it_is_mounted_and_freezes_through_freezer_state(tmp_path):
    root = make_v1_tree(tmp_path / "cg")
    (tmp_path / "cg" / "freezer").mkdir()
    (tmp_path / "cg" / "freezer" / "cgroup.procs").write_text("")
    b = open_backend(root, "soda", version="v1")
    b.rmdir, b.sleep = shutil.rmtree, (lambda s: None)
    assert b.can_freeze and b.create("web-0")[-1] == str(tmp_path / "cg/freezer/soda/web-0")
    state = tmp_path / "cg/freezer/soda/web-0/freezer.state"
    state.write_text("THAWED\n")
    assert not b.frozen("web-0")
    b.freeze("web-0", True)
    assert read(state) == "FROZEN" and b.frozen("web-0")
    b.freeze("web-0", False)
    assert read(state) == "THAWED" and not b.frozen("web-0")
    with pytest.raises(errors.NotFound, match="web-1"):
        b.freeze("web-1", True)


def test_v1_without_a_freezer_fences_as_before_and_refuses_to_freeze(tmp_path):
    b = open_backend(make_v1_tree(tmp_path / "cg"), "soda", version="v1")
    assert not b.can_freeze and len(b.create("web-0")) == 4
    assert not b.frozen("web-0")
    with pytest.raises(errors.WrongState, match="no freezer"):
        b.freeze("web-0", True)


def test_v2_freezes_through_cgroup_freeze_and_waits_for_the_kernel(tmp_path, monkeypatch):
    b = v2_backend(tmp_path / "cg")
    d = tmp_path / "cg" / "soda" / "web-0"
    b.create("web-0")
    (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    b.freeze("web-0", True)
    assert read(d / "cgroup.freeze") == "1" and b.frozen("web-0")
    b.freeze("web-0", False)
    assert read(d / "cgroup.freeze") == "0" and not b.frozen("web-0")
    # Some task is never held (the kernel keeps "frozen 0"): undone, and said.
    monkeypatch.setattr(cgroups, "FREEZE_TIMEOUT_SECONDS", 0.05)
    (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    with pytest.raises(errors.TemporaryError, match="did not hold every process of virtual node web-0"):
        b.freeze("web-0", True)
    assert read(d / "cgroup.freeze") == "0"
