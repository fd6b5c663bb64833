"""A guest's VMM runs only once its record is written.

The driver spawns the launcher, reads its start time and writes the guest's
record; an Agent killed in between must not leave a VMM that no record
names (nothing could find or stop it, and the restarted Agent would boot a
second one). The launcher holds until the driver says go on its stdin; a
driver that dies closes that pipe, and the launcher exits instead.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

from soda.hypervisors.launch import GO

LAUNCH = [sys.executable, "-m", "soda.hypervisors.launch"]


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_held_launcher_runs_its_command_only_after_the_go(tmp_path):
    marker = tmp_path / "ran"
    child = subprocess.Popen([*LAUNCH, "--hold", "--", "/usr/bin/touch", str(marker)],
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.3)                      # long enough for the launcher to reach its hold
    assert child.poll() is None and not marker.exists()
    child.stdin.write(GO)
    child.stdin.close()
    assert child.wait(timeout=10) == 0 and marker.exists()


def test_a_held_launcher_whose_driver_went_away_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    child = subprocess.Popen([*LAUNCH, "--hold", "--", "/usr/bin/touch", str(marker)],
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdin.close()                  # what the driver's death does to the pipe
    assert child.wait(timeout=10) == 1
    assert b"went away before it recorded this guest" in child.stderr.read()
    assert not marker.exists()


def test_an_agent_killed_between_launch_and_record_leaves_no_guest(tmp_path):
    # The "kernel" leaves a marker when it runs and then stays up, as a VMM would.
    marker = tmp_path / "vmm-ran"
    kernel = tmp_path / "linux"
    kernel.write_text(f"#!/bin/sh\ntouch {marker}\nexec sleep 30\n")
    kernel.chmod(0o755)
    image = tmp_path / "rootfs.img"
    image.write_bytes(b"\0" * 4096)
    agent = textwrap.dedent(f"""
        import os, signal
        from soda.hypervisors import recorded
        from soda.hypervisors.base import GuestSpec
        from soda.hypervisors.uml import UmlDriver
        from soda.model.spec import Resources
        # Die exactly where a kill -9 of the Agent hurts: launched, not recorded.
        recorded.write_json_atomic = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        d = UmlDriver({str(tmp_path / 'state')!r}, kernel={str(kernel)!r}, min_memory=16,
                      short_dir={str(tmp_path / 'run')!r}, shm_dir={str(tmp_path / 'shm')!r})
        d.start(GuestSpec(name="web-0", service="web", image_path={str(image)!r},
                          image_digest="sha256:" + "ab" * 32,
                          resources=Resources(cpu=0.5, memory=32, bandwidth=0, disk=64),
                          address="10.233.1.2", prefix_length=24, gateway="10.233.1.1",
                          port=80, hypervisor="uml", generation=1))
    """)
    try:
        died = subprocess.run([sys.executable, "-c", agent], capture_output=True, timeout=30)
        assert died.returncode == -signal.SIGKILL, died.stderr.decode()
        # Had the launcher gone on, the "kernel" would have run by now.
        assert not wait_for(marker.exists, timeout=2.0)
        console = tmp_path / "state" / "uml" / "web-0" / "console.log"
        assert wait_for(lambda: b"went away before it recorded" in console.read_bytes())
    finally:
        # Only if it failed: the VMM this test's "kernel" became (its path is ours alone).
        for pid in _running(str(kernel)):
            os.kill(pid, signal.SIGKILL)


def _running(path: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if path.encode() in f.read().split(b"\0"):
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found
