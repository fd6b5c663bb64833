"""Master + 3 Agents (fake driver) as real processes, driven by sodactl.

Results are read independently of the Master where possible: each Agent's
fake driver records on disk which guests it runs and how often each was
started."""

import json
import os
import signal

import pytest

from tests.support import make_ext4_image
from tests.system.cluster import wait_until

pytestmark = pytest.mark.cluster
NODES = ("node-a", "node-b", "node-c")


def running_guests(cluster, agent):
    """What the Agent's driver really runs: its on-disk guest records."""
    d = os.path.join(cluster.agent_dir(agent), "fake")
    if not os.path.isdir(d):
        return set()
    return {n[:-5] for n in os.listdir(d) if n.endswith(".json") and not n.startswith("_")}


def start_counts(cluster):
    counts = {}
    for agent in NODES:
        path = os.path.join(cluster.agent_dir(agent), "fake", "_starts.json")
        if os.path.exists(path):
            with open(path) as f:
                for name, n in json.load(f)["starts"].items():
                    counts[name] = counts.get(name, 0) + n
    return counts


@pytest.fixture
def three_nodes(cluster, tmp_path):
    cluster.start_master()
    for name in NODES:
        cluster.start_agent(name)
    wait_until(lambda: len(cluster.ready_nodes()) == 3, 30, what="3 Agents to register")
    image = make_ext4_image(str(tmp_path / "img"))
    out = cluster.ctl("image", "push", image, "--name", "img").stdout
    assert "sha256:" in out and "img" in out
    return cluster


def test_create_spreads_runs_and_delete_removes_everything(three_nodes):
    c = three_nodes
    c.ctl("service", "create", "web", "--image", "img", "--nodes", "4", "--cpu", "0.5", "--memory", "64",
          "--wait", timeout=60)
    svc = c.json("service", "get", "web")
    vnodes = svc["vnodes"]
    assert len(vnodes) == 4
    assert all(v["phase"] == "RUNNING" for v in vnodes)
    assert all(v["address"] and v["resources"]["cpu"] == 0.5 and v["resources"]["memory"] == 64 for v in vnodes)
    placed = {}
    for v in vnodes:
        placed.setdefault(v["node"], set()).add(v["name"])
    assert set(placed) == set(NODES), "4 virtual nodes must cover all 3 physical nodes"
    # Each Agent's driver runs exactly what the Master says it placed there.
    for agent in NODES:
        assert running_guests(c, agent) == placed[agent]

    c.ctl("service", "delete", "web", "--wait", timeout=60)
    assert c.json("service", "list") == []
    assert c.ctl("service", "get", "web", check=False).returncode == 1
    for agent in NODES:
        assert running_guests(c, agent) == set()
    assert all(n["vnodes"] == 0 for n in c.json("node", "list"))


def test_oversized_request_exits_3_and_changes_nothing(three_nodes):
    c = three_nodes
    c.ctl("service", "create", "small", "--image", "img", "--nodes", "1", "--cpu", "0.5", "--wait", timeout=60)
    before_nodes = c.json("node", "list")
    result = c.ctl("service", "create", "huge", "--image", "img", "--nodes", "2", "--cpu", "64", check=False)
    assert result.returncode == 3, result.stderr
    assert "cpu" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert [s["name"] for s in c.json("service", "list")] == ["small"]
    assert c.json("node", "list") == before_nodes


def test_master_kill_9_and_restart_loses_nothing_and_starts_nothing_twice(three_nodes):
    c = three_nodes
    c.ctl("service", "create", "web", "--image", "img", "--nodes", "4", "--cpu", "0.5", "--wait", timeout=60)
    c.ctl("service", "create", "api", "--image", "img", "--nodes", "2", "--cpu", "0.25,0.5", "--wait", timeout=60)
    services_before = {s["name"]: s for s in c.json("service", "list")}
    nodes_before = {n["name"]: (n["subnet"], n["address"]) for n in c.json("node", "list")}
    images_before = c.json("image", "list")
    assert set(start_counts(c).values()) == {1}

    c.kill("master", signal.SIGKILL)
    c.start_master()
    # Agents reconnect by themselves: they heartbeat again and the nodes stay READY.
    wait_until(lambda: len(c.ready_nodes()) == 3, 30, what="Agents to reconnect")
    assert {n["name"]: (n["subnet"], n["address"]) for n in c.json("node", "list")} == nodes_before
    assert c.json("image", "list") == images_before
    services_after = {s["name"]: s for s in c.json("service", "list")}
    assert services_after.keys() == services_before.keys()
    for name, before in services_before.items():
        after = services_after[name]
        assert [(v["name"], v["node"], v["address"], v["phase"]) for v in after["vnodes"]] == \
            [(v["name"], v["node"], v["address"], v["phase"]) for v in before["vnodes"]]
    # The Agents are really connected again: new work reaches them.
    c.ctl("service", "create", "after", "--image", "img", "--nodes", "3", "--cpu", "0.1", "--wait", timeout=60)
    counts = start_counts(c)
    assert len(counts) == 9 and set(counts.values()) == {1}, f"a virtual node was started twice: {counts}"


