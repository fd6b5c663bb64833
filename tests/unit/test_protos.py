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
