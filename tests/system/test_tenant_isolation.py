"""Tenants' guests are hostile: on two physical nodes with real UML guests
of the hostile image (a shell for root in the guest: guest_run), a guest
of one service reaches its own service's peers, on its node and on the
other, and nothing else: not another service's guests, not its node's
gateway or uplink, not a listener the test starts on 0.0.0.0 of its host
and of the other host, not the Master; `network: {peers: false}` cuts a
service's guests off from each other; clients through the Switch still get
answers. Every connection is a TCP connect made by busybox nc inside the
guest; the listeners are the test's own, checked to answer from where they
may be reached.

A guest that takes another guest's address or another MAC gets no packet
through to a peer on its own bridge (read from the peer's own ICMP
counters: pings that did arrive), and its gratuitous ARP for another
guest's address changes no peer's ARP cache; its refused packets show in
`sodactl service get`. With the policy off (`soda-agent --no-policy`)
every one of these checks fails: the pings and the ARP get through."""

from __future__ import annotations

import subprocess
import sys

import pytest

from soda.hypervisors.base import guest_mac
from tests.support import free_port, reachable_tmp_dir
from tests.system.cluster import wait_until
from tests.system.guests import guest_run, in_netns, require_guest_support
from tests.system.multinode import IMAGE, MultiNode, fabric_config, get

pytestmark = [pytest.mark.cluster, pytest.mark.root, pytest.mark.guest]

require_guest_support()

# A listener for `ip netns exec`: accepts on 0.0.0.0:PORT and closes.
LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""


@pytest.fixture(scope="module")
def mn(hostile_rootfs):
    with reachable_tmp_dir("soda-test-isolation-") as state_dir:
        config = fabric_config(state_dir, nodes=2)
        with MultiNode(config) as cluster:
            cluster.ctl("image", "push", hostile_rootfs, "--name", IMAGE)
            yield cluster


@pytest.fixture(scope="module")
def listeners(mn):
    """A listener on 0.0.0.0 of each host and of the Switch's (root)
    namespace, on one port; stopped (by the pids started here) after."""
    port = free_port()
    procs = []
    try:
        for netns in ["", *(h.netns for h in mn.layout.hosts)]:
            argv = [*(["ip", "netns", "exec", netns] if netns else []), sys.executable, "-c",
                    LISTENER, str(port)]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            assert proc.stdout.readline().strip() == "ready"
        yield port
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def create(mn, name: str, nodes: int, extra: str = "") -> int:
    """`nodes` guests of a quarter CPU each; the Switch's port."""
    return mn.create(name, [0.25] * nodes, extra=extra)


def connects(vnode_address: str, targets: list[str]) -> dict[str, bool]:
    """From inside the guest at `vnode_address`: whether a TCP connect to
    each ADDRESS:PORT of `targets` succeeds (2 s each)."""
    script = "; ".join(
        f"if nc -w 2 {a.rsplit(':', 1)[0]} {a.rsplit(':', 1)[1]} -e /bin/true </dev/null "
        f">/dev/null 2>&1; then echo '{a} open'; else echo '{a} shut'; fi" for a in targets)
    out = guest_run("", vnode_address, script, timeout=10 + 3 * len(targets))
    found = dict(line.split() for line in out.splitlines() if line.endswith((" open", " shut")))
    assert set(found) == set(targets), out
    return {a: found[a] == "open" for a in targets}


def host_connects(netns: str, target: str) -> bool:
    address, port = target.rsplit(":", 1)
    code = (f"import socket; s = socket.create_connection(({address!r}, {port}), timeout=2); "
            "s.close()")
    return in_netns(netns, [sys.executable, "-c", code], check=False, timeout=10).returncode == 0


def refused(mn, service: str, vnode: str) -> int:
    v = next(v for v in mn.vnodes(service) if v["name"] == vnode)
    return (v.get("usage") or {}).get("packets_refused", 0)


