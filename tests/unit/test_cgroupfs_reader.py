"""The system tests' cgroup reader (tests/system/cgroupfs.py) reads the same
meanings from a v1 and a v2 tree (laid out here as the kernel shows them)."""

import os

import pytest

from tests.system.cgroupfs import VnodeCgroups


def write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def v1(tmp_path):
    root = str(tmp_path)
    for c in ("cpu", "cpuacct", "memory", "pids"):
        write(root, f"{c}/soda-x/web-0/cgroup.procs", "11\n12\n" if c != "pids" else "11\n")
    write(root, "cpu/soda-x/web-0/cpu.shares", "512\n")
    write(root, "cpu/soda-x/web-0/cpu.cfs_quota_us", "25000\n")
    write(root, "cpu/soda-x/web-0/cpu.cfs_period_us", "100000\n")
    write(root, "cpuacct/soda-x/web-0/cpuacct.usage", "2500000000\n")
    write(root, "memory/soda-x/web-0/memory.limit_in_bytes", "100663296\n")
    write(root, "memory/soda-x/web-0/memory.usage_in_bytes", "4096\n")
    write(root, "memory/soda-x/web-0/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    write(root, "pids/soda-x/web-0/pids.max", "512\n")
    return VnodeCgroups("soda-x", root)


@pytest.fixture
def v2(tmp_path):
    root = str(tmp_path)
    write(root, "cgroup.controllers", "cpu io memory pids\n")
    write(root, "soda-x/web-0/cgroup.procs", "11\n12\n")
    write(root, "soda-x/web-0/cpu.weight", "50\n")
    write(root, "soda-x/web-0/cpu.max", "25000 100000\n")
    write(root, "soda-x/web-0/cpu.stat", "usage_usec 2500000\nuser_usec 2000000\n")
    write(root, "soda-x/web-0/memory.max", "100663296\n")
    write(root, "soda-x/web-0/memory.current", "4096\n")
    write(root, "soda-x/web-0/memory.events", "low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\n")
    write(root, "soda-x/web-0/pids.max", "512\n")
    return VnodeCgroups("soda-x", root)


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_same_meanings_from_either_layout(layout, request):
    cg = request.getfixturevalue(layout)
    assert cg.v2 == (layout == "v2")
    assert cg.names() == ["web-0"]
    assert cg.procs("web-0", "cpu") == {11, 12}
    assert cg.cpu_seconds("web-0") == 2.5
    assert cg.cpu_quota("web-0") == (25_000, 100_000)
    assert cg.memory_limit("web-0") == 96 << 20
    assert cg.memory_usage("web-0") == 4096
    assert cg.oom_kills("web-0") == 2
    assert cg.pids_max("web-0") == "512"
    assert cg.cpu_weight("web-0") == (50 if layout == "v2" else 512)
    assert len(cg.leftovers()) == (1 if layout == "v2" else 4)
    assert cg.dirs("web-1") == []


def test_no_cap_reads_minus_one(v2, tmp_path):
    write(str(tmp_path), "soda-x/web-0/cpu.max", "max 100000\n")
    assert v2.cpu_quota("web-0") == (-1, 100_000)
