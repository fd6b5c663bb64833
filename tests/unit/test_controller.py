"""Controller logic with an injected clock: membership, re-placement, restart."""

import pytest

from soda import model
from soda.config import MasterConfig
from soda.master.controller import Controller
from soda.master.images import ImageStore
from soda.master.notifier import Notifier
from soda.master.store import open_store
from tests.support import make_ext4_image
from tests.fakes import FakeClock

CAP = model.Resources(2, 4096, 1000, 100_000)


def make_controller(state_dir, clock):
    store = open_store(state_dir)
    images = ImageStore(f"{state_dir}/images", store)
    return Controller(store, images, Notifier(), MasterConfig(node_lost_seconds=10), clock=clock, monotonic=clock)


def push_busybox(ctl, tmp_path, public=False) -> None:
    """A 4 MiB image named busybox, the operators' (public if asked)."""
    from soda.rpc.client import sha256_file
    path = make_ext4_image(str(tmp_path / "img"))
    with open(path, "rb") as f:
        ctl.push_image("busybox", 4 << 20, sha256_file(path), "", iter(lambda: f.read(1 << 20), b""),
                       public=public)


@pytest.fixture
def setup(tmp_path):
    clock = FakeClock()
    ctl = make_controller(str(tmp_path / "m"), clock)
    push_busybox(ctl, tmp_path)
    for i, name in enumerate(("a", "b")):
        ctl.register_node(name, f"127.0.0.{i + 1}", CAP, ["fake"])
    return ctl, clock, tmp_path


def spec(nodes=2, cpu=0.5):
    return model.parse_spec({"name": "web", "image": "busybox", "nodes": nodes, "resources": {"cpu": cpu}})


def test_lost_node_vnodes_are_placed_again(setup):
    ctl, clock, _ = setup
    svc = ctl.create_service(spec())
    assert {v.node for v in svc.vnodes} == {"a", "b"}
    clock.now += 5
    ctl.report_status("a", [], complete=True)
    clock.now += 6                       # b silent for 11 s
    assert ctl.check_membership() == ["b"]
    nodes = {n.name: n for n in ctl.list_nodes()}
    assert nodes["b"].state == "LOST"
    moved = ctl.get_service("web").vnodes
    assert {v.node for v in moved} == {"a"}
    assert len({v.address for v in moved}) == 2
    # Where each went and why is recorded on the one that moved only.
    was_on_b = next(v for v in svc.vnodes if v.node == "b").name
    records = {v.name: v.last_move for v in moved}
    assert records[was_on_b] == model.VnodeMove("b", clock.now, "node b lost: no heartbeat for 11 s")
    assert [m for name, m in records.items() if name != was_on_b] == [None]
    assert ctl.check_membership() == []            # nothing more to do
    assert ctl.get_service("web").vnodes == moved  # and the record is not written again
    # b registers again (its Agent restarted): still LOST, nothing new for it,
    # until its first heartbeat (sent once it stopped its old guests).
    assert ctl.register_node("b", "127.0.0.2", CAP, ["fake"]).state == "LOST"
    assert ctl.assignments("b") == {}
    ctl.create_service(model.parse_spec({"name": "api", "image": "busybox", "nodes": 1}))
    assert {v.node for v in ctl.get_service("api").vnodes} == {"a"}
    ctl.report_status("b", [], complete=False)       # a phase report is no heartbeat
    assert {n.name: n.state for n in ctl.list_nodes()}["b"] == "LOST"
    # A heartbeat that still lists a guest now placed elsewhere keeps it LOST.
    old = next(v for v in svc.vnodes if v.node == "b")
    running = model.VirtualNodeStatus(name=old.name, phase=model.Phase.RUNNING, generation=old.generation)
    ctl.report_status("b", [running], complete=True)
    assert {n.name: n.state for n in ctl.list_nodes()}["b"] == "LOST"
    ctl.report_status("b", [], complete=True)
    assert {n.name: n.state for n in ctl.list_nodes()}["b"] == "READY"
    assert ctl.assignments("b") == {}


