"""Releasing a virtual node on cgroup v2: one write to cgroup.kill kills
every process (no per-pid signals); the old per-pid way stays for kernels
without it. A fake unified tree whose cgroup.kill acts like the kernel's."""

import os
import shutil

from soda.daemon.cgroups import CgroupV2
from soda.daemon.config import DaemonConfig
from soda.daemon.limits import LimitManager
from soda.model.spec import Resources

from tests.unit.test_daemon_cgroups import make_v2_tree
from tests.fakes import FakeClock
from tests.unit.test_daemon_limits import FakeShaper

WEB = Resources(cpu=0.5, memory=64, bandwidth=10, disk=256)


class FakeKernelV2(CgroupV2):
    """cgroup.kill empties cgroup.procs, as the kernel's SIGKILL does; a
    per-pid kill() is recorded (and works too)."""

    def __init__(self, root, has_kill=True):
        super().__init__(make_v2_tree(root), "soda", rmdir=shutil.rmtree, sleep=lambda s: None)
        self.has_kill = has_kill
        self.per_pid: list[int] = []
        self.kill_writes = 0

    def create(self, name):
        paths = super().create(name)
        if self.has_kill:
            with open(os.path.join(paths[0], "cgroup.kill"), "w") as f:
                f.write("0")
        return paths

    def kill_all(self, name):
        done = super().kill_all(name)
        if done:
            self.kill_writes += 1
            self._set_procs(name, [])
        return done

    def kill(self, name, pid, sig=9):
        self.per_pid.append(pid)
        self._set_procs(name, [p for p in self.pids(name) if p != pid])
        return True

    def _set_procs(self, name, pids):
        with open(os.path.join(self.paths(name)[0], "cgroup.procs"), "w") as f:
            f.write("".join(f"{p}\n" for p in pids))


def manager(backend):
    clock = FakeClock(0.0)
    return LimitManager(backend, FakeShaper(), DaemonConfig(), clock=clock, sleep=clock.sleep)


def test_release_on_v2_writes_cgroup_kill_once_and_signals_no_pid(tmp_path):
    cg = FakeKernelV2(tmp_path / "cg")
    m = manager(cg)
    m.apply("web-0", WEB, "uml", 32, "tap-web0")
    cg._set_procs("web-0", [101, 102, 103])
    done = m.release("web-0")
    assert (done.existed, done.killed) == (True, 3)
    assert cg.kill_writes == 1 and cg.per_pid == []
    assert not os.path.exists(cg.paths("web-0")[0])


def test_release_on_a_v2_kernel_without_cgroup_kill_signals_each_pid(tmp_path):
    cg = FakeKernelV2(tmp_path / "cg", has_kill=False)
    m = manager(cg)
    m.apply("web-0", WEB, "uml", 32, "tap-web0")
    cg._set_procs("web-0", [101, 102])
    done = m.release("web-0")
    assert done.killed == 2 and sorted(cg.per_pid) == [101, 102] and cg.kill_writes == 0


def test_release_of_an_empty_cgroup_writes_nothing(tmp_path):
    cg = FakeKernelV2(tmp_path / "cg")
    m = manager(cg)
    m.apply("web-0", WEB, "uml", 32, "")
    done = m.release("web-0")
    assert (done.existed, done.killed) == (True, 0) and cg.kill_writes == 0


def test_v2_refuses_to_lower_memory_under_the_working_set_instead_of_oom_killing(tmp_path):
    from dataclasses import replace

    import pytest

    from soda import errors
    from soda.daemon.plan import MIB
    cg = FakeKernelV2(tmp_path / "cg")
    m = manager(cg)
    fence = m.apply("web-0", WEB, "uml", 32, "")                  # 64 + 32 MiB headroom
    d = cg.paths("web-0")[0]
    with open(os.path.join(d, "memory.current"), "w") as f:
        f.write(f"{90 * MIB}\n")
    with open(os.path.join(d, "memory.stat"), "w") as f:
        f.write(f"anon {60 * MIB}\ninactive_file {20 * MIB}\n")
    with pytest.raises(errors.WrongState, match="cannot lower the memory limit of web-0 to 64 MiB"):
        m.apply("web-0", replace(WEB, memory=32), "uml", 32, "")    # 64 MiB < 70 MiB working set
    assert cg.read_limits("web-0").memory_bytes == fence.limits.memory_bytes
    m.apply("web-0", replace(WEB, memory=40), "uml", 32, "")        # 72 MiB >= 70 MiB: fine
    assert cg.read_limits("web-0").memory_bytes == 72 * MIB
