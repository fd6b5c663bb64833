"""Moving a virtual node between physical nodes (network namespaces on a
fabric) with real UML guests: `sodactl service move` carries the guest's
disk, what the guest wrote before the move (and never synced) is there
after it, and a client loop of idempotent requests through the Switch sees
no failure, only a delay; the guest booted anew (its boot id changed).
Faults: the target lost mid-move gives the move up and the guest serves on
where it was; the source lost mid-move leaves the replacement on the
target; either way one guest runs, and a node that comes back stops what
it no longer owns. What is checked is read from the guests themselves
(HTTP through the Switch), sodactl and the Agents' guest records."""

import time
import urllib.parse
import uuid

import http.client
import pytest

from tests.support import reachable_tmp_dir
from tests.system.cluster import wait_until
from tests.system.guests import require_guest_support
from tests.system.multinode import ClientLoop, MultiNode, fabric_config, wait_healthy

pytestmark = [pytest.mark.cluster, pytest.mark.root, pytest.mark.guest]

require_guest_support()

NODE_LOST_SECONDS = 4.0


@pytest.fixture(scope="module")
def mn(hostile_rootfs):
    with reachable_tmp_dir("soda-test-move-") as state_dir:
        config = fabric_config(state_dir, nodes=3, node_lost_seconds=NODE_LOST_SECONDS)
        with MultiNode(config) as cluster:
            cluster.push(hostile_rootfs)
            yield cluster


def run(port: int, command: str, timeout: float = 30) -> str:
    """`command` as root in the guest that answers through the Switch (the
    image's /cgi-bin/run)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/cgi-bin/run?" + urllib.parse.quote(command, safe=""))
        response = conn.getresponse()
        body = response.read().decode()
    finally:
        conn.close()
    assert response.status == 200 and response.getheader("X-Exit-Status") == "0", (command, body)
    return body.strip()


def host_index(mn, node: str) -> int:
    """The fabric index (from 1) of physical node `node`."""
    return next(i for i, h in enumerate(mn.layout.hosts, 1) if h.name == node)


def live(mn, service):
    return [v for v in mn.vnodes(service) if not v.get("deleting")]


def test_a_uml_guest_moves_with_what_it_wrote_and_no_failed_request(mn):
    port = mn.create("mv", [0.25])
    try:
        [old] = live(mn, "mv")
        target = next(h.name for h in mn.layout.hosts if h.name != old["node"])
        token = uuid.uuid4().hex
        # Written, never synced: only the move's sync brings it to the disk.
        run(port, f"echo {token} > /root/note")
        boot_before = run(port, "cat /proc/sys/kernel/random/boot_id")
        with ClientLoop(port, interval=0.02) as loop:
            time.sleep(0.5)
            began = time.monotonic()
            result = mn.ctl("service", "move", "mv", old["name"], "--to", target, "--wait", "--timeout", "120")
            took = time.monotonic() - began
            time.sleep(0.5)
        assert loop.failures == [], loop.failures
        assert loop.sent > 20
        assert "carrying its disk" in result.stderr, result.stderr
        [new] = live(mn, "mv")
        assert new["node"] == target and new["phase"] == "RUNNING" and new["name"] != old["name"]
        assert new["last_move"]["from_node"] == old["node"]
        assert run(port, "cat /root/note") == token
        assert run(port, "cat /proc/sys/kernel/random/boot_id") != boot_before    # booted anew from it
        # The old guest is gone from its node; the disk's image is the new one's.
        index = host_index(mn, old["node"])
        assert new["name"] in mn.guest_processes(host_index(mn, target))
        wait_until(lambda: old["name"] not in mn.guest_processes(index), 30, what="the old guest stopped")
        assert any(f"disk.{new['name']}" in i["names"] for i in mn.json("image", "list"))
        print(f"move took {took:.2f} s; {loop.sent} requests, none failed")
    finally:
        mn.delete("mv")
    # Deleted with the virtual node that booted it.
    assert not any(n.startswith("disk.mv-") for i in mn.json("image", "list") for n in i["names"])


def test_moves_that_cannot_be_done_are_refused_with_the_reason(mn):
    port = mn.create("mvx", [0.25])
    try:
        [v] = live(mn, "mvx")
        same = mn.ctl("service", "move", "mvx", v["name"], "--to", v["node"], check=False)
        assert same.returncode != 0 and f"runs on node {v['node']} already" in same.stderr
        nowhere = mn.ctl("service", "move", "mvx", v["name"], "--to", "no-such-node", check=False)
        assert nowhere.returncode != 0 and "no physical node named 'no-such-node'" in nowhere.stderr
        unknown = mn.ctl("service", "move", "mvx", "7", check=False)
        assert unknown.returncode != 0 and "has no virtual node '7'" in unknown.stderr
        assert "Traceback" not in same.stderr + nowhere.stderr + unknown.stderr
        # Cold: booted afresh from the image, what it wrote is not carried.
        run(port, "echo here > /root/note && sync")
        mn.ctl("service", "move", "mvx", v["name"], "--cold", "--wait", "--timeout", "120")
        wait_healthy(mn, "mvx")
        [moved] = live(mn, "mvx")
        assert moved["node"] != v["node"]
        out = run(port, "cat /root/note 2>/dev/null || echo absent")
        assert out == "here"        # --cold on a driver that can carry it still carries it
    finally:
        mn.delete("mvx")


def test_a_target_lost_mid_move_gives_the_move_up_and_the_guest_serves_on(mn):
    port = mn.create("mvt", [0.25])
    try:
        [old] = live(mn, "mvt")
        target = next(h.name for h in mn.layout.hosts if h.name != old["node"])
        index = host_index(mn, target)
        run(port, "echo kept > /root/note")
        try:
            with ClientLoop(port, interval=0.05, timeout=40) as loop:
                mn.cluster.lose_host(index)
                mn.ctl("service", "move", "mvt", old["name"], "--to", target)
                wait_until(lambda: [v["name"] for v in live(mn, "mvt")] == [old["name"]],
                           NODE_LOST_SECONDS + 20, 0.2, what="the move given up")
                wait_healthy(mn, "mvt", 60)
                time.sleep(0.5)
        finally:
            mn.cluster.restore_host(index)
        assert loop.failures == [], loop.failures
        [v] = live(mn, "mvt")
        assert (v["node"], v["phase"], v["frozen"], v["moving_to"]) == (old["node"], "RUNNING", False, "")
        assert run(port, "cat /root/note") == "kept"
        assert not any(name.startswith("mvt-") for name in mn.guest_processes(index))
    finally:
        mn.delete("mvt")


def test_a_source_lost_mid_move_leaves_one_guest_on_the_target(mn):
    mn.create("mvs", [0.25])
    try:
        [old] = live(mn, "mvs")
        source = host_index(mn, old["node"])
        target = next(h.name for h in mn.layout.hosts if h.name != old["node"])
        old_guests = mn.guest_processes(source)
        mn.ctl("service", "move", "mvs", old["name"], "--to", target)
        try:
            mn.cluster.lose_host(source)
            wait_until(lambda: [(v["node"], v["phase"]) for v in live(mn, "mvs")] == [(target, "RUNNING")],
                       NODE_LOST_SECONDS + 60, 0.2, what="the replacement running on the target")
            wait_healthy(mn, "mvs", 60)
        finally:
            mn.cluster.restore_host(source)
        assert not any(pid.matches() for name, pid in old_guests.items() if name.startswith("mvs-"))
        assert len(live(mn, "mvs")) == 1
    finally:
        mn.delete("mvs")
