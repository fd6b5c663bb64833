"""Node drain in the Controller, with an injected clock: the dry run that
refuses a drain without room, one move at a time per draining node, a
replacement ready (RUNNING, healthy at the Switch) before the old virtual
node leaves, undrain, placements that avoid a draining node, and a Master
restarted mid-drain that carries on."""

import pytest

from soda import model
from soda.errors import NoCapacity, NotFound
from soda.master.controller import NODES_TOPIC, SERVICES_TOPIC, moves_of
from soda.master.switches import STALE_SECONDS
from tests.unit.test_controller import CAP, make_controller, setup  # noqa: F401 - setup: the fixture

RUNNING = model.Phase.RUNNING


def spec(name="web", nodes=4, cpu=0.5, **extra):
    return model.parse_spec({"name": name, "image": "busybox", "nodes": nodes, "resources": {"cpu": cpu},
                             **extra})


def heartbeat(ctl, *only, phase=RUNNING):
    """Every READY node's Agent (or those named) runs what it is assigned
    and says so; what it no longer has is gone."""
    for n in ctl.list_nodes():
        if n.state == "READY" and (not only or n.name in only):
            ctl.report_status(n.name, [model.VirtualNodeStatus(v.name, phase, generation=v.generation)
                                       for v in ctl.assignments(n.name).values()], complete=True)


def placed(ctl, service="web"):
    """vnode -> node of the live virtual nodes."""
    return {v.name: v.node for v in ctl.get_service(service).vnodes if not v.deleting}


def on(ctl, node, service="web"):
    return sorted(name for name, where in placed(ctl, service).items() if where == node)


@pytest.fixture
def crowded(setup):
    """web: 4 virtual nodes on a and b; c registered afterwards, empty."""
    ctl, clock, tmp_path = setup
    ctl.create_service(spec())
    heartbeat(ctl)
    ctl.register_node("c", "127.0.0.3", CAP, ["fake"])
    assert len(on(ctl, "a")) == 2 and len(on(ctl, "b")) == 2
    return ctl, clock, tmp_path


def drain_until_done(ctl, node, passes=30):
    for _ in range(passes):
        ctl.check_membership()
        heartbeat(ctl)
        if not any(n.vnodes for n in ctl.list_nodes() if n.name == node):
            return
    raise AssertionError(f"{node} still holds virtual nodes: {ctl.get_service('web').vnodes}")


def test_an_unknown_node_is_not_found(setup):
    ctl, _, _ = setup
    for call in (ctl.drain_node, ctl.undrain_node):
        with pytest.raises(NotFound, match="no physical node named 'nope'"):
            call("nope")


def test_a_drain_without_room_is_refused_naming_the_resource(setup):
    ctl, _, _ = setup
    ctl.create_service(spec(nodes=2, cpu=1.5))          # a and b: 0.5 cores free each
    with pytest.raises(NoCapacity, match=r"cannot drain node a: not enough cpu: web-\d needs 1.5") as exc:
        ctl.drain_node("a")
    assert exc.value.resource == "cpu"
    assert not any(n.draining for n in ctl.list_nodes())
    # Nowhere to go at all: the other node drains already.
    ctl.delete_service("web")
    heartbeat(ctl)
    ctl.create_service(spec(nodes=1, cpu=0.5))
    ctl.drain_node(placed(ctl)["web-0"])
    other = "b" if placed(ctl)["web-0"] == "a" else "a"
    heartbeat(ctl)
    ctl.check_membership()
    heartbeat(ctl)
    ctl.check_membership()
    with pytest.raises(NoCapacity, match="no other READY node that is not draining") as exc:
        ctl.drain_node(other)
    assert exc.value.resource == "nodes"


def test_the_dry_run_counts_what_other_draining_nodes_still_hold(setup):
    ctl, _, _ = setup
    ctl.register_node("c", "127.0.0.3", CAP, ["fake"])
    ctl.create_service(spec(nodes=3, cpu=1.0))          # one core on each of a, b, c
    ctl.drain_node("a")                                 # its core fits on b or c
    # b's core would fit on c alone, but not with a's still to come.
    with pytest.raises(NoCapacity, match="not enough cpu"):
        ctl.drain_node("b")


