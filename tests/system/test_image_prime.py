"""sodactl image prime: Master and two Agents (fake driver) as processes;
the image lands in the caches of the nodes asked, ahead of any service, as
their image directories show; inspect and node get report where it is."""

import hashlib
import os

import pytest

from tests.support import make_ext4_image
from tests.system.cluster import wait_until

pytestmark = pytest.mark.cluster
NODES = ("node-a", "node-b")


def _cached(cluster, node: str, digest: str) -> bool:
    path = os.path.join(cluster.agent_dir(node), "images", digest.replace(":", "-"))
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest() == digest


def test_priming_pulls_ahead_of_need_on_the_nodes_asked(cluster, tmp_path):
    cluster.start_master()
    for name in NODES:
        cluster.start_agent(name)
    wait_until(lambda: len(cluster.ready_nodes()) == 2, 30, what="2 Agents to register")
    image = make_ext4_image(str(tmp_path / "img"), data=os.urandom(64 * 1024))
    digest = cluster.json("image", "push", image, "--name", "img")["digest"]

    primed = cluster.json("image", "prime", "img", "--nodes", "node-a", "--timeout", "30")
    assert primed["nodes"] == ["node-a"] and primed["holding"] == ["node-a"]
    assert _cached(cluster, "node-a", digest) and not _cached(cluster, "node-b", digest)
    assert cluster.json("image", "inspect", "img")["nodes"] == ["node-a"]

    done = cluster.ctl("image", "prime", "img", "--timeout", "30")       # every READY node
    assert "in the cache of 2 node(s)" in done.stderr, done.stderr
    assert all(_cached(cluster, n, digest) for n in NODES)
    node = cluster.json("node", "get", "node-b")
    assert digest in node["image_cache"]["images"] and node["image_cache"]["bytes"] > 0

    refused = cluster.ctl("image", "prime", "img", "--nodes", "node-z", check=False)
    assert refused.returncode == 1 and "no physical node named 'node-z'" in refused.stderr
    assert "Traceback" not in refused.stderr