def test_stranded_vnode_waits_for_room(setup):
    ctl, clock, _ = setup
    ctl.create_service(spec(nodes=2, cpu=2))     # one full node each
    clock.now += 11
    ctl.report_status("a", [], complete=True)
    ctl.check_membership()
    waiting = [v for v in ctl.get_service("web").vnodes if not v.node]
    assert len(waiting) == 1 and waiting[0].phase == model.Phase.FAILED
    assert "waiting for room" in waiting[0].reason and "cpu" in waiting[0].reason
    lost_at = clock.now
    assert waiting[0].last_move == model.VnodeMove("b", lost_at, "node b lost: no heartbeat for 11 s")
    clock.now += 3
    ctl.register_node("c", "127.0.0.3", CAP, ["fake"])
    ctl.check_membership()
    assert all(v.node for v in ctl.get_service("web").vnodes)
    # Placed on c at last, it still says where it came from and why.
    placed = next(v for v in ctl.get_service("web").vnodes if v.name == waiting[0].name)
    assert placed.node == "c" and placed.last_move == waiting[0].last_move


def test_a_move_record_outlasts_the_agents_reports_and_a_restart(setup):
    ctl, clock, tmp_path = setup
    ctl.create_service(spec())
    clock.now += 11
    ctl.report_status("a", [], complete=True)
    ctl.check_membership()
    [moved] = [v for v in ctl.get_service("web").vnodes if v.last_move]
    ctl.report_status("a", [model.VirtualNodeStatus(name=v.name, phase=model.Phase.RUNNING,
                                                    generation=v.generation)
                            for v in ctl.get_service("web").vnodes], complete=True)
    assert {v.phase for v in ctl.get_service("web").vnodes} == {model.Phase.RUNNING}
    ctl.store.close()
    again = make_controller(str(tmp_path / "m"), clock)
    [after] = [v for v in again.get_service("web").vnodes if v.last_move]
    assert after.name == moved.name and after.last_move == moved.last_move
    assert after.last_move.from_node == "b" and "lost" in after.last_move.why
    again.store.close()


def test_restart_keeps_everything_and_grants_grace(setup):
    ctl, clock, tmp_path = setup
    ctl.create_service(spec())
    ctl.store.close()
    clock.now += 100                              # long after the last heartbeat
    again = make_controller(str(tmp_path / "m"), clock)
    assert [s.name for s in again.list_services()] == ["web"]
    assert [i.names for i in again.list_images()] == [("busybox",)]
    assert again.check_membership() == []         # grace period after restart
    assert {n.state for n in again.list_nodes()} == {"READY"}


def test_delete_of_vnodes_on_lost_node_finishes_at_once(setup):
    ctl, clock, _ = setup
    ctl.create_service(spec(nodes=1))
    node = ctl.get_service("web").vnodes[0].node
    clock.now += 11
    other = "a" if node == "b" else "b"
    ctl.report_status(other, [], complete=True)
    ctl.check_membership()
    ctl.delete_service("web")
    ctl.report_status(other, [], complete=True)
    assert ctl.list_services() == []


def test_a_node_is_removed_only_once_it_holds_nothing(setup):
    from soda.errors import NotFound, WrongState
    from soda.master.controller import NODES_TOPIC
    ctl, clock, _ = setup
    ctl.create_service(spec())
    with pytest.raises(WrongState, match="still holds 1 virtual node.*web-"):
        ctl.remove_node("b")
    clock.now += 11
    ctl.report_status("a", [], complete=True)
    assert ctl.check_membership() == ["b"]              # web's vnode goes to a
    seen = ctl.notifier.revision(NODES_TOPIC)
    removed = ctl.remove_node("b")
    assert removed.name == "b" and removed.uplink      # what the removal freed
    assert ctl.notifier.revision(NODES_TOPIC) > seen    # every host drops its route
    assert [n.name for n in ctl.list_nodes()] == ["a"]
    with pytest.raises(NotFound):
        ctl.remove_node("b")
    # The freed subnet goes to the next node that registers.
    assert ctl.register_node("c", "127.0.0.3", CAP, ["fake"]).subnet == removed.subnet
    # A READY node with nothing on it is refused too: drain it or stop its Agent.
    with pytest.raises(WrongState, match="READY"):
        ctl.remove_node("c")