def test_drain_moves_one_at_a_time_and_ends_with_everything_elsewhere(crowded):
    ctl, _, _ = crowded
    seen = ctl.notifier.revision(NODES_TOPIC), ctl.notifier.revision(SERVICES_TOPIC)
    drained = ctl.drain_node("a")
    assert drained.draining and drained.name == "a"
    assert ctl.notifier.revision(NODES_TOPIC) > seen[0] and ctl.notifier.revision(SERVICES_TOPIC) > seen[1]
    assert ctl.drain_node("a").draining                  # again: nothing changes
    before = on(ctl, "a")
    ctl.check_membership()
    svc = ctl.get_service("web")
    live = [v for v in svc.vnodes if not v.deleting]
    assert len(live) == 5 and svc.spec.nodes == 4        # one replacement, the old one still runs
    [new] = [v for v in live if v.name not in {"web-0", "web-1", "web-2", "web-3"}]
    assert new.name == "web-4" and new.node == "c"       # the next index, on the emptiest node
    [old] = [v for v in live if v.node == "a" and v.reason.startswith("node a is draining: moving")]
    assert "web-4 on c" in old.reason and new.reason == f"replaces {old.name} (node a is draining)"
    [other] = [name for name in before if name != old.name]
    assert "waiting for its turn" in {v.name: v.reason for v in live}[other]
    # Nothing more starts, and the old one stays, while the replacement does not run.
    for _ in range(3):
        ctl.check_membership()
        heartbeat(ctl, "a", "b")
    assert len([v for v in ctl.get_service("web").vnodes if not v.deleting]) == 5
    assert not any(v.deleting for v in ctl.get_service("web").vnodes)
    heartbeat(ctl, "c")                                   # web-4 RUNNING
    ctl.check_membership()
    leaving = {v.name for v in ctl.get_service("web").vnodes if v.deleting}
    assert leaving == {old.name}
    assert old.name not in ctl.assignments("a")           # no Switch holds it: it stops
    drain_until_done(ctl, "a")
    svc = ctl.get_service("web")
    assert len(svc.vnodes) == 4 and svc.spec.nodes == 4
    assert all(v.node in ("b", "c") and v.phase == RUNNING and not v.deleting for v in svc.vnodes)
    assert {v.name for v in svc.vnodes} == {"web-4", "web-5"} | (set(before) ^ {"web-0", "web-1", "web-2",
                                                                                 "web-3"})
    # The node shows as drained: draining, holding nothing; it may go now.
    [a] = [n for n in ctl.list_nodes() if n.name == "a"]
    assert a.draining and a.vnodes == 0
    assert all(not v.reason for v in svc.vnodes)          # the notes went with the moves
    # What lasts: each replacement says whom it replaced, from where, why.
    moves = {v.name: v.last_move for v in svc.vnodes if v.last_move}
    assert sorted(moves) == ["web-4", "web-5"]
    assert moves["web-4"].from_node == "a" and moves["web-4"].why == f"replaces {old.name}: node a is draining"
    assert moves["web-5"].why == f"replaces {other}: node a is draining"
    ctl.remove_node("a")


def test_per_node_resources_follow_the_moved_virtual_nodes(setup):
    ctl, _, _ = setup
    ctl.create_service(model.parse_spec({"name": "web", "image": "busybox", "nodes": 2,
                                         "resources": {"cpu": [0.5, 1.0]}}))
    heartbeat(ctl)
    ctl.register_node("c", "127.0.0.3", CAP, ["fake"])
    where = placed(ctl)
    ctl.drain_node(where["web-0"])
    drain_until_done(ctl, where["web-0"])
    svc = ctl.get_service("web")
    live = sorted((v for v in svc.vnodes if not v.deleting), key=lambda v: v.index)
    assert [v.name for v in live] == ["web-1", "web-2"]
    assert [v.resources.cpu for v in live] == [1.0, 0.5]
    # The spec's per-node list is in the order a resize applies it.
    assert [r.cpu for r in svc.spec.resources] == [1.0, 0.5]


