"""The service spec's `network` section: parsing, its defaults, the wire,
the store, the endpoint sets the nodes' policy follows, and sodactl."""

import json

import pytest

from soda import model
from soda.errors import InvalidSpec
from soda.rpc import convert


def spec(**network):
    data = {"name": "web", "image": "busybox"}
    if network:
        data["network"] = network
    return model.parse_spec(data)


def test_the_default_lets_peers_talk_and_nothing_out():
    assert spec().network == model.NetworkSpec(peers=True, egress=())
    assert "network" not in spec().as_dict()            # the default is not spelled out


def test_egress_rules_are_normalised_and_deduplicated():
    got = spec(peers=False, egress=["192.0.2.9/24:443", "10.1.2.3:8000-8099", "192.0.2.0/24:443"]).network
    assert got.peers is False
    assert [str(r) for r in got.egress] == ["192.0.2.0/24:443", "10.1.2.3/32:8000-8099"]
    assert got.egress[1] == model.EgressRule("10.1.2.3/32", 8000, 8099)
    assert spec(egress="198.51.100.0/24:53").network.egress == (model.EgressRule("198.51.100.0/24", 53, 53),)


@pytest.mark.parametrize("network, message", [
    ({"peers": "yes"}, "network.peers must be true or false"),
    ({"egress": ["192.0.2.0/24"]}, "entries look like"),
    ({"egress": ["nonsense:80"]}, "'nonsense' is not an IPv4 network"),
    ({"egress": ["2001:db8::/32:80"]}, "is not an IPv4 network"),
    ({"egress": ["192.0.2.0/24:http"]}, "'http' is not a port"),
    ({"egress": ["192.0.2.0/24:0"]}, "ports must lie from 1 to 65535"),
    ({"egress": ["192.0.2.0/24:90-80"]}, "lowest first"),
    ({"egress": {"a": 1}}, "network.egress must be a list"),
    ({"egress": [f"10.0.{i}.0/24:80" for i in range(65)]}, "at most 64"),
    ({"ingress": []}, "unknown network field(s): ingress"),
])
def test_bad_network_sections_are_refused_clearly(network, message):
    with pytest.raises(InvalidSpec, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec(**network)
    with pytest.raises(InvalidSpec, match="network must be a mapping"):
        model.parse_spec({"name": "web", "image": "busybox", "network": "open"})


def test_the_network_spec_survives_the_wire_validation_and_endpoint_sets():
    s = spec(peers=False, egress=["192.0.2.0/24:443"])
    assert convert.spec_from_pb(convert.spec_to_pb(s)) == s
    assert model.validate_spec(s) == s
    bare = convert.spec_to_pb(spec())
    bare.ClearField("network")                    # a client that never heard of it
    assert convert.spec_from_pb(bare).network == model.NetworkSpec()
    es = model.EndpointSet("web", network=s.network,
                           endpoints=(model.Endpoint("web-0", "10.0.1.2", 80, 1.0, True),))
    assert convert.endpoints_from_pb(convert.endpoints_to_pb(es)) == es


def test_the_store_keeps_it_and_reads_older_specs_with_the_default(tmp_path):
    from soda.master.store import _spec_from_json, _spec_to_json
    s = spec(peers=False, egress=["192.0.2.0/24:443-444"])
    assert _spec_from_json(_spec_to_json(s)) == s
    older = json.loads(_spec_to_json(spec()))
    del older["network"]
    assert _spec_from_json(json.dumps(older)).network == model.NetworkSpec()


def test_sodactl_flags_set_it():
    from soda.cli import specs
    data = specs.apply_overrides({"name": "web", "image": "busybox"}, peers=False,
                                 egress=("192.0.2.0/24:443",))
    assert model.parse_spec(data).network == model.NetworkSpec(False, (model.EgressRule("192.0.2.0/24", 443, 443),))
    untouched = specs.apply_overrides({"name": "web", "image": "busybox", "network": {"peers": False}})
    assert model.parse_spec(untouched).network.peers is False
