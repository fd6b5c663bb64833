"""Host routes to other nodes' guest subnets (soda.routing), without root:
the routes a node list calls for, the problems, and sync against a fake
routing table; the follower of the Master's node list; the `routes`
setting of the Agent and the Switch."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from soda.agent.main import build_config as agent_config, parse_args as agent_args
from soda.backoff import Backoff
from soda.errors import InvalidSpec, Unavailable, WrongState
from soda.model.spec import Resources
from soda.model.state import Node
from soda.routing import (HostRoute, HostRoutes, Reach, RouteFollower, TableRoute, desired_routes,
                          reach_problem)
from soda.switch.main import (SwitchConfig, build_config as switch_config,
                              parse_args as switch_args, route_follower)

CAPACITY = Resources(cpu=2, memory=1024, bandwidth=1000, disk=4096)
NOT_ON_SEGMENT = ("not on a network this host is attached to; SODA routes guest subnets only "
                  "between hosts on one L2 segment (host-gw)")


def node(name, address, subnet, state="READY"):
    return Node(name=name, address=address, capacity=CAPACITY, hypervisors=("fake",),
                subnet=subnet, state=state)


N1 = node("n1", "192.0.2.1", "10.233.1.0/24")
N2 = node("n2", "192.0.2.2", "10.233.2.0/24")
N3 = node("n3", "192.0.2.3", "10.233.3.0/24")


class FakeTable:
    """A main routing table: routes by subnet, how each address is reached,
    and the kernel's refusals, by subnet."""

    def __init__(self, reach=None, others=()):
        self.ours: dict[str, str] = {}
        self.others = {subnet: gateway for subnet, gateway in others}
        self.reaches = dict(reach or {})
        self.refuse: dict[str, Exception] = {}
        self.list_error: Exception | None = None
        self.lookup_errors: dict[str, Exception] = {}
        self.calls: list[tuple] = []
        self.closed = False

    def routes(self):
        if self.list_error:
            raise self.list_error
        return ([TableRoute(s, g, True) for s, g in self.ours.items()]
                + [TableRoute(s, g, False) for s, g in self.others.items()])

    def reach(self, address):
        if address in self.lookup_errors:
            raise self.lookup_errors[address]
        return self.reaches.get(address, Reach.NEIGHBOUR)

    def replace(self, subnet, gateway):
        self.calls.append(("replace", subnet, gateway))
        if subnet in self.refuse:
            raise self.refuse[subnet]
        self.ours[subnet] = gateway

    def delete(self, subnet, gateway):
        self.calls.append(("delete", subnet, gateway))
        if subnet in self.refuse:
            raise self.refuse[subnet]
        self.ours.pop(subnet, None)

    def close(self):
        self.closed = True


# ---- the routes a node list calls for -----------------------------------------------

def test_every_other_node_with_a_subnet_and_an_address_is_routed_via_its_address():
    nodes = [N3, N1, N2, node("bare", "192.0.2.9", ""), node("nowhere", "", "10.233.9.0/24"),
             node("lost", "192.0.2.4", "10.233.4.0/24", state="LOST")]
    routes, problems = desired_routes(nodes, own_node="n1")
    assert problems == []
    # Sorted by node; a LOST node keeps its route (it may come back with its guests).
    assert routes == [HostRoute("lost", "10.233.4.0/24", "192.0.2.4"),
                      HostRoute("n2", "10.233.2.0/24", "192.0.2.2"),
                      HostRoute("n3", "10.233.3.0/24", "192.0.2.3")]


def test_a_host_that_is_no_node_routes_every_node():
    routes, _ = desired_routes([N1, N2], own_node="")
    assert [r.node for r in routes] == ["n1", "n2"]


def test_a_one_host_cluster_on_loopback_addresses_is_not_routed(caplog):
    nodes = [node(f"n{i}", f"127.0.1.{i}", f"10.233.{i}.0/24") for i in range(1, 4)]
    nodes.append(node("v6", "::1", "fd00:233:1::/64"))
    with caplog.at_level(logging.DEBUG, logger="soda.routing"):
        assert desired_routes(nodes, own_node="n1") == ([], [])
    assert "node n2 (127.0.1.2): loopback address, its subnet 10.233.2.0/24 is not routed" in caplog.text


def test_addresses_that_cannot_route_a_subnet_are_problems():
    nodes = [node("named", "host.example", "10.233.1.0/24"), node("v6", "2001:db8::2", "10.233.2.0/24"),
             node("a", "192.0.2.5", "10.233.5.0/24"), node("b", "192.0.2.6", "10.233.5.0/24"), N3]
    routes, problems = desired_routes(nodes)
    assert routes == [HostRoute("n3", "10.233.3.0/24", "192.0.2.3")]
    assert problems == [
        "node b: subnet 10.233.5.0/24 is node a's too; neither is routed",
        "node named (host.example): its address is not an IP address; SODA routes guest subnets "
        "via node addresses",
        "node v6 (2001:db8::2): an IPv6 address cannot route its IPv4 subnet 10.233.2.0/24"]


