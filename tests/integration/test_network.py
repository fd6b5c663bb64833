"""Node networking against the real kernel, inside a namespace this test makes."""

import json
import os
import subprocess
import uuid

import pytest

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("node networking needs root (netns, bridges, TAPs)", allow_module_level=True)

from soda.agent.network import NodeNetwork, tap_name, uplink_address  # noqa: E402


def links(netns=None):
    argv = ["ip", "-j"] + (["-n", netns] if netns else []) + ["link", "show"]
    return {l["ifname"]: l for l in json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)}


def addrs(netns, dev):
    argv = ["ip", "-j"] + (["-n", netns] if netns else []) + ["addr", "show", "dev", dev]
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    return {(a["local"], a["prefixlen"]) for a in out[0]["addr_info"] if a["family"] == "inet"}


@pytest.fixture
def net():
    name = f"sodan-{uuid.uuid4().hex[:8]}"
    n = NodeNetwork(netns=name, bridge="soda0")
    yield n
    try:
        n.teardown()
    finally:
        n.remove_netns()
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_bridge_uplink_and_taps(net):
    subnet, gateway = "10.233.7.0/24", "10.233.7.1"
    net.configure(subnet, gateway)
    net.configure(subnet, gateway)                     # idempotent
    inside = links(net.netns)
    assert "soda0" in inside and "UP" in inside["soda0"]["flags"]
    assert addrs(net.netns, "soda0") == {("10.233.7.1", 24)}
    assert inside["uplink0"]["master"] == "soda0"
    assert addrs(None, net.uplink_host) == {(uplink_address(subnet), 24)}
    assert uplink_address(subnet) == "10.233.7.254"

    tap = net.ensure_tap("web-0")
    assert tap == tap_name("web-0") and len(tap) <= 15
    assert net.ensure_tap("web-0") == tap                # idempotent
    inside = links(net.netns)
    assert inside[tap]["master"] == "soda0"
    assert tap not in links(None)                        # stays in the namespace
    net.remove_tap("web-0")
    net.remove_tap("web-0")
    assert tap not in links(net.netns)

    net.teardown()
    assert "soda0" not in links(net.netns)
    assert net.uplink_host not in links(None)