def by_node(mn, service: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for v in mn.vnodes(service):
        found.setdefault(v["node"], []).append(v)
    return found


def host_of(mn, node: str):
    return next(h for h in mn.layout.hosts if h.name == node)


def test_a_guest_reaches_its_peers_and_nothing_else_across_two_nodes(mn, listeners):
    # Four of each, on two nodes: each service has guests on both.
    sa_port = create(mn, "sa", 4)
    create(mn, "sb", 4)
    create(mn, "sc", 2, extra="network: {peers: false}\n")
    try:
        sa, sb = by_node(mn, "sa"), by_node(mn, "sb")
        assert len(sa) == 2 and len(sb) == 2, (sa, sb)
        me = sa[mn.layout.host(1).name][0]
        here, there = host_of(mn, me["node"]), next(h for h in mn.layout.hosts
                                                   if h.name != me["node"])
        peers = [f"{v['address']}:80" for v in mn.vnodes("sa") if v["name"] != me["name"]]
        others = [f"{v['address']}:80" for v in mn.vnodes("sb")]
        gateway = guest_run("", me["address"], "ip route show default").split()[2]
        master_port = mn.config.master_addr.rsplit(":", 1)[1]
        closed = [*others,
                  f"{gateway}:{listeners}",
                  f"{here.address}:{listeners}", f"{there.address}:{listeners}",
                  f"{mn.layout.gateway}:{listeners}", f"{mn.layout.gateway}:{master_port}"]
        # Each closed target answers where it may: the other service's
        # guests from the Switch's host, the listeners and the Master on
        # the hosts themselves.
        for target in closed:
            assert host_connects(here.netns, target) or host_connects("", target), target
        seen = connects(me["address"], peers + closed)
        assert {t for t, ok in seen.items() if ok} == set(peers), seen

        # peers: false: a guest of sc reaches not even its own service.
        sc = mn.vnodes("sc")
        seen = connects(sc[0]["address"], [f"{sc[1]['address']}:80", *peers[:1]])
        assert not any(seen.values()), seen
        # Clients through the Switch still get every guest's answers.
        answers = {get(sa_port) for _ in range(40)}
        assert answers == {v["name"] for v in mn.vnodes("sa")}, answers
    finally:
        for name in ("sa", "sb", "sc"):
            mn.ctl("service", "delete", name, "--wait", "--timeout", "120", check=False)


def echoes(address: str) -> int:
    """ICMP echo requests the guest at `address` has taken in (its own
    /proc/net/snmp: nothing else pings a guest)."""
    icmp = [line.split() for line in guest_run("", address, "cat /proc/net/snmp").splitlines()
            if line.startswith("Icmp:")]
    return int(icmp[1][icmp[0].index("InEchos")])


def neighbour_mac(address: str, of: str) -> str | None:
    """The MAC the guest at `address` holds for `of` (its ARP cache)."""
    out = guest_run("", address, f"ip neigh show {of}")
    words = out.split()
    return words[words.index("lladdr") + 1] if "lladdr" in words else None


def test_a_guest_that_takes_another_address_or_mac_gets_nothing_through(mn):
    create(mn, "sp", 4)
    create(mn, "sv", 2)
    try:
        # A spoofer, a peer of its service and a victim of another, on one
        # node (on one bridge: nothing but the guard between them).
        sp, sv = by_node(mn, "sp"), by_node(mn, "sv")
        node = next(n for n in sp if len(sp[n]) >= 2 and sv.get(n))
        (me, peer), victim = sp[node][:2], sv[node][0]
        me_at, peer_at, victim_at = me["address"], peer["address"], victim["address"]
        gateway = guest_run("", me_at, "ip route show default").split()[2]
        ping = f"ping -c 3 -W 2 {peer_at} >/dev/null 2>&1; echo done"
        # Control: from its own address and MAC, its pings reach the peer.
        before = echoes(peer_at)
        guest_run("", me_at, ping)
        assert echoes(peer_at) >= before + 3
        before_refused = refused(mn, "sp", me["name"])

        # The victim's address as source (the guest keeps its own too, to
        # answer the test).
        before = echoes(peer_at)
        guest_run("", me_at, f"ip addr add {victim_at}/32 dev eth0; "
                             f"ping -c 3 -W 2 -I {victim_at} {peer_at} >/dev/null 2>&1; "
                             f"ip addr del {victim_at}/32 dev eth0")
        assert echoes(peer_at) == before, "pings from a stolen address reached the peer"

        # Another MAC: the link goes down and up for it (which empties the
        # guest's ARP cache: it must ask again, with the new MAC), then back.
        own_mac = guest_mac(me_at)
        guest_run("", me_at, "; ".join([
            "ip link set eth0 down", "ip link set eth0 address 02:00:de:ad:be:ef",
            "ip link set eth0 up", f"ip route replace default via {gateway}", ping,
            "ip link set eth0 down", f"ip link set eth0 address {own_mac}",
            "ip link set eth0 up", f"ip route replace default via {gateway}"]), timeout=40)
        assert echoes(peer_at) == before, "pings from another MAC reached the peer"

        # A gratuitous ARP claiming the victim's address: the peer, which
        # knows the victim (its ping is refused by the policy, its ARP
        # query answered), keeps the victim's own MAC.
        guest_run("", peer_at, f"ping -c 1 -W 1 {victim_at} >/dev/null 2>&1; echo done")
        assert neighbour_mac(peer_at, victim_at) == guest_mac(victim_at)
        guest_run("", me_at, f"ip addr add {victim_at}/32 dev eth0; "
                             f"arping -U -c 3 -w 4 -I eth0 -s {victim_at} {victim_at}; "
                             f"ip addr del {victim_at}/32 dev eth0")
        assert neighbour_mac(peer_at, victim_at) == guest_mac(victim_at)

        # Still itself and reachable; the refusals counted and shown.
        target = f"{peer_at}:80"
        assert connects(me_at, [target]) == {target: True}
        assert guest_run("", victim_at, "echo alive").strip() == "alive"
        wait_until(lambda: refused(mn, "sp", me["name"]) >= before_refused + 3, 30, 0.5,
                   what="the guest's refused packets in sodactl service get")
        table = mn.ctl("service", "get", "sp").stdout
        assert "DROPPED" in table, table
    finally:
        for name in ("sp", "sv"):
            mn.ctl("service", "delete", name, "--wait", "--timeout", "120", check=False)
