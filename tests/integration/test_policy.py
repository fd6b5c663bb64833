"""The node's guard against its guests (soda.agent.policy) against the real
kernel: a node namespace made by NodeNetwork (bridge, uplink, SODA's nft
tables), and "guests" that are namespaces of their own joined to the
bridge by a veth (a TAP needs a VMM to send; a veth end on the bridge is
the same bridge port to nftables). What passes and what does not is read
from TCP connections between them, never from the rules written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("the node policy needs root (netns, bridges, nftables)", allow_module_level=True)

from soda import model  # noqa: E402
from soda.agent.network import NodeNetwork  # noqa: E402
from soda.agent.policy import desired_policy  # noqa: E402
from soda.hypervisors.base import guest_mac  # noqa: E402
from tests.integration.conftest import NETNS_PREFIX, delete_netns, run, unique  # noqa: E402

SUBNET, GATEWAY, UPLINK = "10.237.4.0/24", "10.237.4.1", "10.237.4.254"
PORT = 80            # the services' port
OTHER = 2222         # another port each guest listens on
HOST_PORT = 9000     # a host service on 0.0.0.0, in the node's namespace
ROOT_PORT = 9001     # a service on the uplink's address, in the root namespace (the "Switch host")

# A listener for `ip netns exec`: accepts on each port given, answers "ok".
SERVER = """
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], port)); s.listen(64)
    while True:
        c, _ = s.accept(); c.sendall(b"ok"); c.close()
