"""The cgroup v1 backend against a fake directory tree (same file names), no root."""

import os
import shutil
import signal
import subprocess

import pytest

from soda import errors
from soda.daemon import cgroups
from soda.daemon.cgroups import CgroupV1, check_parent, open_backend, os_error, probe
from soda.model import Limits

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


def test_probe_sees_v2_but_there_is_no_v2_backend_yet(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert probe(str(tmp_path)) == "v2"
    with pytest.raises(errors.WrongState, match="only the cgroup v1 backend"):
        open_backend(str(tmp_path), "soda")


def test_probe_says_what_is_missing(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("")       # cgroup2 without controllers
    os.makedirs(tmp_path / "cpu")
    (tmp_path / "cpu" / "cpu.shares").write_text("1024")
    with pytest.raises(errors.WrongState) as info:
        probe(str(tmp_path))
    assert "memory/memory.limit_in_bytes" in info.value.message
    assert "no controllers" in info.value.message
