"""Usage accounting, hop by hop: the Daemon's figures as the Agent's
plumbing maps them, the heartbeat on the wire, the Master's memory of the
latest figures per virtual node and its sums per physical node."""

from __future__ import annotations

from dataclasses import replace

import pytest

from soda import model
from soda.model.state import DriverCapabilities
from soda.agent.network import NodeNetwork
from soda.agent.plumbing import GuestPlumbing, NodePlumbing
from soda.errors import NotFound, Unavailable
from soda.rpc import convert
from soda.model.usage import VnodeUsage
from tests.unit.test_controller import setup, spec  # noqa: F401  (fixture)

U1 = model.Usage(cpu_seconds=1.5, memory_bytes=10 << 20, memory_peak_bytes=12 << 20,
                 bytes_in=1000, bytes_out=2000, throttled_seconds=0.25, oom_kills=0)
U2 = model.Usage(cpu_seconds=3.0, memory_bytes=20 << 20, memory_peak_bytes=30 << 20,
                 bytes_in=10, bytes_out=20, throttled_seconds=0.0, oom_kills=2)


def test_usage_sums_and_total_of_nothing_is_unknown():
    assert U1 + U2 == model.Usage(4.5, 30 << 20, 42 << 20, 1010, 2020, 0.25, 2)
    assert model.Usage.total([U1, None, U2]) == U1 + U2
    assert model.Usage.total([None]) is None and model.Usage.total([]) is None


def test_usage_survives_the_wire_and_absence_stays_absent():
    status = model.VirtualNodeStatus("web-0", model.Phase.RUNNING, generation=3, usage=U1)
    assert convert.status_from_pb(convert.status_to_pb(status)) == status
    bare = model.VirtualNodeStatus("web-0", model.Phase.RUNNING)
    assert convert.status_from_pb(convert.status_to_pb(bare)).usage is None
    v = model.VirtualNode("web-0", "web", 0, model.Resources(), usage=U2)
    assert convert.vnode_from_pb(convert.vnode_to_pb(v)).usage == U2
    assert convert.vnode_from_pb(convert.vnode_to_pb(v)).last_move is None
    moved = replace(v, last_move=model.VnodeMove("b", 1_700_000_000.5, "node b lost: no heartbeat for 11 s"))
    assert convert.vnode_from_pb(convert.vnode_to_pb(moved)).last_move == moved.last_move
    n = model.Node("a", "127.0.0.1", model.Resources(), ("uml",), usage=U1)
    assert convert.node_from_pb(convert.node_to_pb(n)).usage == U1
    assert convert.node_from_pb(convert.node_to_pb(model.Node("a", "", model.Resources(), ()))).usage is None


class FakeDaemon:
    def __init__(self, answers):
        self.answers = answers

    def usage(self, name):
        answer = self.answers[name]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_node_plumbing_maps_the_daemons_usage():
    daemon = FakeDaemon({
        "web-0": VnodeUsage(name="web-0", cpu_seconds=1.5, cpu_throttled_seconds=0.25,
                            memory_bytes=10 << 20, memory_peak_bytes=12 << 20, oom_kills=0,
                            bytes_to_guest=1000, bytes_from_guest=2000, pids=7),
        "gone": NotFound("no such virtual node"),
        "down": Unavailable("daemon down"),
    })
    network = NodeNetwork.__new__(NodeNetwork)
    network.refused_packets = {"web-0": 5}.get            # the guard's and the policy's counters
    plumbing = NodePlumbing(network, daemon, {
        "uml": DriverCapabilities("uml", plumbing=True), "qemu": DriverCapabilities("qemu", plumbing=True),
        "fake": DriverCapabilities("fake")})
    assert plumbing.usage("web-0", "uml") == replace(U1, packets_refused=5)
    assert plumbing.usage("gone", "uml") is None
    assert plumbing.usage("down", "qemu") is None
    assert plumbing.usage("web-0", "fake") is None          # fake guests are not measured
    assert NodePlumbing(NodeNetwork.__new__(NodeNetwork), None,
                        {"uml": DriverCapabilities("uml", plumbing=True)}).usage("web-0", "uml") is None
    assert GuestPlumbing().usage("web-0", "uml") is None


def _running(ctl, node, *pairs, complete=True):
    statuses = [model.VirtualNodeStatus(v.name, model.Phase.RUNNING, generation=v.generation, usage=u)
                for v, u in pairs]
    ctl.report_status(node, statuses, complete=complete)


def test_master_keeps_latest_usage_per_vnode_and_sums_per_node(setup):  # noqa: F811
    ctl, clock, _ = setup
    svc = ctl.create_service(spec(nodes=2))
    by_node = {v.node: v for v in svc.vnodes}
    _running(ctl, "a", (by_node["a"], U1))
    _running(ctl, "b", (by_node["b"], U2))
    got = {v.node: v.usage for v in ctl.get_service("web").vnodes}
    assert got == {"a": U1, "b": U2}
    assert {n.name: n.usage for n in ctl.list_nodes()} == {"a": U1, "b": U2}
    assert [v.usage for v in ctl.list_services()[0].vnodes] == [got[v.node] for v in svc.vnodes]

    # The latest heartbeat wins; a phase report without usage keeps it.
    _running(ctl, "a", (by_node["a"], U2))
    ctl.report_status("a", [model.VirtualNodeStatus(by_node["a"].name, model.Phase.RUNNING,
                                                    generation=by_node["a"].generation)],
                      complete=False)
    assert {v.node: v.usage for v in ctl.get_service("web").vnodes}["a"] == U2
    # A heartbeat that no longer measures it forgets it.
    _running(ctl, "a", (by_node["a"], None))
    assert {v.node: v.usage for v in ctl.get_service("web").vnodes}["a"] is None
    assert {n.name: n.usage for n in ctl.list_nodes()}["a"] is None


def test_node_usage_sums_its_vnodes(setup):  # noqa: F811
    ctl, clock, _ = setup
    ctl.register_node("a", "127.0.0.1", model.Resources(cpu=4, memory=4096, bandwidth=1000, disk=10240),
                      ["fake"])
    svc = ctl.create_service(model.parse_spec({"name": "web", "image": "busybox", "nodes": 4,
                                               "resources": {"cpu": 0.25}}))
    on_a = [v for v in svc.vnodes if v.node == "a"]
    assert len(on_a) >= 2
    _running(ctl, "a", (on_a[0], U1), (on_a[1], U2))
    nodes = {n.name: n for n in ctl.list_nodes()}
    assert nodes["a"].usage == U1 + U2
    # Usage never goes to the store: a new Master knows none until a heartbeat.
    assert all(v.usage is None for v in ctl.store.list_vnodes())


def test_usage_of_unknown_vnodes_is_ignored(setup):  # noqa: F811
    ctl, clock, _ = setup
    ctl.report_status("a", [model.VirtualNodeStatus("ghost-0", model.Phase.RUNNING, usage=U1)],
                      complete=True)
    assert ctl._usage == {}
