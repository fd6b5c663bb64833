"""Several physical nodes, each a network namespace acting as a host on a
fabric, with real UML guests: a service spreads over them and is answered
across hosts through the Switch (routes from each host's watch of the node
list), a node lost under a client loop is replaced and, when it comes
back, stops its old guests before it is READY again; a drain moves every
virtual node off a node without failing a request. What is checked is
read from `ip route` in each namespace, /proc, HTTP answers and sodactl."""

import collections
import time

import pytest

from tests.system.cluster import wait_until
from tests.system.guests import require_guest_support
from tests.system.multinode import ClientLoop, MultiNode, fabric_config, get, wait_healthy
from tests.support import reachable_tmp_dir

pytestmark = [pytest.mark.cluster, pytest.mark.root, pytest.mark.guest]

require_guest_support()

NODE_LOST_SECONDS = 4.0


@pytest.fixture(scope="module")
def mn(rootfs):
    with reachable_tmp_dir("soda-test-multinode-") as state_dir:
        config = fabric_config(state_dir, nodes=3, node_lost_seconds=NODE_LOST_SECONDS)
        with MultiNode(config) as cluster:
            cluster.push(rootfs)
            yield cluster


def test_a_service_spreads_over_the_hosts_and_is_answered_across_them(mn):
    port = mn.create("web", [0.25, 0.5] * 3)
    try:
        placement = mn.placement("web")
        assert sorted(collections.Counter(placement.values()).values()) == [2, 2, 2], placement
        nodes = mn.nodes()
        hosts = mn.layout.hosts
        # Every host routes the other hosts' guest subnets via their fabric
        # addresses, and so does the Switch's (the root namespace).
        for host in hosts:
            wanted = {nodes[h.name]["subnet"]: h.address for h in hosts if h is not host}
            assert wanted.items() <= mn.routes(host.netns).items(), (host.netns, mn.routes(host.netns))
        assert {nodes[h.name]["subnet"]: h.address for h in hosts}.items() <= mn.routes().items()
        # 300 requests, answered by all 6 in proportion to their CPU (1:2).
        answers = collections.Counter(get(port) for _ in range(300))
        weights = {v["name"]: v["weight"] for v in mn.vnodes("web")}
        total = sum(weights.values())
        for vnode, weight in weights.items():
            expected = 300 * weight / total
            assert abs(answers[vnode] - expected) <= max(4, 0.15 * expected), (answers, weights)
    finally:
        mn.delete("web")


def test_a_lost_node_is_replaced_and_fenced_when_it_comes_back(mn):
    port = mn.create("loss", [0.25] * 6)
    victim = mn.layout.host(2)
    others = {h.name for h in mn.layout.hosts if h is not victim}
    try:
        before = mn.placement("loss")
        moved = sorted(v for v, node in before.items() if node == victim.name)
        assert len(moved) == 2, before
        old_guests = mn.guest_processes(2)
        assert set(moved) <= set(old_guests)
        with ClientLoop(port) as loop:
            time.sleep(1.0)
            lost_at = time.monotonic()
            mn.cluster.lose_host(2)
            wait_until(lambda: mn.all_running_on("loss", 6, others), NODE_LOST_SECONDS + 5, 0.1,
                       what="the lost node's virtual nodes running elsewhere")
            recovered = time.monotonic() - lost_at
            wait_healthy(mn, "loss", 30)
            time.sleep(1.0)
        assert mn.nodes()[victim.name]["state"] == "LOST"
        # Its virtual nodes are elsewhere, in other subnets; the Switch
        # retries what a dead node took, so at most the one request in
        # flight on it when it went fails.
        assert recovered <= NODE_LOST_SECONDS + 5
        assert len(loop.failures) <= 1, loop.failures
        assert all(lost_at <= t for t, _ in loop.failures)
        # `service get` says where each went and why: the moved ones, and only they.
        records = {v["name"]: v["last_move"] for v in mn.vnodes("loss")}
        assert sorted(name for name, m in records.items() if m) == moved, records
        assert all(records[name]["from_node"] == victim.name
                   and records[name]["why"].startswith(f"node {victim.name} lost: no heartbeat for")
                   for name in moved)
        section = mn.ctl("service", "get", "loss").stdout.split("Moved:\n", 1)[1].split("\n\n", 1)[0]
        rows = [row.split() for row in section.splitlines()[1:]]
        assert sorted(row[0] for row in rows) == moved, section
        assert all(row[1] in others and row[2] == victim.name for row in rows), section
        # Cut off, its guests still run: it is a partitioned host, not a dead one.
        assert all(pid.matches() for pid in old_guests.values())

        # Back: READY only once its old guests are gone.
        seen = {}

        def old_alive_when_ready():
            node = mn.nodes()[victim.name]
            if node["state"] == "READY":
                seen["alive"] = [name for name, pid in old_guests.items() if pid.matches()]
                return True
            return False
        mn.cluster.restore_host(2)     # returns once the node is READY
        wait_until(old_alive_when_ready, 10, 0.05, what="the node READY again")
        assert seen["alive"] == []
        assert not any(pid.matches() for pid in old_guests.values())
        # Nothing of the service is on it, and every answer comes from the others.
        assert victim.name not in mn.placement("loss").values()
        assert len({get(port) for _ in range(60)}) == 6
    finally:
        mn.delete("loss")


def test_a_drain_moves_every_virtual_node_off_without_a_failed_request(mn):
    port = mn.create("drain", [0.25] * 4)
    victim = next(h for h in mn.layout.hosts if h.name in mn.placement("drain").values())
    try:
        with ClientLoop(port) as loop:
            time.sleep(1.0)
            mn.ctl("node", "drain", victim.name, "--wait", "--timeout", "300")
            time.sleep(1.0)
        assert loop.failures == []
        assert loop.sent > 20
        placement = mn.placement("drain")
        assert len(placement) == 4 and victim.name not in placement.values(), placement
        assert mn.all_running_on("drain", 4, {h.name for h in mn.layout.hosts if h is not victim})
        assert mn.nodes()[victim.name]["draining"] is True
        mn.ctl("node", "undrain", victim.name)
        assert mn.nodes()[victim.name]["draining"] is False
    finally:
        mn.delete("drain")
