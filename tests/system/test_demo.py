"""scripts/demo brings a cluster up, leaves it running, and `down` removes it."""

import os
import subprocess

import pytest

from tests.support import free_port

pytestmark = pytest.mark.cluster
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_up_and_down(tmp_path):
    demo_dir = tmp_path / "demo"
    env = {**os.environ, "SODA_DEMO_DIR": str(demo_dir), "SODA_DEMO_MASTER": f"127.0.0.1:{free_port()}"}
    demo = os.path.join(TOP, "scripts", "demo")
    pids = []
    try:
        up = subprocess.run([demo], env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        pids = [int((demo_dir / f).read_text()) for f in os.listdir(demo_dir) if f.endswith(".pid")]
        assert len(pids) == 3
        assert "web-0" in up.stdout and "web-1" in up.stdout
        assert up.stdout.count("RUNNING") >= 2
        assert "fake hypervisor driver" in up.stdout
        status = subprocess.run([demo, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.stdout.count("running (pid") == 3
    finally:
        down = subprocess.run([demo, "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not demo_dir.exists()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
