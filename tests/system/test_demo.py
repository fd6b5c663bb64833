"""scripts/demo serves a sample service from two real guests through the
Switch and stays up; `scripts/demo down` leaves nothing behind."""

import json
import os
import subprocess
import uuid

import pytest

from tests.support import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.root, pytest.mark.guest]
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if os.geteuid() != 0:
    pytest.skip("the demo boots real guests: it needs root", allow_module_level=True)


def root_links():
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


def test_demo_up_and_down(tmp_path):
    tag = uuid.uuid4().hex[:6]
    demo_dir = tmp_path / "demo"
    env = {**os.environ, "SODA_DEMO_DIR": str(demo_dir), "SODA_DEMO_MASTER": f"127.0.0.1:{free_port()}",
           "SODA_DEMO_SWITCH": f"127.0.0.1:{free_port()}", "SODA_DEMO_NETNS": f"sodad-{tag}",
           "SODA_DEMO_CGROUP": f"soda-demo-{tag}"}
    demo = os.path.join(TOP, "scripts", "demo")
    links_before = root_links()
    guest_pids = []
    try:
        up = subprocess.run([demo], env=env, capture_output=True, text=True, timeout=900)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        answers = [line for line in up.stdout.splitlines() if "SODA virtual node" in line]
        assert len(answers) == 6
        assert any("web-0" in a for a in answers) and any("web-1" in a for a in answers)
        status = subprocess.run([demo, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.stdout.count("running (pid") == 4, status.stdout
        uml_dir = demo_dir / "agent" / "uml"
        for record in uml_dir.glob("*/guest.json"):
            guest_pids.append(json.loads(record.read_text())["pid"])
        assert len(guest_pids) == 2
    finally:
        down = subprocess.run([demo, "down"], env=env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not demo_dir.exists()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"sodad-{tag}" not in netns
    assert root_links() - links_before == set()
    for controller in os.listdir("/sys/fs/cgroup"):
        assert not os.path.exists(os.path.join("/sys/fs/cgroup", controller, f"soda-demo-{tag}"))
    for pid in guest_pids:
        assert not os.path.exists(f"/proc/{pid}")
