"""Node drain on a Master and 3 Agents (fake driver) as real processes,
driven by sodactl: `node drain --wait` moves every virtual node off a node
and exits 0, a drain the other nodes have no room for exits 3 naming the
resource, and a drained node is removed once its Agent is stopped.

Where the virtual nodes run is read from each Agent's fake driver (its
guest records on disk) as well as from the Master."""

import signal

import pytest

from tests.support import make_ext4_image
from tests.system.cluster import wait_until
from tests.system.test_fake_cluster import NODES, running_guests

pytestmark = pytest.mark.cluster


@pytest.fixture
def three_nodes(cluster, tmp_path):
    # Two cores each whatever this machine has, so that room runs out
    # where the test says.
    config = tmp_path / "agent.yaml"
    config.write_text("capacity: {cpu: 2}\n")
    cluster.start_master()
    for name in NODES:
        cluster.start_agent(name, "--config", str(config))
    wait_until(lambda: len(cluster.ready_nodes()) == 3, 30, what="3 Agents to register")
    cluster.ctl("image", "push", make_ext4_image(str(tmp_path / "img")), "--name", "img")
    return cluster


def placements(c, service="web"):
    return {v["name"]: v["node"] for v in c.json("service", "get", service)["vnodes"]}


def test_drain_moves_every_virtual_node_elsewhere_and_refuses_without_room(three_nodes):
    c = three_nodes
    c.ctl("service", "create", "web", "--image", "img", "--nodes", "4", "--cpu", "0.5", "--wait", timeout=60)
    before = placements(c)
    on_a = {name for name, node in before.items() if node == "node-a"}
    assert on_a and running_guests(c, "node-a") == on_a

    result = c.ctl("node", "drain", "node-a", "--wait", "--timeout", "90", timeout=120)
    assert result.stdout.strip() == "node node-a drained: it holds no virtual node"
    progress = result.stderr.splitlines()
    assert progress[-1] == "node-a: drained"
    assert any("moving to web-" in line for line in progress), progress

    svc = c.json("service", "get", "web")
    assert svc["nodes"] == 4 and svc["state"] == "RUNNING"
    assert len(svc["vnodes"]) == 4
    assert all(v["node"] in ("node-b", "node-c") and v["phase"] == "RUNNING" for v in svc["vnodes"])
    # What the Agents' drivers really run: nothing on node-a, the rest untouched.
    assert running_guests(c, "node-a") == set()
    assert running_guests(c, "node-b") | running_guests(c, "node-c") == {v["name"] for v in svc["vnodes"]}
    assert set(before) - on_a <= {v["name"] for v in svc["vnodes"]}
    nodes = {n["name"]: n for n in c.json("node", "list")}
    assert (nodes["node-a"]["draining"], nodes["node-a"]["vnodes"]) == (True, 0)
    rows = {row.split()[0]: row.split() for row in c.ctl("node", "list").stdout.splitlines()[1:]}
    assert rows["node-a"][2] == "READY,DRAINED" and rows["node-b"][2] == "READY"

    # Nothing new goes to node-a; b and c are then full (2 cores each).
    c.ctl("service", "create", "big", "--image", "img", "--nodes", "2", "--cpu", "1", "--wait", timeout=60)
    assert "node-a" not in placements(c, "big").values()
    refused = c.ctl("node", "drain", "node-b", check=False)
    assert refused.returncode == 3, refused.stderr
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("error: cannot drain node node-b: not enough cpu") and "Traceback" not in line
    assert not {n["name"]: n for n in c.json("node", "list")}["node-b"]["draining"]

    unknown = c.ctl("node", "drain", "nope", check=False)
    assert unknown.returncode == 1 and unknown.stderr.strip() == "error: no physical node named 'nope'"

    # Undrain places there again; a drained node whose Agent is stopped is removed.
    assert "takes new virtual nodes again" in c.ctl("node", "undrain", "node-a").stdout
    c.ctl("node", "drain", "node-a")
    c.kill("node-a", signal.SIGTERM)
    assert "node node-a removed" in c.ctl("node", "remove", "node-a").stdout
    assert sorted(n["name"] for n in c.json("node", "list")) == ["node-b", "node-c"]
