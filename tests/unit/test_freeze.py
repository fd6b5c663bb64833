"""Freeze and thaw: the Master's side (who may, where it can, the Switch's
drain before the Agent is told, endpoints), the Agent's reconciler with the
fake driver (phases, the driver's state, an Agent restart), and the rollout
states sodactl waits on."""

from __future__ import annotations

import time

import pytest

from soda import model
from soda.agent.reconciler import Reconciler
from soda.cli.rollout import Rollout
from soda.errors import NotFound, PermissionDenied, WrongState
from soda.hypervisors.fake import FakeDriver
from soda.master.controller import endpoint_set
from soda.model import Phase
from tests.fakes import FakeClock
from tests.support import make_ext4_image
from tests.unit.test_controller import CAP, make_controller, push_busybox
from tests.unit.test_master_switches import report, vs
from tests.fakes import FakeImages, RecordingReporter
from tests.unit.test_reconciler import vnode, wait_for

FREEZES = model.DriverCapabilities(hypervisor="fake", freeze=True)


@pytest.fixture
def ctl(tmp_path):
    clock = FakeClock()
    ctl = make_controller(str(tmp_path / "m"), clock)
    push_busybox(ctl, tmp_path, public=True)
    ctl.register_node("a", "127.0.0.1", CAP, ["fake"], limits=[FREEZES])
    ctl.register_node("b", "127.0.0.2", CAP, ["fake"])                 # its driver cannot freeze
    ctl.clock_ = clock
    return ctl


def _spec(name="web", nodes=2, drain=0.0):
    return model.parse_spec({"name": name, "image": "busybox", "nodes": nodes, "resources": {"cpu": 0.5},
                             "switch": {"listen": "127.0.0.1:8080", "drain_seconds": drain}})


def _on_a(ctl, drain=0.0, nodes=2):
    ctl.drain_node("b")                                                 # place everything on a
    return ctl.create_service(_spec(nodes=nodes, drain=drain))


def test_freeze_marks_the_virtual_nodes_and_takes_them_out_of_the_endpoints(ctl):
    _on_a(ctl)
    frozen = ctl.freeze_service("web", ["1"])
    assert {v.name: v.frozen for v in frozen.vnodes} == {"web-0": False, "web-1": True}
    ready = {e.vnode: e.ready for e in endpoint_set(
        frozen.__class__(**{**frozen.__dict__, "vnodes": tuple(v.with_status(Phase.RUNNING) for v in frozen.vnodes)})
    ).endpoints}
    assert ready == {"web-0": True, "web-1": False}
    assert ctl.assignments("a")["web-1"].frozen              # no Switch reports: nothing to drain
    thawed = ctl.freeze_service("web", frozen=False)
    assert not any(v.frozen for v in thawed.vnodes) and not ctl.assignments("a")["web-1"].frozen


def test_the_agent_is_told_to_freeze_once_the_switch_has_drained(ctl):
    _on_a(ctl, drain=30.0)
    ctl.report_switch(report([vs("web-0"), vs("web-1", open=2)]))
    ctl.clock_.now += 1
    ctl.freeze_service("web", ["web-1"])
    ctl.report_switch(report([vs("web-0"), vs("web-1", routable=False, open=2)]))
    assert not ctl.assignments("a")["web-1"].frozen          # its connections still run
    ctl.report_switch(report([vs("web-0"), vs("web-1", routable=False, open=0)]))
    assert ctl.assignments("a")["web-1"].frozen


def test_freezing_is_refused_where_the_driver_cannot_and_for_unknown_names(ctl):
    ctl.create_service(_spec(nodes=2))                        # one on a, one on b
    with pytest.raises(WrongState, match="whose driver cannot freeze guests"):
        ctl.freeze_service("web")
    assert not any(v.frozen for v in ctl.get_service("web").vnodes)   # nothing half done
    with pytest.raises(NotFound, match="has no virtual node 'web-7'"):
        ctl.freeze_service("web", ["web-7"])
    with pytest.raises(NotFound):
        ctl.freeze_service("nosuch")


def test_a_tenant_freezes_only_its_own_services(ctl):
    ctl.drain_node("b")
    ctl.create_service(_spec(), tenant="acme")
    with pytest.raises(PermissionDenied):
        ctl.freeze_service("web", tenant="beta")
    assert all(v.frozen for v in ctl.freeze_service("web", tenant="acme").vnodes)


# ---- the Agent --------------------------------------------------------------------

def _settled(rec: Reconciler, phase: Phase) -> bool:
    """One reconcile pass (an action in flight makes it pass the guest by);
    whether the virtual node has reached `phase`."""
    rec.reconcile_once()
    time.sleep(0.01)
    return rec.status("web-0").phase == phase


