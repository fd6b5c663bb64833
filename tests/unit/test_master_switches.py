"""The Master's view of the Switches (soda.master.switches) through the
Controller, with an injected clock: figures shown per virtual node, listen
addresses refused at create time, and draining holds on leaving nodes."""

import pytest

from soda import model
from soda.errors import AlreadyExists, InvalidSpec
from soda.master.switches import STALE_SECONDS
from tests.unit.test_controller import setup  # noqa: F401 - the fixture


def spec(nodes=2, listen="127.0.0.1:8080", drain=30.0):
    return model.parse_spec({"name": "web", "image": "busybox", "nodes": nodes, "resources": {"cpu": 0.5},
                             "switch": {"listen": listen, "drain_seconds": drain}})


def report(vnodes=(), service="web", listen_hosts=(), busy=(), switch="sw1"):
    return model.SwitchReport(switch=switch, listen_hosts=tuple(listen_hosts), busy=tuple(busy), services=(
        model.SwitchServiceStats(service=service, listen="127.0.0.1:8080", listening=True,
                                 vnodes=tuple(vnodes)),))


def vs(name, routable=True, open=0, total=0):
    return model.SwitchVnodeStats(vnode=name, routable=routable, healthy=routable, open=open, total=total,
                                  bytes_in=10 * total, bytes_out=100 * total, ttfb_p50=0.01, ttfb_last=0.02,
                                  ttfb_mean=0.015)


def test_figures_of_live_switches_reach_service_get(setup):
    ctl, clock, _ = setup
    ctl.create_service(spec())
    ctl.report_switch(report([vs("web-0", total=3), vs("web-1", total=6, open=1)]))
    ctl.report_switch(report([vs("web-1", total=4)], switch="sw2"))
    got = {v.name: v.switch_stats for v in ctl.get_service("web").vnodes}
    assert (got["web-0"].total, got["web-0"].bytes_out) == (3, 300)
    assert (got["web-1"].total, got["web-1"].open, got["web-1"].bytes_in) == (10, 1, 100)
    clock.now += STALE_SECONDS + 1          # the Switches went quiet: nothing stale is shown
    assert all(v.switch_stats is None for v in ctl.get_service("web").vnodes)


def test_report_needs_a_switch_name(setup):
    ctl, _, _ = setup
    with pytest.raises(InvalidSpec):
        ctl.report_switch(model.SwitchReport(switch=""))


def test_listen_host_must_be_one_a_switch_may_bind(setup):
    ctl, clock, _ = setup
    ctl.report_switch(report(service="other", listen_hosts=["127.0.0.1", "10.0.0.1"]))
    with pytest.raises(InvalidSpec, match="127.0.0.2 is not one the Switch may listen on"):
        ctl.create_service(spec(listen="127.0.0.2:8080"))
    assert ctl.list_services() == []                   # nothing half created
    ctl.create_service(spec(listen="127.0.0.1:8080"))
    clock.now += STALE_SECONDS + 1                     # no live Switch: nothing to check against
    ctl.delete_service("web")


def test_listen_address_another_process_holds_is_refused(setup):
    ctl, _, _ = setup
    ctl.report_switch(report(service="other", busy=["0.0.0.0:8080", "[::1]:9090", "127.0.0.1:7070"]))
    for listen in ("127.0.0.1:8080", "[::1]:9090", "127.0.0.1:7070"):
        with pytest.raises(AlreadyExists, match="another process listens"):
            ctl.create_service(spec(listen=listen))
    assert ctl.list_services() == []
    ctl.create_service(spec(listen="127.0.0.2:7070"))      # other host, same port: free


def test_scaled_down_node_runs_until_the_switch_has_drained_it(setup):
    ctl, clock, _ = setup
    svc = ctl.create_service(spec(nodes=2))
    node_of = {v.name: v.node for v in svc.vnodes}
    ctl.report_switch(report([vs("web-0"), vs("web-1")]))
    ctl.resize_service("web", 1, [])
    # The Switch has not reported since: the leaving node keeps running.
    held = ctl.assignments(node_of["web-1"])
    assert "web-1" in held and not held["web-1"].deleting
    clock.now += 1
    ctl.report_switch(report([vs("web-0"), vs("web-1", routable=False, open=2)]))
    assert "web-1" in ctl.assignments(node_of["web-1"])     # two connections still open
    clock.now += 1
    ctl.report_switch(report([vs("web-0")]))                # drained
    assert "web-1" not in ctl.assignments(node_of["web-1"])
    assert "web-0" in ctl.assignments(node_of["web-0"])


def test_drain_ends_at_drain_seconds_whatever_the_switch_says(setup):
    ctl, clock, _ = setup
    svc = ctl.create_service(spec(nodes=2, drain=5))
    node_of = {v.name: v.node for v in svc.vnodes}
    ctl.report_switch(report([vs("web-0"), vs("web-1")]))
    ctl.resize_service("web", 1, [])
    clock.now += 1
    ctl.report_switch(report([vs("web-0"), vs("web-1", routable=False, open=1)]))
    assert "web-1" in ctl.assignments(node_of["web-1"])
    clock.now += 4.5
    ctl.report_switch(report([vs("web-0"), vs("web-1", routable=False, open=1)]))
    assert "web-1" not in ctl.assignments(node_of["web-1"])


def test_without_a_switch_serving_the_service_a_node_leaves_at_once(setup):
    ctl, clock, _ = setup
    svc = ctl.create_service(spec(nodes=2))
    node_of = {v.name: v.node for v in svc.vnodes}
    ctl.report_switch(report([], service="another"))
    ctl.resize_service("web", 1, [])
    assert "web-1" not in ctl.assignments(node_of["web-1"])


def test_delete_drains_too_and_the_membership_loop_releases_expired_holds(setup):
    ctl, clock, _ = setup
    svc = ctl.create_service(spec(nodes=2, drain=3))
    ctl.report_switch(report([vs("web-0"), vs("web-1")]))
    ctl.delete_service("web")
    assert {"web-0", "web-1"} <= {name for v in svc.vnodes for name in ctl.assignments(v.node)}
    published = []
    ctl.notifier.publish = lambda *topics: published.extend(topics)
    clock.now += 3.5
    ctl.check_membership()
    assert {f"node:{v.node}" for v in svc.vnodes} <= set(published)
    assert all(not ctl.assignments(v.node) for v in svc.vnodes)
