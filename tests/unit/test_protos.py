"""The committed generated code must match protos/ (scripts/gen-protos)."""

import filecmp
import os
import subprocess
import sys

import pytest

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_generated_code_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is installed by scripts/setup ([dev])")
    subprocess.run([os.path.join(TOP, "scripts", "gen-protos"), str(tmp_path)], check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    generated = tmp_path / "soda" / "proto" / "v1"
    committed = os.path.join(TOP, "soda", "proto", "v1")
    names = sorted(p.name for p in generated.iterdir())
    assert names, "gen-protos produced nothing"
    match, mismatch, errors = filecmp.cmpfiles(str(generated), committed, names, shallow=False)
    assert not mismatch and not errors, f"stale generated code, run scripts/gen-protos: {mismatch + errors}"


def test_switch_and_on_demand_fields_survive_the_wire():
    from soda import model
    from soda.rpc import convert
    s = model.parse_spec({"name": "web", "image": "busybox", "nodes": 0,
                          "switch": {"listen": "127.0.0.1:9", "mode": "l4", "drain_seconds": 0,
                                     "health": {"kind": "http", "path": "/ok", "rise": 3}},
                          "on_demand": {"max_nodes": 2, "idle_seconds": 5}})
    assert convert.spec_from_pb(convert.spec_to_pb(s)) == s
    es = model.EndpointSet(service="web", switch=s.switch, on_demand=s.on_demand)
    assert convert.endpoints_from_pb(convert.endpoints_to_pb(es)) == es
    plain = model.parse_spec({"name": "web", "image": "busybox"})
    assert convert.spec_from_pb(convert.spec_to_pb(plain)) == plain