def test_a_gateway_off_this_hosts_networks_is_named_with_the_host_gw_rule():
    route = HostRoute("n2", "10.233.2.0/24", "10.1.2.3")
    assert reach_problem(route, Reach.NEIGHBOUR) == ""
    for reach in (Reach.VIA_GATEWAY, Reach.UNREACHABLE):
        assert reach_problem(route, reach) == f"node n2 (10.1.2.3): {NOT_ON_SEGMENT}"


# ---- sync against a routing table -----------------------------------------------------

def test_sync_adds_moves_and_removes_only_its_own_routes_and_is_idempotent():
    table = FakeTable(others=[("10.0.0.0/8", "192.0.2.254")])
    routes = HostRoutes(own_node="n1", table=table)
    assert routes.sync([N1, N2, N3]) == []
    assert table.ours == {"10.233.2.0/24": "192.0.2.2", "10.233.3.0/24": "192.0.2.3"}
    table.calls.clear()
    assert routes.sync([N1, N2, N3]) == [] and table.calls == []            # nothing to do
    moved = node("n2", "192.0.2.22", "10.233.2.0/24")
    assert routes.sync([N1, moved, N3]) == []
    assert table.calls == [("replace", "10.233.2.0/24", "192.0.2.22")]      # replaced in place
    table.calls.clear()
    assert routes.sync([N1, moved]) == []
    assert table.calls == [("delete", "10.233.3.0/24", "192.0.2.3")]
    assert table.ours == {"10.233.2.0/24": "192.0.2.22"}
    assert table.others == {"10.0.0.0/8": "192.0.2.254"}                    # never touched
    routes.clear()
    assert table.ours == {} and table.others == {"10.0.0.0/8": "192.0.2.254"}


def test_a_subnet_this_host_reaches_by_another_route_is_left_to_it():
    # A local node's uplink holds 10.233.2.0/24: its connected route serves it.
    table = FakeTable(others=[("10.233.2.0/24", "")])
    table.ours["10.233.2.0/24"] = "192.0.2.2"           # ours from before the uplink came
    routes = HostRoutes(table=table)
    assert routes.sync([N2, N3]) == []
    assert table.ours == {"10.233.3.0/24": "192.0.2.3"}
    assert table.others == {"10.233.2.0/24": ""}
    assert ("replace", "10.233.2.0/24", "192.0.2.2") not in table.calls


def test_a_node_whose_address_is_this_hosts_own_is_not_routed():
    table = FakeTable(reach={"192.0.2.2": Reach.LOCAL})
    assert HostRoutes(table=table).sync([N2, N3]) == []
    assert table.ours == {"10.233.3.0/24": "192.0.2.3"}


def test_a_gateway_that_is_no_neighbour_installs_nothing_and_is_a_problem():
    table = FakeTable(reach={"10.1.2.3": Reach.VIA_GATEWAY, "10.9.9.9": Reach.UNREACHABLE})
    routes = HostRoutes(table=table)
    far = node("n2", "10.1.2.3", "10.233.2.0/24")
    nowhere = node("n4", "10.9.9.9", "10.233.4.0/24")
    assert routes.sync([far, N3, nowhere]) == [f"node n2 (10.1.2.3): {NOT_ON_SEGMENT}",
                                               f"node n4 (10.9.9.9): {NOT_ON_SEGMENT}"]
    assert table.ours == {"10.233.3.0/24": "192.0.2.3"}
    assert routes.problems == [f"node n2 (10.1.2.3): {NOT_ON_SEGMENT}",
                               f"node n4 (10.9.9.9): {NOT_ON_SEGMENT}"]
    # A node that moves off the segment loses the route it had.
    assert routes.sync([node("n3", "10.1.2.3", "10.233.3.0/24")]) == [
        f"node n3 (10.1.2.3): {NOT_ON_SEGMENT}"]
    assert table.ours == {}


def test_a_route_the_kernel_refuses_is_a_problem_and_the_others_still_go_in():
    table = FakeTable()
    table.refuse["10.233.2.0/24"] = WrongState("the kernel refused the route 10.233.2.0/24 via "
                                               "192.0.2.2: Operation not permitted")
    problems = HostRoutes(table=table).sync([N1, N2, N3])
    assert problems == ["node n2: cannot route 10.233.2.0/24 via 192.0.2.2: the kernel refused the "
                        "route 10.233.2.0/24 via 192.0.2.2: Operation not permitted"]
    assert table.ours == {"10.233.1.0/24": "192.0.2.1", "10.233.3.0/24": "192.0.2.3"}


def test_a_routing_table_that_cannot_be_read_or_looked_up_is_a_problem_not_an_exception():
    table = FakeTable()
    routes = HostRoutes(table=table)
    routes.sync([N2, N3])
    table.list_error = Unavailable("cannot list the routing table: No buffer space available")
    assert routes.sync([N3]) == ["cannot read the routing table: cannot list the routing table: "
                                 "No buffer space available"]
    assert table.ours == {"10.233.2.0/24": "192.0.2.2", "10.233.3.0/24": "192.0.2.3"}
    table.list_error = None
    # A gateway that cannot be looked up now keeps the route it has.
    table.lookup_errors["192.0.2.2"] = Unavailable("no buffer space")
    assert routes.sync([N2, N3]) == ["node n2 (192.0.2.2): cannot look up the route to it: "
                                     "no buffer space"]
    assert table.ours == {"10.233.2.0/24": "192.0.2.2", "10.233.3.0/24": "192.0.2.3"}