def test_agent_kill_9_and_restart_adopts_its_guests(three_nodes):
    c = three_nodes
    c.ctl("service", "create", "web", "--image", "img", "--nodes", "3", "--cpu", "0.5", "--wait", timeout=60)
    before = running_guests(c, "node-a")
    assert before
    c.kill("node-a", signal.SIGKILL)
    c.start_agent("node-a")
    # The restarted Agent reports its guests RUNNING again without starting them.
    wait_until(lambda: all(v["phase"] == "RUNNING" for v in c.json("service", "get", "web")["vnodes"]), 30,
               what="phases after the Agent restart")
    assert running_guests(c, "node-a") == before
    assert set(start_counts(c).values()) == {1}


def test_lost_node_virtual_nodes_move(cluster, tmp_path):
    cluster.start_master("--node-lost-seconds", "2")
    for name in NODES:
        cluster.start_agent(name)
    wait_until(lambda: len(cluster.ready_nodes()) == 3, 30, what="3 Agents to register")
    cluster.ctl("image", "push", make_ext4_image(str(tmp_path / "img")), "--name", "img")
    cluster.ctl("service", "create", "web", "--image", "img", "--nodes", "3", "--cpu", "0.5", "--wait", timeout=60)
    cluster.kill("node-c", signal.SIGKILL)
    wait_until(lambda: "node-c" not in cluster.ready_nodes(), 30, what="node-c to be marked LOST")

    def moved_and_running():
        vnodes = cluster.json("service", "get", "web")["vnodes"]
        return all(v["node"] in ("node-a", "node-b") and v["phase"] == "RUNNING" for v in vnodes)
    wait_until(moved_and_running, 30, what="virtual nodes of node-c to run elsewhere")
    assert {n["name"]: n["state"] for n in cluster.json("node", "list")}["node-c"] == "LOST"
    placed = running_guests(cluster, "node-a") | running_guests(cluster, "node-b")
    assert placed == {"web-0", "web-1", "web-2"}


def test_labels_are_listed_a_service_spreads_over_zones_and_a_taken_address_is_refused(cluster, tmp_path):
    cluster.start_master()
    zones = {"node-a": "a", "node-b": "a", "node-c": "b"}
    for name, zone in zones.items():
        extra = ["--label", f"zone={zone}"] + (["--label", "rack=r1"] if name == "node-c" else [])
        cluster.start_agent(name, *extra)
    wait_until(lambda: len(cluster.ready_nodes()) == 3, 30, what="3 Agents to register")
    listed = {n["name"]: n for n in cluster.json("node", "list")}
    assert {name: n["labels"] for name, n in listed.items()} == {
        "node-a": {"zone": "a"}, "node-b": {"zone": "a"}, "node-c": {"rack": "r1", "zone": "b"}}
    assert {name: n["address"] for name, n in listed.items()} == {
        name: cluster.agent_address(name) for name in zones}
    header, *rows = cluster.ctl("node", "list").stdout.splitlines()
    assert "LABELS" in header.split()
    cells = {row.split()[0]: row.split() for row in rows}
    assert "rack=r1,zone=b" in cells["node-c"] and "zone=a" in cells["node-a"]

    # Four virtual nodes over zones a (two nodes) and b (one): two each,
    # counted from what each Agent's driver really runs.
    cluster.ctl("image", "push", make_ext4_image(str(tmp_path / "img")), "--name", "img")
    cluster.ctl("service", "create", "web", "--image", "img", "--nodes", "4", "--cpu", "0.5", "--wait",
                timeout=60)
    per_zone = {}
    for name, zone in zones.items():
        per_zone[zone] = per_zone.get(zone, 0) + len(running_guests(cluster, name))
    assert per_zone == {"a": 2, "b": 2}

    # A fourth Agent left at node-a's address is refused, and says why.
    cluster.start_agent("node-d", "--address", cluster.agent_address("node-a"))
    wait_until(lambda: "is already held by node node-a" in cluster.log("node-d"), 30,
               what="node-d's registration to be refused")
    assert "node-d" not in {n["name"] for n in cluster.json("node", "list")}
