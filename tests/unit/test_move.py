"""Moves in the Controller, with an injected clock: `move_vnode` with and
without a disk to carry (drivers' `migration`), the disk received as a
layer and handed to the replacement, the old virtual node leaving once the
replacement is ready, refusals, the faults (target lost: given up and
thawed; source lost: the replacement stays and boots the image; the disk
never coming), and the images of carried disks going with their virtual
node."""

import hashlib
import os

import pytest

from soda import layers, model
from soda.errors import InvalidSpec, NotFound, PermissionDenied, WrongState
from soda.master.controller import DISK_WAIT_SECONDS, endpoint_set, moves_of
from tests.unit.test_controller import CAP, make_controller, push_busybox
from tests.unit.test_drain import heartbeat
from tests.fakes import FakeClock

RUNNING, FROZEN = model.Phase.RUNNING, model.Phase.FROZEN
COPY = model.DriverCapabilities("fake", migration="copy", freeze=True)


@pytest.fixture
def movable(tmp_path):
    """web-0 RUNNING on a; b and c can take a carried disk, d cannot."""
    clock = FakeClock()
    ctl = make_controller(str(tmp_path / "m"), clock)
    push_busybox(ctl, tmp_path)
    ctl.register_node("a", "127.0.0.1", CAP, ["fake"], limits=[COPY])
    ctl.create_service(model.parse_spec({"name": "web", "image": "busybox", "nodes": 1,
                                         "resources": {"cpu": 0.5}}))
    for i, name in enumerate(("b", "c"), 2):
        ctl.register_node(name, f"127.0.0.{i}", CAP, ["fake"], limits=[COPY])
    ctl.register_node("d", "127.0.0.4", CAP, ["fake"])
    heartbeat(ctl)
    return ctl, clock, tmp_path


def vnodes(ctl, service="web"):
    return {v.name: v for v in ctl.get_service(service).vnodes}


def send_disk(ctl, tmp_path, vnode, node="a", change=b"written in the guest"):
    """What an Agent sends: the guest's disk (the image with `change` in
    one block) as a layer over its disk_base."""
    v = vnodes(ctl)[vnode]
    base = ctl.store.resolve_image(v.disk_base)
    disk = str(tmp_path / "disk")
    with open(disk, "wb") as out:
        for chunk in ctl.images.content(base):
            out.write(chunk)
        out.seek(8 * layers.BLOCK_SIZE)
        out.write(change.ljust(layers.BLOCK_SIZE, b"\0"))
    digest = "sha256:" + hashlib.sha256(open(disk, "rb").read()).hexdigest()
    header = layers.Header(layers.BLOCK_SIZE, os.path.getsize(disk), base.digest, digest)
    runs = list(layers.differing_runs(disk, ctl.images.block_hashes(base)))
    content = b"".join(layers.build(disk, header, runs))
    layer_digest = "sha256:" + hashlib.sha256(content).hexdigest()
    return ctl.receive_vnode_disk(node, vnode, len(content), layer_digest, base.digest, iter([content]))


def test_a_move_that_carries_the_disk_freezes_sends_boots_it_and_then_the_old_one_leaves(movable):
    ctl, clock, tmp_path = movable
    svc = ctl.move_vnode("web", "0", to="b")
    v = vnodes(ctl)
    old, new = v["web-0"], v["web-1"]
    assert (old.frozen, old.moving_to, old.node) == (True, "b", "a")
    assert old.disk_base == ctl.store.resolve_image("busybox").digest
    assert (new.node, new.replaces, new.image_digest, new.awaits_disk) == ("b", "web-0", "", True)
    assert new.last_move.from_node == "a" and "by an operator" in new.last_move.why
    # The Switch holds new connections rather than refusing them.
    [ep] = endpoint_set(svc).endpoints[:1]
    assert ep.vnode == "web-0" and ep.moving and not ep.ready
    assert [m.new.name for m in moves_of(ctl.get_service("web"), set())[0]] == ["web-1"]
    assert ctl.store.moving_services() == {"web"}

    image = send_disk(ctl, tmp_path, "web-0")
    new = vnodes(ctl)["web-1"]
    assert new.image_digest == image.digest and image.parent == old.disk_base
    assert ctl.store.resolve_image("disk.web-1").digest == image.digest
    assert b"written in the guest" in b"".join(ctl.images.content(image))
    # Not again: the replacement has its disk.
    with pytest.raises(WrongState, match="no replacement waiting"):
        send_disk(ctl, tmp_path, "web-0")

    heartbeat(ctl)                          # web-1 RUNNING on b, no Switch serves it
    ctl.check_membership()
    v = vnodes(ctl)
    assert v["web-0"].deleting and not v["web-1"].replaces
    heartbeat(ctl)                          # a's Agent stopped web-0
    assert set(vnodes(ctl)) == {"web-1"}
    assert ctl.store.moving_services() == set()
    # The disk's image goes with the virtual node that boots it.
    ctl.delete_service("web")
    heartbeat(ctl)
    assert not any(n.startswith("disk.") for i in ctl.list_images() for n in i.names)