for p in sys.argv[2:]:
    threading.Thread(target=serve, args=(int(p),), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""
# A client: exit 0 when the connection is answered within the timeout.
CLIENT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    sys.exit(0 if s.recv(2) == b"ok" else 1)
except OSError:
    sys.exit(1)
"""


class Node:
    """The node namespace with its bridge, and guests on it."""

    def __init__(self):
        self.net = NodeNetwork(netns=unique(NETNS_PREFIX), bridge="soda0")
        self.guests: dict[str, dict] = {}
        self.servers: list[subprocess.Popen] = []
        self.namespaces: list[str] = []

    def guest(self, name: str, address: str) -> str:
        ns = unique(NETNS_PREFIX)
        self.namespaces.append(ns)
        run(["ip", "netns", "add", ns])
        port = f"pv{os.getpid() % 1000}{len(self.guests)}"
        mac = guest_mac(address)
        run(["ip", "-n", self.net.netns, "link", "add", port, "type", "veth", "peer", "name", "eth0",
             "netns", ns])
        run(["ip", "-n", self.net.netns, "link", "set", port, "master", "soda0", "up"])
        run(["ip", "-n", ns, "link", "set", "eth0", "address", mac, "up"])
        run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "route", "add", "default", "via", GATEWAY])
        self.net.guard.guard(port, mac, address)
        self.guests[name] = {"ns": ns, "address": address, "port": port, "mac": mac}
        self.serve(ns, "0.0.0.0", PORT, OTHER)
        return ns

    def serve(self, ns: str, address: str, *ports: int) -> None:
        argv = ([] if ns is None else ["ip", "netns", "exec", ns]) + [sys.executable, "-c", SERVER,
                                                                       address, *map(str, ports)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.servers.append(proc)
        assert proc.stdout.readline().strip() == "listening"

    def connects(self, source: str | None, address: str, port: int, timeout: float = 0.6) -> bool:
        """From guest `source` (None: the root namespace; "node": the node's
        own namespace), whether a TCP connection to address:port is answered."""
        ns = {None: None, "node": self.net.netns}.get(source, None) if source in (None, "node") \
            else self.guests[source]["ns"]
        argv = ([] if ns is None else ["ip", "netns", "exec", ns]) + [sys.executable, "-c", CLIENT, address,
                                                                       str(port), str(timeout)]
        return subprocess.run(argv, timeout=30).returncode == 0

    def apply(self, **networks: model.NetworkSpec) -> None:
        """The policy for services named by the guests' prefixes (a1 -> sa)."""
        services: dict[str, list] = {}
        for name, g in self.guests.items():
            services.setdefault(f"s{name[0]}", []).append(
                model.Endpoint(name, g["address"], PORT, 1.0, True))
        sets = [model.EndpointSet(svc, endpoints=tuple(eps), network=networks.get(svc, model.NetworkSpec()))
                for svc, eps in services.items()]
        self.net.policy.sync(desired_policy(sets, SUBNET, (GATEWAY, UPLINK)))

    def close(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait()
        try:
            self.net.teardown()
        finally:
            self.net.remove_netns()
            for ns in self.namespaces:
                delete_netns(ns)


@pytest.fixture
def node():
    n = Node()
    try:
        n.net.configure_node(SUBNET, GATEWAY, UPLINK)
        n.guest("a1", "10.237.4.11")
        n.guest("a2", "10.237.4.12")
        n.guest("b1", "10.237.4.21")
        n.guest("b2", "10.237.4.22")
        n.serve(n.net.netns, "0.0.0.0", HOST_PORT)
        n.serve(None, UPLINK, ROOT_PORT)
        yield n
    finally:
        n.close()


def tables(ns: str) -> list[str]:
    out = json.loads(run(["ip", "netns", "exec", ns, "nft", "-j", "list", "tables"]).stdout)
    return [f"{t['table']['family']} {t['table']['name']}" for t in out["nftables"] if "table" in t]


def test_the_bridge_passes_everything_without_a_policy(node):
    # The control: what the policy must close is open on a plain bridge.
    a2, b1 = node.guests["a2"]["address"], node.guests["b1"]["address"]
    assert node.connects("a1", b1, PORT) and node.connects("a1", a2, OTHER)
    assert node.connects("a1", GATEWAY, HOST_PORT) and node.connects("a1", UPLINK, ROOT_PORT)


def test_a_guest_reaches_its_peers_and_nothing_else_and_is_reached_by_the_switch_only(node):
    node.apply()
    g = {name: x["address"] for name, x in node.guests.items()}
    # Its own service: any port.
    assert node.connects("a1", g["a2"], PORT) and node.connects("a1", g["a2"], OTHER)
    assert node.connects("b2", g["b1"], OTHER)
    # Other services' guests, either way, any port.
    for src, dst in (("a1", "b1"), ("a2", "b2"), ("b1", "a1")):
        assert not node.connects(src, g[dst], PORT), (src, dst)
        assert not node.connects(src, g[dst], OTHER), (src, dst)
    # The node's own addresses and the host beyond the uplink.
    assert not node.connects("a1", GATEWAY, HOST_PORT)
    assert not node.connects("a1", UPLINK, ROOT_PORT)
    # The Switch host (root namespace, through the uplink) and the node's
    # health checks (its own namespace) reach the service port only.
    assert node.connects(None, g["a1"], PORT) and node.connects("node", g["b2"], PORT)
    assert not node.connects(None, g["a1"], OTHER) and not node.connects("node", g["b2"], OTHER)
    # What the guests sent and was dropped is counted per guest.
    drops = node.net.policy.drops()
    assert drops[g["a1"]] > 0 and drops[g["b1"]] > 0


def test_peers_false_isolates_a_service_from_itself_and_egress_opens_exactly_what_it_names(node):
    node.apply(sa=model.parse_network({"peers": False, "egress": [f"{UPLINK}:{ROOT_PORT}"]}))
    g = {name: x["address"] for name, x in node.guests.items()}
    assert not node.connects("a1", g["a2"], PORT) and not node.connects("a2", g["a1"], OTHER)
    assert node.connects("b1", g["b2"], PORT)                       # sb keeps its peers
    assert node.connects("a1", UPLINK, ROOT_PORT)                    # named in its egress
    assert not node.connects("b1", UPLINK, ROOT_PORT)               # not in sb's
    assert not node.connects("a1", GATEWAY, HOST_PORT)               # the node stays closed
    assert node.connects(None, g["a1"], PORT)                        # the Switch still gets in
    # Back to the defaults: one transaction replaces the policy.
    node.apply()
    assert node.connects("a1", g["a2"], PORT) and not node.connects("a1", UPLINK, ROOT_PORT)


def test_an_unknown_guest_address_on_the_node_is_closed(node):
    node.apply()
    g = node.guests["b2"]
    # A guest the policy does not know yet (placed a moment ago): b2's
    # service is not in the policy at all.
    sets = [model.EndpointSet("sa", endpoints=tuple(
        model.Endpoint(n, node.guests[n]["address"], PORT, 1.0, True) for n in ("a1", "a2")))]
    node.net.policy.sync(desired_policy(sets, SUBNET, (GATEWAY, UPLINK)))
    assert not node.connects(None, g["address"], PORT)
    assert not node.connects("b2", UPLINK, ROOT_PORT)
    assert node.connects(None, node.guests["a1"]["address"], PORT)


def _spoof_counters(node) -> dict[str, int]:
    return node.net.guard.drops()


def test_a_guest_that_takes_another_address_or_mac_gets_nothing_through(node):
    node.apply()
    a1, b1, b2 = (node.guests[n] for n in ("a1", "b1", "b2"))
    ns, port = a1["ns"], a1["port"]
    before = _spoof_counters(node).get(port, 0)
    # a1 takes b1's address: as b1 it would reach b2 (b1's peer).
    run(["ip", "-n", ns, "addr", "flush", "dev", "eth0"])
    run(["ip", "-n", ns, "addr", "add", f"{b1['address']}/24", "dev", "eth0"])
    run(["ip", "-n", ns, "route", "add", "default", "via", GATEWAY])
    assert not node.connects("a1", b2["address"], PORT)
    assert _spoof_counters(node)[port] > before
    # Back to its own address but another MAC: nothing gets through either,
    # not even to its own peer.
    run(["ip", "-n", ns, "addr", "flush", "dev", "eth0"])
    run(["ip", "-n", ns, "addr", "add", f"{a1['address']}/24", "dev", "eth0"])
    run(["ip", "-n", ns, "route", "add", "default", "via", GATEWAY])
    assert node.connects("a1", node.guests["a2"]["address"], PORT)     # as itself: fine
    run(["ip", "-n", ns, "link", "set", "eth0", "address", "02:50:de:ad:be:ef"])
    run(["ip", "-n", ns, "neigh", "flush", "all"])
    middle = _spoof_counters(node)[port]
    assert not node.connects("a1", node.guests["a2"]["address"], PORT)
    assert _spoof_counters(node)[port] > middle


def _gratuitous_arp(ns: str, mac: str, claimed: str) -> None:
    """An ARP reply broadcast from `ns`'s eth0 saying `claimed` is at `mac`."""
    code = (
        "import socket, struct, sys\n"
        "mac = bytes.fromhex(sys.argv[1].replace(':', '')); ip = socket.inet_aton(sys.argv[2])\n"
        "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('eth0', 0))\n"
        "arp = struct.pack('!HHBBH6s4s6s4s', 1, 0x0800, 6, 4, 2, mac, ip, b'\\xff' * 6, ip)\n"
        "for _ in range(3):\n"
        "    s.send(b'\\xff' * 6 + mac + b'\\x08\\x06' + arp)\n")
    run(["ip", "netns", "exec", ns, sys.executable, "-c", code, mac, claimed])


def test_a_gratuitous_arp_for_another_guests_address_is_dropped_and_counted(node):
    node.apply()
    a1, a2 = node.guests["a1"], node.guests["a2"]
    before = _spoof_counters(node).get(a1["port"], 0)
    _gratuitous_arp(a1["ns"], a1["mac"], a2["address"])
    assert _spoof_counters(node)[a1["port"]] >= before + 3
    # Nobody learnt it: not the node (its gateway), not the other guests.
    assert node.connects("node", a2["address"], PORT)       # the node has a2's real MAC
    for ns in (node.net.netns, a2["ns"], node.guests["b1"]["ns"]):
        neigh = json.loads(run(["ip", "-n", ns, "-j", "neigh", "show"]).stdout or "[]")
        assert [n for n in neigh if n["dst"] == a2["address"] and n.get("lladdr") == a1["mac"]] == [], ns
    # Its own ARP (for its own address) passes: it still reaches its peer.
    assert node.connects("a1", a2["address"], PORT)


def test_teardown_leaves_no_table_behind(node):
    node.apply()
    assert set(tables(node.net.netns)) == {"bridge soda", "inet soda"}
    port = node.guests["b2"]["port"]
    node.net.guard.unguard(port)
    node.net.guard.unguard(port)                      # nothing left: fine
    assert port not in _spoof_counters(node)
    node.net.teardown()
    assert tables(node.net.netns) == []


def test_a_guests_ipv6_goes_nowhere_and_is_not_counted_as_spoofing(node):
    node.apply()
    a1, a2 = node.guests["a1"], node.guests["a2"]
    addrs = json.loads(run(["ip", "-n", a2["ns"], "-6", "-j", "addr", "show", "dev", "eth0"]).stdout)
    link_local = [i["local"] for a in addrs for i in a.get("addr_info", [])
                  if i.get("scope") == "link"]
    assert link_local, f"a2 has no IPv6 link-local address: {addrs}"
    before = _spoof_counters(node).get(a1["port"], 0)
    ping = run(["ip", "netns", "exec", a1["ns"], "ping", "-6", "-c", "2", "-W", "1",
                f"{link_local[0]}%eth0"], check=False)
    assert ping.returncode != 0, ping.stdout
    assert _spoof_counters(node).get(a1["port"], 0) == before
    assert node.connects("a1", a2["address"], PORT)          # IPv4 to its peer still fine
