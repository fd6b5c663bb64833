"""A hypervisor driver from a distribution of its own (tests/plugins/
soda-driver-echo, installed by scripts/test, found only through the
`soda.hypervisors` entry point) is offered by a real soda-agent, registered
with the capabilities it declares, shown by sodactl, and runs a service; the
Master decides from what the node registered (a memory resize on a driver
without live memory change is a new boot)."""

import json
import os

from tests.support import make_ext4_image
from tests.system.cluster import wait_until


def starts(cluster, node):
    """How often the echo driver started each guest, from its own record."""
    with open(os.path.join(cluster.agent_dir(node), "echo", "_starts.json")) as f:
        return json.load(f)["starts"]


def test_an_entry_point_driver_is_offered_registered_shown_and_used(cluster, tmp_path):
    cluster.start_master()
    cluster.start_agent("plug-a", "--hypervisor", "echo")
    wait_until(lambda: "plug-a" in cluster.ready_nodes(), 30, what="the Agent to register")
    [node] = cluster.json("node", "list")
    assert node["hypervisors"] == ["fake", "echo"]
    echo = node["drivers"]["echo"]
    assert (echo["live_memory"], echo["migration"], echo["plumbing"]) == (False, "stop-and-copy", False)
    assert node["drivers"]["fake"]["live_memory"] is True
    assert "echo" in cluster.ctl("node", "list").stdout

    cluster.ctl("image", "push", make_ext4_image(str(tmp_path / "img")), "--name", "img")
    cluster.ctl("service", "create", "web", "--image", "img", "--hypervisor", "echo",
                "--nodes", "2", "--memory", "64", "--wait", "--timeout", "30")
    vnodes = cluster.json("service", "get", "web")["vnodes"]
    assert {v["phase"] for v in vnodes} == {"RUNNING"}
    assert starts(cluster, "plug-a") == {"web-0": 1, "web-1": 1}

    # What the node declared decides: echo changes no memory live, so the
    # Master gives the guests a new generation and the Agent boots them again.
    cluster.ctl("service", "resize", "web", "--memory", "96", "--wait", "--timeout", "30")
    assert starts(cluster, "plug-a") == {"web-0": 2, "web-1": 2}

    refused = cluster.ctl("service", "create", "other", "--image", "img",
                          "--hypervisor", "xen", check=False)
    assert refused.returncode == 1
    assert "no physical node offers hypervisor 'xen' (offered: echo, fake)" in refused.stderr
