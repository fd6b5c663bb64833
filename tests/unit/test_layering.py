"""The package boundaries, read from the source (ast), not from habit:

- the Master, Agent, Daemon and Switch never import one another (they meet
  only in soda.proto, soda.rpc, soda.model, soda.errors, soda.config and the
  other shared modules);
- grpc is imported only by soda/rpc/, the parts' api.py and main.py (and the
  generated soda/proto/);
- pyroute2 only by the modules that own netlink: soda/netlink.py,
  soda/routing.py, soda/agent/network.py, soda/daemon/tc.py.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

SODA = pathlib.Path(__file__).resolve().parents[2] / "soda"
PARTS = ("master", "agent", "daemon", "switch")
GRPC_ALLOWED = ("rpc/", "proto/", "master/api.py", "master/main.py", "agent/main.py",
                "daemon/api.py", "daemon/main.py", "switch/main.py")
PYROUTE2_ALLOWED = ("netlink.py", "routing.py", "agent/network.py", "daemon/tc.py")


def modules():
    for path in sorted(SODA.rglob("*.py")):
        yield path.relative_to(SODA).as_posix(), path


def imported(path: pathlib.Path) -> set[str]:
    """Every module name `path` imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def top(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize("rel, path", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_module_respects_the_boundaries(rel, path):
    names = imported(path)
    part = rel.split("/")[0] if "/" in rel else ""
    if part in PARTS:
        others = {n for n in names if n.startswith("soda.") and n.split(".")[1] in PARTS
                  and n.split(".")[1] != part}
        assert not others, f"soda/{rel} ({part}) imports another part: {sorted(others)}"
    if not rel.startswith(GRPC_ALLOWED):
        assert not {n for n in names if top(n) == "grpc" or n.startswith("grpc_")}, \
            f"soda/{rel} imports grpc: only soda/rpc/, */api.py and */main.py may"
    if not rel.startswith(PYROUTE2_ALLOWED):
        assert not {n for n in names if top(n) == "pyroute2"}, \
            f"soda/{rel} imports pyroute2: only {', '.join(PYROUTE2_ALLOWED)} may"


def test_the_check_sees_imports():
    # A check that finds nothing because it reads nothing would pass too.
    names = imported(SODA / "agent" / "network.py")
    assert "pyroute2" in names and "soda.netlink.NetlinkThread" in names
    assert len(list(modules())) > 50