def test_each_problem_is_logged_once_while_it_lasts(caplog):
    table = FakeTable(reach={"10.1.2.3": Reach.VIA_GATEWAY})
    routes = HostRoutes(table=table)
    far = node("n2", "10.1.2.3", "10.233.2.0/24")
    with caplog.at_level(logging.INFO, logger="soda.routing"):
        for _ in range(3):
            routes.sync([far, N3])
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
            f"node n2 (10.1.2.3): {NOT_ON_SEGMENT}"]
        routes.sync([N3])                                    # it left: the problem ended
        assert f"resolved: node n2 (10.1.2.3): {NOT_ON_SEGMENT}" in caplog.text
        caplog.clear()
        routes.sync([far, N3])                               # back: said again
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
            f"node n2 (10.1.2.3): {NOT_ON_SEGMENT}"]


def test_a_one_host_cluster_leaves_the_table_alone():
    table = FakeTable()
    nodes = [node(f"n{i}", f"127.0.1.{i}", f"10.233.{i}.0/24") for i in range(1, 4)]
    assert HostRoutes(own_node="n1", table=table).sync(nodes) == []
    assert table.calls == [] and table.ours == {}


# ---- following the Master's node list --------------------------------------------------

class NodeWatchMaster:
    """watch_nodes(): the node sets of `streams`, one stream per call; a
    stream ends with an error, and the last one stays open until close()."""

    def __init__(self, *streams):
        self.streams = list(streams)
        self.watches = 0
        self.closed = threading.Event()

    def watch_nodes(self):
        self.watches += 1
        if not self.streams:
            self.closed.wait()
            return
        stream = self.streams.pop(0)
        yield from stream
        if self.streams:
            raise Unavailable("cannot reach the SODA Master at 127.0.0.1:1")
        self.closed.wait()

    def close(self):
        self.closed.set()


def wait_for(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in time"
        time.sleep(0.01)


def test_the_follower_syncs_every_node_set_and_watches_again_after_an_error(caplog):
    table = FakeTable()
    master = NodeWatchMaster([[N1, N2, N3], [N1, N2]], [[N1, N3]])
    follower = RouteFollower(master, HostRoutes(own_node="n1", table=table),
                             backoff=Backoff(0.01, 0.05, jitter=0))
    with caplog.at_level(logging.INFO, logger="soda.routing"):
        follower.start()
        try:
            wait_for(lambda: follower.syncs == 3, what="three node sets")
            assert table.ours == {"10.233.3.0/24": "192.0.2.3"}
            assert master.watches == 2
        finally:
            follower.stop()
    assert "node watch: cannot reach the SODA Master at 127.0.0.1:1; the host routes stay" in caplog.text
    assert "following the Master's node list again" in caplog.text
    # Stopping closed the client and left the routes in place.
    assert master.closed.is_set() and table.ours == {"10.233.3.0/24": "192.0.2.3"}
    assert not table.closed


def test_a_follower_whose_sync_raises_keeps_following(caplog):
    class Broken(HostRoutes):
        def __init__(self):
            super().__init__(table=FakeTable())
            self.calls = 0

        def sync(self, nodes):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("a bug")
            return super().sync(nodes)

    routes = Broken()
    master = NodeWatchMaster([[N2]], [[N3]])
    follower = RouteFollower(master, routes, backoff=Backoff(0.01, 0.05, jitter=0))
    follower.start()
    try:
        wait_for(lambda: routes.calls == 2, what="a second sync")
    finally:
        follower.stop()
    assert "node watch for the host routes failed" in caplog.text


# ---- the routes setting -------------------------------------------------------------------

def test_the_agent_routes_unless_told_not_to(tmp_path):
    assert agent_config(agent_args([])).routes is True
    assert agent_config(agent_args(["--no-routes"])).routes is False
    path = tmp_path / "agent.yaml"
    path.write_text("routes: false\n")
    assert agent_config(agent_args(["--config", str(path)])).routes is False
    path.write_text("routes: maybe\n")
    with pytest.raises(InvalidSpec, match="routes: expected bool"):
        agent_config(agent_args(["--config", str(path)]))


def test_the_switch_routes_unless_told_not_to(tmp_path):
    assert switch_config(switch_args([])).routes is True
    assert switch_config(switch_args(["--no-routes"])).routes is False
    path = tmp_path / "switch.yaml"
    path.write_text("routes: false\n")
    config = switch_config(switch_args(["--config", str(path)]))
    assert config.routes is False and route_follower(config) is None
    follower = route_follower(SwitchConfig(master="127.0.0.1:1"))
    try:
        assert isinstance(follower, RouteFollower) and follower.routes.own_node == ""
    finally:
        follower.client.close()
        follower.routes.close()
