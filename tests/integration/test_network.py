"""Node networking against the real kernel, inside a namespace this test makes."""

import json
import os
import subprocess
import uuid

import pytest

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("node networking needs root (netns, bridges, TAPs)", allow_module_level=True)

from soda.agent.network import NetworkError, NodeNetwork, tap_name  # noqa: E402
from soda.hypervisors.base import guest_mac  # noqa: E402
from soda.service import forbid_fork  # noqa: E402


def links(netns=None):
    argv = ["ip", "-j"] + (["-n", netns] if netns else []) + ["link", "show"]
    return {l["ifname"]: l for l in json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)}


def addrs(netns, dev):
    argv = ["ip", "-j"] + (["-n", netns] if netns else []) + ["addr", "show", "dev", dev]
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    return {(a["local"], a["prefixlen"]) for a in out[0]["addr_info"] if a["family"] == "inet"}


def neighbours(netns, dev):
    """{address: (lladdr, states)} of the IPv4 neighbour entries on `dev`."""
    argv = ["ip", "-j", "-4"] + (["-n", netns] if netns else []) + ["neigh", "show", "dev", dev]
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout or "[]")
    return {n["dst"]: (n.get("lladdr"), n.get("state")) for n in out}


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
    net.configure_node(subnet, gateway, "10.233.7.254")
    net.configure_node(subnet, gateway, "10.233.7.254")            # idempotent
    inside = links(net.netns)
    assert "soda0" in inside and "UP" in inside["soda0"]["flags"]
    assert addrs(net.netns, "soda0") == {("10.233.7.1", 24)}
    assert inside["soda0"]["address"] == "02:51:0a:e9:07:01"
    assert inside["uplink0"]["master"] == "soda0"
    assert addrs(None, net.uplink_host) == {("10.233.7.254", 24)}

    mac = guest_mac("10.233.7.2")
    plugged = net.plug("web-0", "10.233.7.2", mac)
    tap = plugged["tap"]
    assert plugged == {"tap": tap_name("web-0"), "netns": net.netns} and len(tap) <= 15
    assert net.plug("web-0", "10.233.7.2", mac) == plugged       # idempotent
    inside = links(net.netns)
    assert inside[tap]["master"] == "soda0"
    assert tap not in links(None)                        # stays in the namespace
    # The guest is reachable at its MAC before it ever speaks: on the bridge
    # and where the host's route to it leads (the uplink's host end).
    assert neighbours(net.netns, "soda0") == {"10.233.7.2": (mac, ["PERMANENT"])}
    assert neighbours(None, net.uplink_host) == {"10.233.7.2": (mac, ["PERMANENT"])}
    assert net.plugged() == {"web-0"}                    # found again from the TAP's alias
    net.unplug("web-0")
    net.unplug("web-0")
    assert tap not in links(net.netns) and net.plugged() == set()
    assert neighbours(net.netns, "soda0") == {}
    assert neighbours(None, net.uplink_host) == {}

    net.teardown()
    assert "soda0" not in links(net.netns)
    assert net.uplink_host not in links(None)


def test_plugging_from_fresh_threads_never_forks_with_grpc_alive(net):
    """Start and stop pools grow threads on demand; pyroute2 used to fork
    (to enter the namespace) from every new thread, and a fork with gRPC
    threads alive aborted the child and then the Agent. With forks banned as
    the Agent bans them, ten concurrent plugs and unplugs from fresh threads,
    twenty times over, must all work."""
    import grpc
    from concurrent.futures import ThreadPoolExecutor
    from grpc_health.v1 import health, health_pb2_grpc

    net.configure_node("10.233.8.0/24", "10.233.8.1", "10.233.8.254")
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port("127.0.0.1:0")
    server.start()
    allow_fork = forbid_fork("test: gRPC is serving")
    try:
        vnodes = {f"svc-{i}": f"10.233.8.{10 + i}" for i in range(10)}
        for _ in range(20):
            with ThreadPoolExecutor(max_workers=10) as pool:      # fresh threads each round
                list(pool.map(lambda kv: net.plug(kv[0], kv[1], guest_mac(kv[1])), vnodes.items()))
            assert {tap_name(v) for v in vnodes} <= set(links(net.netns))
            assert set(neighbours(net.netns, "soda0")) == set(vnodes.values())
            with ThreadPoolExecutor(max_workers=10) as pool:
                list(pool.map(net.unplug, vnodes))
            assert not {tap_name(v) for v in vnodes} & set(links(net.netns))
            assert neighbours(net.netns, "soda0") == {}
            assert neighbours(None, net.uplink_host) == {}
    finally:
        allow_fork()
        server.stop(grace=0)


def test_a_subnet_that_overlaps_a_host_network_is_refused_and_leaves_nothing(net):
    # A host network inside the node's namespace, where the subnet would go.
    subprocess.run(["ip", "-n", net.netns, "link", "add", "hostnet0", "type", "veth", "peer", "name", "hostnet1"], check=True)
    subprocess.run(["ip", "-n", net.netns, "addr", "add", "10.233.9.77/16", "dev", "hostnet0"], check=True)
    with pytest.raises(NetworkError, match=r"10.233.9.0/24 .* overlaps 10.233.9.77/16 on hostnet0"):
        net.configure_node("10.233.9.0/24", "10.233.9.1", "10.233.9.254")
    assert "soda0" not in links(net.netns)
    # Another subnet is fine.
    net.configure_node("10.234.1.0/24", "10.234.1.1", "10.234.1.254")
    assert addrs(net.netns, "soda0") == {("10.234.1.1", 24)}


def tap_owner(netns, tap):
    """(user, group) owning `tap`, from `ip -d` (None, None: no owner)."""
    argv = ["ip", "-j", "-d", "-n", netns, "link", "show", "dev", tap]
    info = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)[0]
    data = info["linkinfo"]["info_data"]
    return data.get("user"), data.get("group")


def test_a_tap_is_owned_by_the_uid_its_vmm_runs_as(net):
    net.configure_node("10.233.10.0/24", "10.233.10.1", "10.233.10.254")
    mac = guest_mac("10.233.10.2")
    tap = net.plug("own-0", "10.233.10.2", mac, owner=201234)["tap"]
    assert tap_owner(net.netns, tap) == (201234, 201234)
    index = links(net.netns)[tap]["ifindex"]
    net.plug("own-0", "10.233.10.2", mac, owner=201234)            # idempotent: same TAP
    assert links(net.netns)[tap]["ifindex"] == index
    # Another owner (the service's uid changed): the TAP is made again.
    net.plug("own-0", "10.233.10.2", mac, owner=205678)
    assert tap_owner(net.netns, tap) == (205678, 205678)
    assert links(net.netns)[tap]["master"] == "soda0"
    assert neighbours(net.netns, "soda0") == {"10.233.10.2": (mac, ["PERMANENT"])}
    net.plug("own-0", "10.233.10.2", mac)                          # root's again: no owner
    assert tap_owner(net.netns, tap) == (None, None)
    net.unplug("own-0")
    assert tap not in links(net.netns)
