"""Host routes to other nodes' guest subnets (soda.routing) in the real
kernel: two network namespaces A and B joined by a veth pair on one /24 (the
"L2 segment"), B holding a guest-like address of its node's subnet. The
routes are read back with `ip -j route`, not with soda.routing."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

import pytest

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("host routes need root (network namespaces, veths, routes)", allow_module_level=True)

from soda.model.spec import Resources  # noqa: E402
from soda.model.state import Node  # noqa: E402
from soda.netns import enter_netns  # noqa: E402
from soda.routing import RTPROT_SODA, HostRoutes  # noqa: E402
from tests.integration.conftest import NETNS_PREFIX, delete_netns, run, sweep_netns, unique  # noqa: E402

SEGMENT = "172.31.250"                  # the veth pair's /24: A is .1, B is .2 (and .3 once moved)
A_SUBNET, B_SUBNET = "10.233.6.0/24", "10.233.7.0/24"
GUEST = "10.233.7.2"                    # B's guest-like address
NOT_ON_SEGMENT = ("not on a network this host is attached to; SODA routes guest subnets only "
                  "between hosts on one L2 segment (host-gw)")


def node(name: str, address: str, subnet: str) -> Node:
    return Node(name=name, address=address, capacity=Resources(cpu=1, memory=64, bandwidth=10, disk=64),
                hypervisors=("fake",), subnet=subnet)


def routes(netns: str) -> dict[str, dict]:
    """The main table of `netns` by destination, as iproute2 reads it."""
    out = run(["ip", "-n", netns, "-j", "-4", "route", "show", "table", "main"]).stdout
    return {r["dst"]: r for r in json.loads(out or "[]")}


def ours(netns: str) -> dict[str, str]:
    """{subnet: gateway} of the routes carrying SODA's protocol number."""
    return {dst: r.get("gateway", "") for dst, r in routes(netns).items()
            if str(r.get("protocol")) == str(RTPROT_SODA)}


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def _echo(address: str, timeout: float) -> bool:
    """One ICMP echo request to `address` and its reply, on a raw socket."""
    ident = os.getpid() & 0xFFFF
    body = b"soda-routing"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
    packet = struct.pack("!BBHHH", 8, 0, _checksum(header + body), ident, 1) + body
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        try:
            sock.sendto(packet, (address, 0))
        except OSError:             # no route: no answer
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, (source, _) = sock.recvfrom(2048)
            except (socket.timeout, OSError):
                return False
            icmp = data[(data[0] & 0x0F) * 4:]
            if source == address and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                return True
    return False


def ping(netns: str, address: str, timeout: float = 2.0) -> bool:
    """Whether `address` answers an ICMP echo sent from `netns` (a thread of
    its own enters it: there may be no ping binary on the test host)."""
    answered = []

    def inside() -> None:
        enter_netns(netns)
        answered.append(_echo(address, timeout))
    thread = threading.Thread(target=inside, name=f"ping-{netns}")
    thread.start()
    thread.join(timeout + 5)
    return answered == [True]


def guest_link(netns: str, name: str) -> None:
    """A link to hold a guest-like address: a dummy, or an empty bridge where
    the kernel has no dummy driver (an address on either is local)."""
    if run(["ip", "-n", netns, "link", "add", name, "type", "dummy"], check=False).returncode != 0:
        run(["ip", "-n", netns, "link", "add", name, "type", "bridge"])
    run(["ip", "-n", netns, "link", "set", name, "up"])


@dataclass
class Pair:
    a: str
    b: str
    routes: HostRoutes          # in A, as node "na"


@pytest.fixture
def pair():
    a, b = unique(NETNS_PREFIX), unique(NETNS_PREFIX)
    made: list[str] = []
    host_routes = None
    try:
        for name in (a, b):
            run(["ip", "netns", "add", name])
            made.append(name)
            run(["ip", "-n", name, "link", "set", "lo", "up"])
        run(["ip", "-n", a, "link", "add", "seg0", "type", "veth", "peer", "name", "seg0", "netns", b])
        for name, host in ((a, 1), (b, 2)):
            run(["ip", "-n", name, "addr", "add", f"{SEGMENT}.{host}/24", "dev", "seg0"])
            run(["ip", "-n", name, "link", "set", "seg0", "up"])
        guest_link(b, "gst0")
        run(["ip", "-n", b, "addr", "add", f"{GUEST}/24", "dev", "gst0"])
        host_routes = HostRoutes(own_node="na", netns=a)
        yield Pair(a, b, host_routes)
    finally:
        # The namespaces take their links and routes with them.
        if host_routes is not None:
            host_routes.close()
        for name in made:
            delete_netns(name)
        sweep_netns()


