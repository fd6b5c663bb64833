"""soda.hypervisors.process on real child processes (no root): a process is
a guest's only while pid, start time and command line match its record; a
mismatch is never signalled; a dead child is reaped and its end named."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from soda.hypervisors import process

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def spawn(tmp_path):
    child = subprocess.Popen(SLEEPER, stdin=subprocess.DEVNULL)
    process.track(child)
    # During the exec the kernel shows an empty command line: wait it out.
    deadline = time.monotonic() + 5
    while process.proc_cmdline(child.pid) != SLEEPER:
        assert time.monotonic() < deadline, process.proc_cmdline(child.pid)
        time.sleep(0.005)
    record = {"pid": child.pid, "starttime": process.proc_starttime(child.pid),
              "argv": ["python", "-m", "launcher", "--", *SLEEPER], "vmm_argv": SLEEPER}
    return child, record


def test_identity_needs_pid_start_time_and_command_line(tmp_path):
    identity = process.Identity("vmm_argv")
    child, record = spawn(tmp_path)
    try:
        assert process.proc_cmdline(child.pid) == SLEEPER
        assert identity.is_ours(child.pid, record)
        assert process.key(record) == (child.pid, record["starttime"])
        assert not identity.is_ours(child.pid, {**record, "starttime": record["starttime"] - 1})
        other = {**record, "vmm_argv": ["qemu"], "argv": ["launcher"]}
        assert not identity.is_ours(child.pid, other)
        # Not its helper either: a helper is a child of the recorded VMM.
        assert not identity.is_ours(child.pid, {**record, "pid": 1}, helper=True)
        # A recycled-looking pid is left alone.
        assert not identity.signal_if_ours(child.pid, other, signal.SIGKILL)
        assert child.poll() is None
        assert identity.session_members(record) == []
        assert identity.signal_if_ours(child.pid, record, signal.SIGKILL)
        child.wait(timeout=5)
        assert not identity.is_ours(child.pid, record)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_dead_child_is_reaped_and_its_end_named(tmp_path):
    console = tmp_path / "console.log"
    console.write_text("booting\nKernel panic - not syncing: VFS\nrebooting\n")
    child, record = spawn(tmp_path)
    child.kill()
    deadline = time.monotonic() + 5
    while process.proc_stat(child.pid) and process.proc_stat(child.pid)[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.reap()
    assert process.exit_status(*process.key(record)) == -signal.SIGKILL
    reason = process.exit_reason(record, str(console), ("soda-launch:", "Kernel panic"))
    assert reason == "killed by signal 9: Kernel panic - not syncing: VFS"
    assert process.exit_status(999_999_999, 1) is None
    # A later process with the same pid but another start time is not that
    # child: its status is not reported for it (pids are reused).
    assert process.exit_status(child.pid, record["starttime"] + 1) is None
    later = {**record, "starttime": record["starttime"] + 1}
    assert process.exit_reason(later, str(console), ("x",)) == "the VMM process is gone"
    assert process.console_reason(str(tmp_path / "none.log"), ("x",)) == ""
