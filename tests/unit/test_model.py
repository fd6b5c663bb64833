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
    ({"hypervisor": "xen"}, "unknown hypervisor"),
    ({"port": 70000}, "port must be"),
    ({"switch": {"policy": "random"}}, "unknown switch policy"),
    ({"switch": {"listen": "nohost"}}, "HOST:PORT"),
    ({"switch": {"listen": "127.0.0.1:0"}}, "port from 1 to 65535"),
    ({"switch": {"tls": True}}, "unknown switch field"),
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
