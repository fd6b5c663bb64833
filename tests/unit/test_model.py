import math

import pytest

from soda import model
from soda.errors import InvalidSpec


def spec(**kw):
    base = {"name": "web", "image": "busybox", "nodes": 2}
    base.update(kw)
    return base


def test_scalar_resources_apply_to_every_vnode():
    s = model.parse_spec(spec(resources={"cpu": 0.5, "memory": 64}))
    assert [r.cpu for r in s.resources] == [0.5, 0.5]
    assert [r.memory for r in s.resources] == [64, 64]
    assert s.resources[0].bandwidth == model.RESOURCE_DEFAULTS["bandwidth"]


def test_list_resources_give_one_value_per_vnode():
    s = model.parse_spec(spec(resources={"cpu": [0.5, 1.0]}))
    assert [r.cpu for r in s.resources] == [0.5, 1.0]


@pytest.mark.parametrize("bad, words", [
    ({"name": "Web"}, "invalid service name"),
    ({"name": "-web"}, "invalid service name"),
    ({"name": "a" * 51}, "invalid service name"),
    ({"name": ""}, "name is required"),
    ({"image": ""}, "image is required"),
    ({"image": "Bad Image"}, "invalid image reference"),
    ({"nodes": -1}, "nodes must be between"),
    ({"nodes": 1001}, "nodes must be between"),
    ({"nodes": "2"}, "not a whole number"),
    ({"resources": {"cpu": 0}}, "cpu must be between"),
    ({"resources": {"cpu": -1}}, "cpu must be between"),
    ({"resources": {"cpu": math.nan}}, "not a finite number"),
    ({"resources": {"cpu": 1e9}}, "cpu must be between"),
    ({"resources": {"memory": 0}}, "memory must be between"),
    ({"resources": {"memory": 64.5}}, "whole number"),
    ({"resources": {"memory": "lots"}}, "not a number"),
    ({"resources": {"cpu": [1.0]}}, "1 values given for 2 virtual nodes"),
    ({"resources": {"gpu": 1}}, "unknown resource field"),
    ({"resources": [1, 2]}, "resources must be a mapping"),
    ({"replicas": 3}, "unknown spec field"),
    ({"hypervisor": "Xen 4"}, "invalid hypervisor name"),
    ({"port": 70000}, "port must be"),
    ({"switch": {"policy": "random"}}, "unknown switch policy"),
    ({"switch": {"listen": "nohost"}}, "HOST:PORT"),
    ({"switch": {"listen": "127.0.0.1:0"}}, "port from 1 to 65535"),
    ({"switch": {"tls": True}}, "unknown switch field"),
    ({"switch": {"mode": "l7"}}, "unknown switch mode"),
    ({"switch": {"health": {"kind": "icmp"}}}, "unknown health check kind"),
    ({"switch": {"health": {"kind": "http", "path": "healthz"}}}, "is not an HTTP path"),
    ({"switch": {"health": {"path": "/a b"}}}, "is not an HTTP path"),
    ({"switch": {"health": {"kind": "tcp", "path": "/x"}}}, "only for kind http"),
    ({"switch": {"health": {"rise": 0}}}, "rise must be a whole number from 1"),
    ({"switch": {"health": {"interval": -1}}}, "interval must be a number"),
    ({"switch": {"health": {"expect_status": 99}}}, "expect_status must be"),
    ({"switch": {"health": {"retries": 3}}}, "unknown switch.health field"),
    ({"switch": {"health": "/healthz"}}, "switch.health must be a mapping"),
    ({"switch": {"drain_seconds": -1}}, "drain_seconds must be"),
    ({"on_demand": {"idle_seconds": 60}}, "on_demand.max_nodes is required"),
    ({"on_demand": {"max_nodes": 1}}, "more than on_demand.max_nodes"),
    ({"on_demand": {"max_nodes": 0}}, "max_nodes must be a whole number from 1"),
    ({"on_demand": {"max_nodes": 2, "idle_seconds": 0}}, "idle_seconds must be"),
    ({"on_demand": {"max_nodes": 2, "burst": 1}}, "unknown on_demand field"),
    ({"on_demand": 3}, "on_demand must be a mapping"),
])
def test_bad_specs_are_refused_with_a_clear_message(bad, words):
    with pytest.raises(InvalidSpec) as info:
        model.parse_spec(spec(**bad))
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_not_a_mapping():
    with pytest.raises(InvalidSpec, match="mapping"):
        model.parse_spec(["web"])


def test_spec_round_trips_through_its_dict_form():
    s = model.parse_spec(spec(resources={"cpu": [0.5, 1.0], "disk": 128},
                              switch={"listen": "127.0.0.1:8080"}))
    assert model.parse_spec(s.as_dict()) == s


