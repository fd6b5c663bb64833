"""scripts/demo serves a sample service from two real guests through the
Switch, split 1:2 as their CPU (0.5 and 1.0), and stays up; `scripts/demo
down` leaves nothing behind but the logs."""

import collections
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import urllib.request
import uuid

import pytest

from tests.support import free_port, reachable_tmp_dir
from tests.system.cgroupfs import VnodeCgroups

pytestmark = [pytest.mark.cluster, pytest.mark.root, pytest.mark.guest]
TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if os.geteuid() != 0:
    pytest.skip("the demo boots real guests: it needs root", allow_module_level=True)


ANSWER = re.compile(r"SODA virtual node (\S+) of service web\b")


def who_answered(lines):
    """How many answers each virtual node gave."""
    return collections.Counter(m.group(1) for m in map(ANSWER.search, lines) if m)


def root_links():
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


# `up` may build the guest kernel first (minutes), then boots; pytest's
# default timeout would kill the test mid-build and leave the build orphaned.
@pytest.fixture
def demo_dir():
    """Where the demo keeps its state: guests' uids must reach it."""
    with reachable_tmp_dir("soda-test-demo-") as top:
        yield pathlib.Path(top) / "demo"


@pytest.mark.timeout(1500)
def test_demo_up_and_down(demo_dir):
    tag = uuid.uuid4().hex[:6]
    switch = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "SODA_DEMO_DIR": str(demo_dir), "SODA_DEMO_MASTER": f"127.0.0.1:{free_port()}",
           "SODA_DEMO_SWITCH": switch, "SODA_DEMO_NETNS": f"sodad-{tag}",
           "SODA_DEMO_CGROUP": f"soda-demo-{tag}"}
    demo = os.path.join(TOP, "scripts", "demo")
    links_before = root_links()
    guest_pids = []
    try:
        up = subprocess.run([demo], env=env, capture_output=True, text=True, timeout=900)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        answers = [line for line in up.stdout.splitlines() if "SODA virtual node" in line]
        assert len(answers) == 6, up.stdout[-3000:]
        # The README's promise: one answer from web-0 (cpu 0.5) for every two
        # from web-1 (cpu 1.0). Smooth weighted round robin makes it exact
        # over any multiple of three requests, whatever came before.
        assert who_answered(answers) == {"web-0": 2, "web-1": 4}, answers
        more = []
        for _ in range(30):
            with urllib.request.urlopen(f"http://{switch}/", timeout=10) as r:
                more.append(r.read().decode())
        assert who_answered(more) == {"web-0": 10, "web-1": 20}, more
        # ... and interleaved: every three in a row hold exactly one web-0.
        order = [ANSWER.search(a).group(1) for a in more]
        assert all(order[i:i + 3].count("web-0") == 1 for i in range(len(order) - 2)), order
        status = subprocess.run([demo, "status"], env=env, capture_output=True, text=True, timeout=60)
        assert status.stdout.count("running (pid") == 4, status.stdout
        # The Master takes mutual TLS only: sodactl with `scripts/demo env`'s
        # operator certificate gets through, without a certificate it does not.
        exports = subprocess.run([demo, "env"], env=env, capture_output=True, text=True, timeout=60)
        assert exports.returncode == 0, exports.stderr
        tls_env = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1)
                       for line in exports.stdout.splitlines())
        assert set(tls_env) == {"SODA_MASTER", "SODA_CA", "SODA_CERT", "SODA_KEY"}
        sodactl = [sys.executable, "-m", "soda.cli.sodactl", "service", "list"]
        listed = subprocess.run(sodactl, env={**env, **tls_env}, capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and "web" in listed.stdout, listed.stderr
        plain = {k: v for k, v in {**env, **tls_env}.items() if k not in ("SODA_CA", "SODA_CERT", "SODA_KEY")}
        refused = subprocess.run(sodactl, env=plain, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "serves TLS" in refused.stderr, refused.stderr
        uml_dir = demo_dir / "agent" / "uml"
        for record in uml_dir.glob("*/guest.json"):
            guest_pids.append(json.loads(record.read_text())["pid"])
        assert len(guest_pids) == 2
    finally:
        down = subprocess.run([demo, "down"], env=env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    # The demo keeps its logs until the next run, nothing else.
    assert not demo_dir.exists() or os.listdir(demo_dir) == ["logs"], os.listdir(demo_dir)
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"sodad-{tag}" not in netns
    assert root_links() - links_before == set()
    assert VnodeCgroups(f"soda-demo-{tag}").leftovers() == []
    for pid in guest_pids:
        assert not os.path.exists(f"/proc/{pid}")
