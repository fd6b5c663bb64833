"""Real User-Mode Linux guests end to end: Master, Daemon, Agent and Switch as
processes, one physical node whose guest network lives in a namespace this
test creates. Results are checked outside the code under test: HTTP answers
through the Switch, cgroup files, `tc -j`, /proc and `ip link`."""

import os
import signal

import pytest

from tests.support import free_port
from tests.system.cluster import wait_until
from tests.system.guests import require_guest_support
from tests.system.guests import alive, fetch, guest_records, htb_rates, ns_links

pytestmark = [pytest.mark.root, pytest.mark.guest]

require_guest_support()


def test_two_guests_serve_1_to_2_fenced_and_leave_nothing(uml_node):
    c = uml_node
    port = free_port()
    c.ctl("service", "create", "web", "--image", "busybox-httpd", "--hypervisor", "uml", "--nodes", "2",
          "--cpu", "0.5,1.0", "--memory", "64", "--bandwidth", "10", "--switch", f"127.0.0.1:{port}",
          "--wait", "--timeout", "120", timeout=180)
    svc = c.json("service", "get", "web")
    assert [v["phase"] for v in svc["vnodes"]] == ["RUNNING", "RUNNING"]
    records = guest_records(c, "node-a")
    assert set(records) == {"web-0", "web-1"}
    c.guest_pids.update(r["pid"] for r in records.values())

    # 60 requests through the Switch split about 1:2 by CPU share.
    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: _answers(url), 30, what="the Switch to serve web")
    # A guest reports READY as its init starts httpd: with a fast kernel the
    # Switch can reach it a moment before httpd listens, and sends that
    # request elsewhere. Count only once both have answered.
    seen = set()
    wait_until(lambda: seen.update({"web-0" if "web-0" in fetch(url) else "web-1"}) or len(seen) == 2,
               30, what="both guests to answer through the Switch")
    counts = {"web-0": 0, "web-1": 0}
    for _ in range(60):
        page = fetch(url)
        counts["web-0" if "web-0" in page else "web-1"] += 1
    assert 15 <= counts["web-0"] <= 25 and 35 <= counts["web-1"] <= 45, counts

    # The fence, read from the kernel.
    assert c.cgroups.cpu_weight("web-1") == 2 * c.cgroups.cpu_weight("web-0")     # shares 0.5 : 1.0
    for vnode in ("web-0", "web-1"):
        assert c.cgroups.cpu_quota(vnode)[0] == -1                            # no hard cap asked
        limit = c.cgroups.memory_limit(vnode)
        assert 64 << 20 < limit <= (64 + 64) << 20
        pid = records[vnode]["pid"]
        assert pid in c.cgroups.procs(vnode, "cpu") and pid in c.cgroups.procs(vnode, "memory")
    taps = {link for link in ns_links(c.netns) if link.startswith("st")}
    ifbs = {link for link in ns_links(c.netns) if link.startswith("ifb-")}
    assert len(taps) == 2 and len(ifbs) == 2
    for dev in taps | ifbs:              # to the guest on the TAP, from it on the IFB
        assert htb_rates(c.netns, dev) == ["10Mbit"], (dev, htb_rates(c.netns, dev))

    c.ctl("service", "delete", "web", "--wait", "--timeout", "60", timeout=90)
    assert c.json("service", "list") == []
    for record in records.values():
        assert not alive(record["pid"])
    assert guest_records(c, "node-a") == {}
    leftovers = [n for n in ns_links(c.netns) if n.startswith(("st", "ifb", "sf"))]
    assert leftovers == []
    for controller in ("cpu", "cpuacct", "memory", "pids"):
        assert c.cgroups.names(controller) == [], controller
    cow = [f for f in _files(c.agent_dir("node-a")) if f.endswith(".cow")]
    assert cow == []


def test_agent_kill_9_adopts_running_guests(uml_node):
    c = uml_node
    port = free_port()
    c.ctl("service", "create", "web", "--image", "busybox-httpd", "--hypervisor", "uml", "--nodes", "2",
          "--cpu", "0.5", "--memory", "64", "--switch", f"127.0.0.1:{port}", "--wait", "--timeout", "120",
          timeout=180)
    before = {name: r["pid"] for name, r in guest_records(c, "node-a").items()}
    c.guest_pids.update(before.values())
    c.kill("node-a", signal.SIGKILL)
    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: _answers(url), 30, what="the guests to serve without their Agent")
    c.start_real_agent("node-a", c.netns, os.path.join(c.root, "node-a-daemon.sock"))
    wait_until(lambda: "node-a" in c.log("node-a") and _phases(c) == ["RUNNING", "RUNNING"], 30,
               what="the restarted Agent to report its guests")
    after = {name: r["pid"] for name, r in guest_records(c, "node-a").items()}
    assert after == before and all(alive(p) for p in after.values())
    assert "SODA virtual node" in fetch(url)

    # CPU and bandwidth change live: new cgroup values and HTB rates, same guests.
    c.ctl("service", "resize", "web", "--cpu", "0.25,1.0", "--bandwidth", "20", "--wait", timeout=60)

    def applied():
        weights = [c.cgroups.cpu_weight(v) for v in ("web-0", "web-1")]
        rates = {tuple(htb_rates(c.netns, dev)) for dev in ns_links(c.netns) if dev.startswith(("st", "ifb-"))}
        return weights[1] == 4 * weights[0] and rates == {("20Mbit",)}        # 0.25 : 1.0
    wait_until(applied, 20, what="the new limits in the kernel")
    assert {name: r["pid"] for name, r in guest_records(c, "node-a").items()} == before
    assert "SODA virtual node" in fetch(url)


def _phases(c):
    return [v["phase"] for v in c.json("service", "get", "web")["vnodes"]]


def _answers(url):
    try:
        return "SODA virtual node" in fetch(url, timeout=2)
    except OSError:
        return False


def _files(root):
    for dirpath, _, names in os.walk(root):
        for name in names:
            yield os.path.join(dirpath, name)



def test_cpu_cap_sets_a_cfs_quota(uml_node):
    c = uml_node
    c.ctl("service", "create", "capped", "--image", "busybox-httpd", "--hypervisor", "uml", "--nodes", "1",
          "--cpu", "0.25", "--cpu-cap", "--wait", "--timeout", "120", timeout=180)
    c.guest_pids.update(r["pid"] for r in guest_records(c, "node-a").values())
    assert c.cgroups.cpu_quota("capped-0") == (25_000, 100_000)
    assert c.json("service", "get", "capped")["cpu_cap"] is True