def test_validate_spec_catches_mismatched_resource_count():
    s = model.parse_spec(spec())
    from dataclasses import replace
    with pytest.raises(InvalidSpec, match="one per virtual node"):
        model.validate_spec(replace(s, nodes=3))


def test_cpu_cap_is_a_boolean_and_round_trips():
    s = model.parse_spec(spec(cpu_cap=True))
    assert s.cpu_cap is True and model.parse_spec(s.as_dict()) == s
    assert model.parse_spec(spec()).cpu_cap is False
    with pytest.raises(InvalidSpec, match="cpu_cap must be true or false"):
        model.parse_spec(spec(cpu_cap="yes"))


def test_switch_defaults_and_health_round_trip():
    s = model.parse_spec(spec())
    assert s.switch.mode == "proxy" and s.switch.health == model.HealthCheck()
    assert s.switch.health.kind == "tcp" and s.switch.drain_seconds == 30.0
    s = model.parse_spec(spec(switch={"mode": "l4", "drain_seconds": 0,
                                      "health": {"path": "/healthz", "fall": 3, "interval": 0.5}}))
    assert s.switch.mode == "l4" and s.switch.drain_seconds == 0.0
    assert s.switch.health == model.HealthCheck(kind="http", path="/healthz", fall=3, interval=0.5,
                                                timeout=0.5)
    assert model.parse_spec(s.as_dict()) == s and model.validate_spec(s) == s


def test_on_demand_service_at_zero_keeps_its_node_template():
    s = model.parse_spec(spec(nodes=0, resources={"cpu": 0.5, "memory": 32},
                              on_demand={"max_nodes": 3, "idle_seconds": 20}))
    assert s.nodes == 0 and s.resources == ()
    assert s.on_demand == model.OnDemand(max_nodes=3, idle_seconds=20.0,
                                         resources=model.parse_spec(spec(
                                             nodes=1, resources={"cpu": 0.5, "memory": 32})).resources[0])
    assert model.parse_spec(s.as_dict()) == s and model.validate_spec(s) == s
    # Per-node lists: nodes deployed on demand take the last entry.
    s = model.parse_spec(spec(resources={"cpu": [0.5, 1.0]}, on_demand={"max_nodes": 4}))
    assert s.on_demand.resources.cpu == 1.0 and s.on_demand.idle_seconds == 300.0


@pytest.mark.parametrize("data", [
    {"name": "web\n", "image": "busybox"},
    {"name": "web", "image": "busybox\n"},
    {"name": "web", "image": "sha256:" + "a" * 64 + "\n"},
    {"name": "web", "image": "busybox", "switch": {"health": {"kind": "http", "path": "/\n"}}},
])
def test_a_trailing_newline_is_not_part_of_a_valid_name(data):
    with pytest.raises(InvalidSpec):
        model.parse_spec(data)
    with pytest.raises(InvalidSpec):
        model.check_image_name("img\n")


def test_resources_of_a_service_at_zero_nodes_are_checked_and_kept():
    with pytest.raises(InvalidSpec, match="cpu"):
        model.parse_spec({"name": "z", "image": "busybox", "nodes": 0, "resources": {"cpu": 0}})
    spec = model.parse_spec({"name": "z", "image": "busybox", "nodes": 0,
                             "resources": {"cpu": 0.25, "memory": 48}})
    assert spec.resources == () and spec.template == model.Resources(0.25, 48, 100, 256)
    again = model.parse_spec(spec.as_dict())
    assert again == spec and model.validate_spec(spec) == spec
    from soda.rpc import convert
    assert model.validate_spec(convert.spec_from_pb(convert.spec_to_pb(spec))) == spec


def test_a_services_template_is_its_last_nodes_resources():
    spec = model.parse_spec({"name": "z", "image": "busybox", "nodes": 2,
                             "resources": {"cpu": [0.5, 2.0], "memory": 64}})
    assert spec.template == model.Resources(2.0, 64, 100, 256)


def test_boot_timeout_is_optional_bounded_and_survives_the_round_trips():
    base = {"name": "web", "image": "busybox-httpd"}
    assert model.parse_spec(base).boot_timeout == 0.0
    spec = model.parse_spec({**base, "boot_timeout": 20})
    assert spec.boot_timeout == 20.0 and spec.as_dict()["boot_timeout"] == 20.0
    assert model.validate_spec(spec) == spec
    assert "boot_timeout" not in model.parse_spec(base).as_dict()
    for bad in (0.5, 4000, "soon", True, float("nan")):
        with pytest.raises(InvalidSpec, match="boot_timeout"):
            model.parse_spec({**base, "boot_timeout": bad})