def test_the_old_virtual_node_leaves_once_the_switch_finds_the_new_one_healthy(crowded):
    ctl, clock, _ = crowded
    ctl.drain_node("a")
    ctl.check_membership()
    [old] = [v for v in ctl.get_service("web").vnodes if "moving" in v.reason]

    def report(**health):
        names = sorted(placed(ctl))
        ctl.report_switch(model.SwitchReport(switch="sw", services=(model.SwitchServiceStats(
            service="web", vnodes=tuple(model.SwitchVnodeStats(vnode=n, routable=n in health or n != "web-4",
                                                               healthy=health.get(n, True))
                                        for n in names if n != "web-4" or n in health)),)))

    report()                                   # the Switch knows web, not web-4 yet
    heartbeat(ctl, "c")                        # web-4 RUNNING
    ctl.check_membership()
    assert "waiting for a Switch to report it healthy" in {v.name: v.reason
                                                           for v in ctl.get_service("web").vnodes}[old.name]
    # Healthy: it must stay so for fall checks (2 x 2 s) and one report more (2 s).
    report(**{"web-4": True})
    ctl.check_membership()
    assert not any(v.deleting for v in ctl.get_service("web").vnodes)
    assert "waiting for the Switch's health checks" in {
        v.name: v.reason for v in ctl.get_service("web").vnodes}[old.name]
    clock.now += 5
    report(**{"web-4": True})
    ctl.check_membership()
    assert not any(v.deleting for v in ctl.get_service("web").vnodes)
    clock.now += 1
    report(**{"web-4": True})
    ctl.check_membership()
    assert {v.name for v in ctl.get_service("web").vnodes if v.deleting} == {old.name}
    # The Switch drains it: its guest runs on until the Switch lets go.
    assert old.name in ctl.assignments("a")


def test_an_unhealthy_replacement_never_replaces_a_healthy_virtual_node(crowded):
    ctl, clock, _ = crowded
    ctl.drain_node("a")
    ctl.check_membership()
    heartbeat(ctl, "c")
    [old] = [v for v in ctl.get_service("web").vnodes if "moving" in v.reason]
    for _ in range(4):
        heartbeat(ctl)
        ctl.report_switch(model.SwitchReport(switch="sw", services=(model.SwitchServiceStats(
            service="web", vnodes=tuple(model.SwitchVnodeStats(vnode=n, routable=True, healthy=n != "web-4")
                                        for n in sorted(placed(ctl)))),)))
        ctl.check_membership()
        clock.now += STALE_SECONDS
    svc = ctl.get_service("web")
    assert not any(v.deleting for v in svc.vnodes)
    assert "fails the Switch's health checks" in {v.name: v.reason for v in svc.vnodes}[old.name]


def test_a_replacement_no_switch_reports_is_waited_for_a_bounded_time(crowded):
    ctl, clock, _ = crowded
    ctl.drain_node("a")
    ctl.check_membership()
    heartbeat(ctl, "c")

    def report():                              # a Switch that never hears of web-4
        ctl.report_switch(model.SwitchReport(switch="sw", services=(model.SwitchServiceStats(
            service="web", vnodes=tuple(model.SwitchVnodeStats(vnode=n, routable=True, healthy=True)
                                        for n in sorted(placed(ctl)) if n != "web-4")),)))
    report()
    ctl.check_membership()
    assert not any(v.deleting for v in ctl.get_service("web").vnodes)
    clock.now += STALE_SECONDS + 5             # + fall x (interval + timeout) + a report, but 1 s
    heartbeat(ctl)
    report()
    ctl.check_membership()
    assert not any(v.deleting for v in ctl.get_service("web").vnodes)
    clock.now += 1
    report()
    ctl.check_membership()
    assert len([v for v in ctl.get_service("web").vnodes if v.deleting]) == 1


def test_undrain_gives_up_the_move_in_flight_and_keeps_those_done(crowded):
    ctl, _, _ = crowded
    ctl.drain_node("a")
    ctl.check_membership()
    heartbeat(ctl)
    ctl.check_membership()                      # the first move is done
    heartbeat(ctl)
    ctl.check_membership()                      # the second one is under way
    assert len(placed(ctl)) == 5
    assert len(on(ctl, "a")) == 1
    node = ctl.undrain_node("a")
    assert not node.draining
    svc = ctl.get_service("web")
    assert len(placed(ctl)) == 4 and svc.spec.nodes == 4
    assert [v.name for v in svc.vnodes if v.deleting] == ["web-5"]     # the replacement goes
    assert len(on(ctl, "a")) == 1                                      # the move done stays done
    assert ctl.undrain_node("a").draining is False                     # again: nothing changes
    heartbeat(ctl)
    ctl.check_membership()
    assert len(ctl.get_service("web").vnodes) == 4
    assert all(not v.reason for v in ctl.get_service("web").vnodes)


def test_new_placements_avoid_a_draining_node_and_resizes_in_place_still_work(crowded):
    ctl, _, _ = crowded
    ctl.drain_node("c")                         # empty: drained at once
    ctl.create_service(spec(name="api", nodes=2, cpu=0.25))
    assert "c" not in placed(ctl, "api").values()
    grown = ctl.resize_service("api", 3, [])
    assert "c" not in {v.node for v in grown.vnodes}
    ctl.undrain_node("c")
    ctl.drain_node("b")
    # The virtual nodes still on b grow in place there.
    name = on(ctl, "b")[0]
    resized = ctl.resize_service("web", None, [model.Resources(cpu=0.6, memory=64, bandwidth=100, disk=256)])
    assert {v.name: v.node for v in resized.vnodes if not v.deleting}[name] == "b"
    assert all(v.resources.cpu == 0.6 for v in resized.vnodes)