def test_a_move_that_cannot_carry_the_disk_is_refused_unless_cold(movable):
    ctl, _, _ = movable
    with pytest.raises(WrongState, match="driver of node d cannot take a guest's disk; pass --cold"):
        ctl.move_vnode("web", "web-0", to="d")
    ctl.move_vnode("web", "web-0", to="d", cold=True)
    v = vnodes(ctl)
    assert not v["web-0"].frozen and v["web-0"].moving_to == "d"        # serves on meanwhile
    assert (v["web-1"].node, v["web-1"].replaces) == ("d", "web-0")
    assert v["web-1"].image_digest == v["web-0"].image_digest       # the image, afresh
    heartbeat(ctl)
    ctl.check_membership()
    heartbeat(ctl)
    assert [(x.name, x.node) for x in vnodes(ctl).values()] == [("web-1", "d")]


def test_moves_are_refused_with_the_reason(movable):
    ctl, _, tmp_path = movable
    with pytest.raises(NotFound, match="no virtual node '7'"):
        ctl.move_vnode("web", "7")
    with pytest.raises(NotFound, match="no physical node named 'x'"):
        ctl.move_vnode("web", "0", to="x")
    with pytest.raises(InvalidSpec, match="runs on node a already"):
        ctl.move_vnode("web", "0", to="a")
    ctl.drain_node("c")
    with pytest.raises(WrongState, match="node c takes no new virtual nodes: it is draining"):
        ctl.move_vnode("web", "0", to="c")
    ctl.move_vnode("web", "0", to="b")
    with pytest.raises(WrongState, match="being moved already"):
        ctl.move_vnode("web", "0")
    with pytest.raises(WrongState, match="being moved already"):
        ctl.move_vnode("web", "web-1")
    with pytest.raises(PermissionDenied):
        ctl.move_vnode("web", "0", tenant="other")
    with pytest.raises(PermissionDenied, match="does not run it"):
        send_disk(ctl, tmp_path, "web-0", node="b")


def test_a_target_lost_mid_move_gives_it_up_and_thaws_the_guest(movable):
    ctl, clock, _ = movable
    ctl.move_vnode("web", "0", to="b")
    clock.now += 11
    ctl.report_status("a", [model.VirtualNodeStatus("web-0", FROZEN, generation=1)], complete=True)
    for name in ("c", "d"):
        ctl.report_status(name, [], complete=True)
    assert ctl.check_membership() == ["b"]
    [v] = vnodes(ctl).values()
    assert (v.name, v.node, v.frozen, v.moving_to, v.disk_base) == ("web-0", "a", False, "", "")
    assert ctl.assignments("a")["web-0"].frozen is False
    # Coming back: new connections wait for it rather than being refused.
    [ep] = endpoint_set(ctl.get_service("web")).endpoints
    assert ep.moving and not ep.ready


def test_a_source_lost_mid_move_leaves_the_replacement_to_boot_the_image(movable):
    ctl, clock, _ = movable
    ctl.move_vnode("web", "0", to="b")
    clock.now += 11
    for name in ("b", "c", "d"):
        ctl.report_status(name, [], complete=True)
    assert ctl.check_membership() == ["a"]
    [v] = vnodes(ctl).values()
    assert (v.name, v.node, v.replaces) == ("web-1", "b", "")
    assert v.image_digest == ctl.store.resolve_image("busybox").digest
    assert ctl.assignments("b")["web-1"].image_digest == v.image_digest


def test_a_disk_that_never_comes_gives_the_move_up(movable):
    ctl, clock, _ = movable
    ctl.move_vnode("web", "0", to="b")
    ctl.clock = lambda: clock.now + DISK_WAIT_SECONDS + 1        # wall clock of the move's record
    heartbeat(ctl)
    ctl.check_membership()
    v = vnodes(ctl)
    assert v["web-1"].deleting and not v["web-0"].frozen and not v["web-0"].moving_to


def test_a_switch_that_lists_the_service_and_none_of_its_vnodes_is_waited_for(movable):
    # Between letting the frozen guest go and hearing of its replacement a
    # Switch's report may name none of the service's virtual nodes: it
    # still serves the service, so the replacement must pass its checks.
    ctl, clock, tmp_path = movable
    ctl.move_vnode("web", "0", to="b")
    send_disk(ctl, tmp_path, "web-0")
    ctl.report_switch(model.SwitchReport(switch="sw", services=(model.SwitchServiceStats(service="web"),)))
    heartbeat(ctl)
    ctl.check_membership()
    v = vnodes(ctl)
    assert not v["web-0"].deleting and v["web-1"].replaces == "web-0"
    assert "waiting for a Switch to report it healthy" in ctl.get_service("web").vnodes[0].reason \
        or any("Switch" in x.reason for x in ctl.get_service("web").vnodes)


def test_a_frozen_virtual_node_moves_as_it_is_kept_booted_there_and_frozen(movable):
    ctl, _, _ = movable
    ctl.freeze_service("web")
    heartbeat(ctl, phase=FROZEN)
    with pytest.raises(WrongState, match="it is frozen"):
        ctl.move_vnode("web", "0", to="b")
    ctl.move_vnode("web", "0", to="b", cold=True)
    v = vnodes(ctl)
    assert (v["web-1"].frozen, v["web-1"].image_digest, v["web-0"].frozen) == (True, v["web-0"].image_digest, True)
    heartbeat(ctl, phase=FROZEN)            # booted there, then frozen
    ctl.check_membership()
    heartbeat(ctl, phase=FROZEN)
    assert [(x.name, x.node, x.frozen) for x in vnodes(ctl).values()] == [("web-1", "b", True)]