def cluster(b_address: str = f"{SEGMENT}.2") -> list[Node]:
    return [node("na", f"{SEGMENT}.1", A_SUBNET), node("nb", b_address, B_SUBNET)]


def test_a_node_on_the_segment_is_routed_and_its_guests_answer(pair):
    assert not ping(pair.a, GUEST)                      # nothing leads there yet
    assert pair.routes.sync(cluster()) == []
    table = routes(pair.a)
    assert table[B_SUBNET]["gateway"] == f"{SEGMENT}.2" and table[B_SUBNET]["dev"] == "seg0"
    assert str(table[B_SUBNET]["protocol"]) == str(RTPROT_SODA)
    assert A_SUBNET not in table                        # its own subnet: never routed
    assert ping(pair.a, GUEST)
    before = routes(pair.a)
    assert pair.routes.sync(cluster()) == [] and routes(pair.a) == before      # idempotent


def test_a_node_that_moves_or_leaves_takes_its_route_along(pair):
    assert pair.routes.sync(cluster()) == []
    # Deleted first: deleting a primary address takes its secondaries along.
    run(["ip", "-n", pair.b, "addr", "del", f"{SEGMENT}.2/24", "dev", "seg0"])
    run(["ip", "-n", pair.b, "addr", "add", f"{SEGMENT}.3/24", "dev", "seg0"])
    assert not ping(pair.a, GUEST)                      # the old gateway is gone
    assert pair.routes.sync(cluster(f"{SEGMENT}.3")) == []
    assert ours(pair.a) == {B_SUBNET: f"{SEGMENT}.3"}
    assert ping(pair.a, GUEST)
    # Another process (a restarted Agent) finds the route by its protocol
    # and removes it once the node has left.
    again = HostRoutes(own_node="na", netns=pair.a)
    try:
        assert again.sync([node("na", f"{SEGMENT}.1", A_SUBNET)]) == []
    finally:
        again.close()
    assert ours(pair.a) == {} and B_SUBNET not in routes(pair.a)
    assert not ping(pair.a, GUEST)


def test_a_gateway_off_the_segment_installs_nothing_and_is_a_problem(pair):
    # 10.88.0.0/16 is reached through B as a router: not a neighbour either.
    run(["ip", "-n", pair.a, "route", "add", "10.88.0.0/16", "via", f"{SEGMENT}.2"])
    far = [node("nc", "10.77.0.1", "10.233.8.0/24"), node("nd", "10.88.0.5", "10.233.9.0/24")]
    problems = pair.routes.sync(cluster() + far)
    assert problems == [f"node nc (10.77.0.1): {NOT_ON_SEGMENT}",
                        f"node nd (10.88.0.5): {NOT_ON_SEGMENT}"]
    assert ours(pair.a) == {B_SUBNET: f"{SEGMENT}.2"}   # the others still went in
    assert "10.233.8.0/24" not in routes(pair.a) and "10.233.9.0/24" not in routes(pair.a)


def test_subnets_this_host_reaches_already_and_loopback_nodes_are_left_alone(pair):
    # A local uplink holds 10.233.5.0/24: its connected route is not ours to replace.
    guest_link(pair.a, "up0")
    run(["ip", "-n", pair.a, "addr", "add", "10.233.5.254/24", "dev", "up0"])
    local = node("ne", f"{SEGMENT}.2", "10.233.5.0/24")
    on_loopback = node("nf", "127.0.1.7", "10.233.10.0/24")
    assert pair.routes.sync([*cluster(), local, on_loopback]) == []
    table = routes(pair.a)
    assert table["10.233.5.0/24"]["protocol"] == "kernel" and "gateway" not in table["10.233.5.0/24"]
    assert "10.233.10.0/24" not in table
    assert ours(pair.a) == {B_SUBNET: f"{SEGMENT}.2"}


def test_clear_removes_every_route_of_ours_and_nothing_else(pair):
    run(["ip", "-n", pair.a, "route", "add", "10.88.0.0/16", "via", f"{SEGMENT}.2"])
    b2 = node("ng", f"{SEGMENT}.2", "10.233.11.0/24")         # one host, two subnets: fine
    assert pair.routes.sync([*cluster(), b2]) == []
    assert ours(pair.a) == {B_SUBNET: f"{SEGMENT}.2", "10.233.11.0/24": f"{SEGMENT}.2"}
    assert pair.routes.clear() == []
    assert ours(pair.a) == {}
    table = routes(pair.a)
    assert table["10.88.0.0/16"]["gateway"] == f"{SEGMENT}.2" and f"{SEGMENT}.0/24" in table
    assert pair.routes.clear() == []                                   # nothing left: fine