def test_the_reconciler_freezes_and_thaws_with_the_driver(tmp_path):
    driver = FakeDriver(str(tmp_path / "state"), boot_seconds=0)
    images = FakeImages(make_ext4_image(str(tmp_path / "img")))
    reporter = RecordingReporter()
    rec = Reconciler({"fake": driver}, reporter, images)
    try:
        rec.replace_desired([vnode("web-0")])
        wait_for(lambda: _settled(rec, Phase.RUNNING))
        rec.upsert_desired([vnode("web-0", frozen=True)])
        wait_for(lambda: _settled(rec, Phase.FROZEN))
        assert driver.info("web-0").frozen and not driver.is_ready("web-0")
    finally:
        rec.close()
    # A new Agent finds the guest frozen and leaves it so.
    rec = Reconciler({"fake": FakeDriver(str(tmp_path / "state"), boot_seconds=0)}, RecordingReporter(), images)
    try:
        rec.replace_desired([vnode("web-0", frozen=True)])
        wait_for(lambda: _settled(rec, Phase.FROZEN))
        rec.upsert_desired([vnode("web-0", frozen=False)])
        wait_for(lambda: _settled(rec, Phase.RUNNING))
        assert not driver.info("web-0").frozen
        assert driver._load("web-0")["pid"] == driver.info("web-0").pid      # the same guest, not a new boot
    finally:
        rec.close()


def test_a_guest_wanted_frozen_from_the_start_boots_then_freezes(tmp_path):
    """A warm pool's guest: frozen only once its service answers."""
    class Watched(FakeDriver):
        frozen_ready = []

        def freeze(self, name):
            self.frozen_ready.append(self.is_ready(name))
            super().freeze(name)

    driver = Watched(str(tmp_path / "state"), boot_seconds=0.3)
    rec = Reconciler({"fake": driver}, RecordingReporter(), FakeImages(make_ext4_image(str(tmp_path / "img"))))
    try:
        rec.replace_desired([vnode("web-0", frozen=True)])
        wait_for(lambda: _settled(rec, Phase.FROZEN))
        assert driver.frozen_ready == [True] and driver.info("web-0").frozen
    finally:
        rec.close()


def test_a_freeze_the_driver_refuses_is_a_reason_not_a_restart(tmp_path):
    class Stubborn(FakeDriver):
        def freeze(self, name):
            raise WrongState("the VMM said no")

    driver = Stubborn(str(tmp_path / "state"), boot_seconds=0)
    rec = Reconciler({"fake": driver}, RecordingReporter(), FakeImages(make_ext4_image(str(tmp_path / "img"))))
    try:
        rec.replace_desired([vnode("web-0", frozen=True)])
        rec.reconcile_once()
        wait_for(lambda: driver.is_ready("web-0"))
        started = driver.info("web-0").started_at
        deadline = time.monotonic() + 5
        while "the VMM said no" not in (rec.status("web-0").reason if rec.status("web-0") else ""):
            assert time.monotonic() < deadline
            rec.reconcile_once()
            time.sleep(0.02)
        assert rec.status("web-0").phase == Phase.RUNNING and driver.info("web-0").started_at == started
    finally:
        rec.close()


# ---- what sodactl waits on ------------------------------------------------------------

def _service(*vnodes):
    return model.Service(spec=_spec(nodes=len(vnodes)), image_digest="sha256:" + "0" * 64, vnodes=vnodes)


def _v(index, phase, frozen=False):
    return model.VirtualNode(name=f"web-{index}", service="web", index=index, resources=model.Resources(),
                             phase=phase, frozen=frozen)


@pytest.mark.parametrize("vnodes, state, done", [
    ((_v(0, Phase.FROZEN, True), _v(1, Phase.FROZEN, True)), "FROZEN", True),
    ((_v(0, Phase.RUNNING), _v(1, Phase.FROZEN, True)), "RUNNING", True),
    ((_v(0, Phase.RUNNING, True), _v(1, Phase.FROZEN, True)), "PENDING", False),    # one to freeze yet
    ((_v(0, Phase.THAWING), _v(1, Phase.RUNNING)), "PENDING", False),
    ((_v(0, Phase.FROZEN), _v(1, Phase.RUNNING)), "PENDING", False),                # asked to thaw
])
def test_rollout_counts_frozen_virtual_nodes_at_rest(vnodes, state, done):
    rollout = Rollout.of(_service(*vnodes))
    assert (rollout.state, rollout.done) == (state, done)
