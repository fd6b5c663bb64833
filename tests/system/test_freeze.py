"""sodactl service freeze/thaw through real processes: a Master and an
Agent (fake driver); what the driver holds is read from its records on disk,
and how often each guest was started from its start counts."""

import json
import os

import pytest

from tests.support import make_ext4_image
from tests.system.cluster import wait_until

pytestmark = pytest.mark.cluster


def _record(cluster, vnode: str) -> dict:
    with open(os.path.join(cluster.agent_dir("node-a"), "fake", f"{vnode}.json")) as f:
        return json.load(f)


def _starts(cluster) -> dict:
    with open(os.path.join(cluster.agent_dir("node-a"), "fake", "_starts.json")) as f:
        return json.load(f)["starts"]


def _phases(cluster) -> dict:
    return {v["name"]: v["phase"] for v in cluster.json("service", "get", "web")["vnodes"]}


def test_a_frozen_virtual_node_stays_frozen_across_an_agent_restart_and_thaws_in_place(cluster, tmp_path):
    cluster.start_master()
    cluster.start_agent("node-a")
    wait_until(lambda: cluster.ready_nodes() == ["node-a"], 30, what="the Agent to register")
    cluster.ctl("image", "push", make_ext4_image(str(tmp_path / "img")), "--name", "img")
    cluster.ctl("service", "create", "web", "--image", "img", "--nodes", "2", "--wait", "--timeout", "60")

    frozen = cluster.json("service", "freeze", "web", "--vnode", "1", "--wait", "--timeout", "60")
    assert [(v["name"], v["phase"], v["frozen"]) for v in frozen["vnodes"]] == [
        ("web-0", "RUNNING", False), ("web-1", "FROZEN", True)]
    assert _record(cluster, "web-1").get("frozen") is True and not _record(cluster, "web-0").get("frozen")
    assert "FROZEN" in cluster.ctl("service", "get", "web").stdout
    before = _starts(cluster)

    cluster.kill("node-a")
    cluster.start_agent("node-a")
    wait_until(lambda: cluster.ready_nodes() == ["node-a"], 30, what="the Agent to come back")
    wait_until(lambda: _phases(cluster) == {"web-0": "RUNNING", "web-1": "FROZEN"}, 30,
               what="the restarted Agent to report its guests")
    assert _record(cluster, "web-1").get("frozen") is True

    thawed = cluster.json("service", "thaw", "web", "--wait", "--timeout", "60")
    assert {v["name"]: (v["phase"], v["frozen"]) for v in thawed["vnodes"]} == {
        "web-0": ("RUNNING", False), "web-1": ("RUNNING", False)}
    assert not _record(cluster, "web-1").get("frozen")
    assert _starts(cluster) == before            # paused and resumed, never booted again

    refused = cluster.ctl("service", "freeze", "web", "--vnode", "web-9", check=False)
    assert refused.returncode == 1 and "has no virtual node 'web-9'" in refused.stderr