def test_nothing_is_placed_when_every_node_drains(setup):
    ctl, _, _ = setup
    ctl.drain_node("a")
    ctl.drain_node("b")
    with pytest.raises(NoCapacity, match="no ready physical node that is not draining: undrain one") as exc:
        ctl.create_service(spec(nodes=1))
    assert exc.value.resource == "nodes"


def test_a_resize_mid_move_gives_the_move_up_and_the_drain_starts_it_again(crowded):
    ctl, _, _ = crowded
    ctl.drain_node("a")
    ctl.check_membership()
    assert len(placed(ctl)) == 5
    resized = ctl.resize_service("web", 3, [])
    assert len([v for v in resized.vnodes if not v.deleting]) == 3 and resized.spec.nodes == 3
    drain_until_done(ctl, "a")
    svc = ctl.get_service("web")
    assert len(svc.vnodes) == 3 and all(v.node in ("b", "c") for v in svc.vnodes)


def test_no_room_mid_drain_keeps_the_virtual_node_and_says_why(crowded):
    ctl, _, _ = crowded
    ctl.drain_node("a")
    # Room elsewhere is taken before the first move starts.
    ctl.create_service(model.parse_spec({"name": "filler", "image": "busybox", "nodes": 2,
                                         "resources": {"cpu": [2.0, 1.0]}}))
    ctl.check_membership()
    ctl.check_membership()
    svc = ctl.get_service("web")
    assert len(placed(ctl)) == 4 and len(on(ctl, "a")) == 2
    reasons = [v.reason for v in svc.vnodes if v.node == "a"]
    assert any("waiting for room elsewhere: not enough cpu" in r for r in reasons), reasons
    ctl.delete_service("filler")
    heartbeat(ctl)
    drain_until_done(ctl, "a")
    assert len(ctl.get_service("web").vnodes) == 4


def test_a_master_restarted_mid_drain_carries_on(crowded):
    ctl, clock, tmp_path = crowded
    ctl.drain_node("a")
    ctl.check_membership()
    [new] = [v for v in ctl.get_service("web").vnodes if v.name == "web-4"]
    ctl.store.close()
    again = make_controller(str(tmp_path / "m"), clock)
    assert [n.name for n in again.list_nodes() if n.draining] == ["a"]
    assert moves_of(again.store.get_service("web"), {"a"})[0][0].new.name == new.name
    again.check_membership()                   # the same move, not a second one
    assert len(placed(again)) == 5
    heartbeat(again)
    again.check_membership()
    assert len([v for v in again.get_service("web").vnodes if v.deleting]) == 1
    drain_until_done(again, "a")
    svc = again.get_service("web")
    assert len(svc.vnodes) == 4 and not any(v.node == "a" for v in svc.vnodes)


def test_a_replacement_on_a_lost_node_is_not_placed_again_and_the_move_starts_over(crowded):
    ctl, clock, _ = crowded
    ctl.drain_node("a")
    ctl.check_membership()
    assert placed(ctl)["web-4"] == "c"
    clock.now += 11
    heartbeat(ctl, "a", "b")                    # c goes silent
    assert ctl.check_membership() == ["c"]
    # web-4 is not placed again: the old one runs on, and the drain
    # starts the move again, on b (the same index is free again).
    assert placed(ctl)["web-4"] == "b" and len(placed(ctl)) == 5
    assert {v.name: v.generation for v in ctl.get_service("web").vnodes}["web-4"] == 1   # a new one
    assert len(on(ctl, "a")) == 2


def test_a_draining_node_lost_mid_move_leaves_its_replacement_in_its_place(crowded):
    ctl, clock, _ = crowded
    ctl.drain_node("a")
    ctl.check_membership()
    [old] = [v for v in ctl.get_service("web").vnodes if "moving" in v.reason]
    clock.now += 11
    heartbeat(ctl, "b", "c")                    # a goes silent
    assert ctl.check_membership() == ["a"]
    # The old one is not placed again: web-4 stands in for it; a's other
    # one is placed again elsewhere, as any virtual node of a lost node.
    svc = ctl.get_service("web")
    assert old.name not in {v.name for v in svc.vnodes}
    assert len(svc.vnodes) == 4 and "web-4" in placed(ctl) and not on(ctl, "a")
