"""The warm pool of an on-demand service, the Master's side: created idle it
boots `warm` frozen virtual nodes; a first connection (ensure_nodes) thaws
one instead of booting; idle again (release_nodes) it goes back to the pool
by freezing (`idle: freeze`) or by stopping and booting afresh (`idle:
stop`); a frozen virtual node counts against its node as memory, not CPU."""

from __future__ import annotations

import pytest

from soda import model
from soda.errors import InvalidSpec
from soda.master.controller import endpoint_set
from tests.fakes import FakeClock
from tests.unit.test_controller import CAP, make_controller, push_busybox

FREEZES = model.DriverCapabilities(hypervisor="fake", freeze=True)


@pytest.fixture
def ctl(tmp_path):
    ctl = make_controller(str(tmp_path / "m"), FakeClock())
    push_busybox(ctl, tmp_path, public=True)
    ctl.register_node("a", "127.0.0.1", CAP, ["fake"], limits=[FREEZES])
    return ctl


def _spec(warm=1, idle="freeze", max_nodes=3, cpu=0.5, name="od", listen="127.0.0.1:8081"):
    return model.parse_spec({"name": name, "image": "busybox", "nodes": 0, "resources": {"cpu": cpu, "memory": 64},
                             "switch": {"listen": listen},
                             "on_demand": {"max_nodes": max_nodes, "idle_seconds": 60, "warm": warm,
                                           "idle": idle}})


def _state(service):
    return {v.name: ("deleting" if v.deleting else "frozen" if v.frozen else "active")
            for v in service.vnodes}


def test_a_service_created_idle_boots_its_pool_frozen(ctl):
    created = ctl.create_service(_spec(warm=2))
    assert _state(created) == {"od-0": "frozen", "od-1": "frozen"}
    assert created.spec.nodes == 2
    assert all(ctl.assignments("a")[v].frozen for v in ("od-0", "od-1"))   # the Agent boots, then freezes
    assert [(e.vnode, e.ready, e.frozen) for e in endpoint_set(created).endpoints] == [
        ("od-0", False, True), ("od-1", False, True)]
    # Memory held, CPU not.
    (node,) = [n for n in ctl.list_nodes() if n.name == "a"]
    assert node.allocated.cpu == 0 and node.allocated.memory >= 128


def test_a_first_connection_thaws_a_pooled_guest_instead_of_booting(ctl):
    ctl.create_service(_spec(warm=2))
    once = ctl.ensure_nodes("od")
    assert _state(once) == {"od-0": "active", "od-1": "frozen"}
    assert ctl.ensure_nodes("od").vnodes == once.vnodes                   # idempotent
    assert [n.allocated.cpu for n in ctl.list_nodes()] == [0.5]
    both = ctl.ensure_nodes("od", 2)
    assert _state(both) == {"od-0": "active", "od-1": "active"}
    three = ctl.ensure_nodes("od", 3)                                     # beyond the pool: a boot
    assert _state(three) == {"od-0": "active", "od-1": "active", "od-2": "active"}


def test_idle_freeze_keeps_the_guests_that_served_as_the_pool_and_stops_the_rest(ctl):
    ctl.create_service(_spec(warm=2))
    ctl.ensure_nodes("od", 3)
    idle = ctl.release_nodes("od")
    assert _state(idle) == {"od-0": "frozen", "od-1": "frozen", "od-2": "deleting"}
    assert idle.spec.nodes == 2
    assert ctl.release_nodes("od").vnodes == ctl.get_service("od").vnodes    # idle already: unchanged


def test_idle_stop_stops_the_guests_that_served_and_boots_a_fresh_pool(ctl):
    ctl.create_service(_spec(warm=1, idle="stop"))
    ctl.ensure_nodes("od")
    idle = ctl.release_nodes("od")
    assert _state(idle) == {"od-0": "deleting", "od-1": "frozen"}
    assert _state(ctl.ensure_nodes("od")) == {"od-0": "deleting", "od-1": "active"}


def test_no_pool_by_default_and_back_to_zero(ctl):
    ctl.create_service(_spec(warm=0))
    assert ctl.get_service("od").vnodes == ()
    ctl.ensure_nodes("od")
    assert _state(ctl.release_nodes("od")) == {"od-0": "deleting"}


def test_a_pooled_guest_whose_node_has_no_cpu_left_gives_way_to_a_new_one(ctl):
    ctl.create_service(_spec(warm=1, max_nodes=1, cpu=1.0))
    # Another service takes the CPU the frozen guest does not hold.
    ctl.create_service(model.parse_spec({"name": "hog", "image": "busybox", "nodes": 1,
                                         "resources": {"cpu": 1.5, "memory": 64}}))
    ctl.register_node("b", "127.0.0.2", CAP, ["fake"], limits=[FREEZES])
    got = ctl.ensure_nodes("od")
    state = {v.name: (_state(got)[v.name], v.node) for v in got.vnodes}
    assert state == {"od-0": ("deleting", "a"), "od-1": ("active", "b")}


@pytest.mark.parametrize("on_demand, message", [
    ({"max_nodes": 2, "warm": 3}, "on_demand.warm must be a whole number from 0 to 2"),
    ({"max_nodes": 2, "warm": -1}, "on_demand.warm"),
    ({"max_nodes": 2, "idle": "sleep"}, "on_demand.idle must be one of freeze, stop"),
])
def test_bad_pools_are_refused(on_demand, message):
    with pytest.raises(InvalidSpec, match=message):
        model.parse_spec({"name": "od", "image": "busybox", "nodes": 0, "on_demand": on_demand})
