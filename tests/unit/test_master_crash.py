"""A Master killed (SIGKILL) at each step of a mutation's unit of work
leaves the state store with the mutation whole or absent, never half done.

Each case runs the Controller over a copy of one prepared state in its own
process (tests/unit/crashing_master.py), whose store hook kills it at step k:
each write, the commit, just after the commit. The test then opens the
store as the restarted Master would, compares it with the state before and
after the mutation (as a run that is not killed reports them), and checks
the invariants every committed state keeps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from soda.master.controller import READY
from soda.master.store import open_store, revision_of
from tests.fakes import FakeClock
from tests.unit import crashing_master as crashing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_invariants(store) -> None:
    """What every committed state keeps, whatever was cut short."""
    nodes = {n.name: n for n in store.list_nodes()}
    top = store.revision()
    for record in [*store.list_services(), *store.list_vnodes(), *nodes.values(), *store.list_images()]:
        assert 0 < revision_of(record) <= top, record
    for service in store.list_services():
        # A deleting service goes with its last virtual node, and every one
        # of its virtual nodes is deleting too.
        assert not service.deleting or (service.vnodes and all(v.deleting for v in service.vnodes)), service
    for v in store.list_vnodes():
        # Nothing stays on a lost node (it is placed again or waits
        # unplaced), and a deleting one that nobody runs is gone at once.
        assert not v.node or nodes[v.node].state == READY, v
        assert v.node or not v.deleting, v



@pytest.fixture(scope="module")
def masters():
    """Runs a case in a forked Master process; returns its exit code."""
    server = subprocess.Popen([sys.executable, "-c", "from tests.unit.crashing_master import serve; serve()"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(state_dir: str, scenario: str, kill_at: int = 1 << 30, told: str = "/dev/null") -> int:
        server.stdin.write(json.dumps({"state_dir": state_dir, "scenario": scenario, "kill_at": kill_at,
                                       "told": told}) + "\n")
        server.stdin.flush()
        return int(server.stdout.readline())
    yield run
    server.stdin.close()
    server.wait(10)


@pytest.mark.parametrize("scenario", sorted(crashing.SCENARIOS))
def test_a_master_killed_at_any_step_of_a_mutation_leaves_it_whole_or_absent(prepared, masters, tmp_path,
                                                                               scenario):
    whole, told = str(tmp_path / "whole"), str(tmp_path / "told.json")
    shutil.copytree(prepared, whole)
    assert masters(whole, scenario, told=told) == 0
    with open(told) as f:
        told = json.load(f)
    steps, before, after = told["steps"], told["before"], told["after"]
    assert before != after
    # One unit of work: every write, then a single commit.
    assert steps[-2:] == ["commit", "committed"] and all(s.startswith("write ") for s in steps[:-2])
    assert len(steps) > 3 or scenario == "back"
    for k, step in enumerate(steps):
        state_dir = str(tmp_path / f"killed-{k}")
        shutil.copytree(prepared, state_dir)
        assert masters(state_dir, scenario, k) == -signal.SIGKILL, step
        store = open_store(state_dir)         # as the restarted Master finds it
        try:
            check_invariants(store)
            expected = after if step == "committed" else before
            assert crashing.dump(store) == expected, f"{scenario}: killed at {step!r} (step {k})"
        finally:
            store.close()


def test_the_prepared_state_has_what_the_scenarios_need(prepared, tmp_path):
    """Guards the cases above against testing less than they say."""
    state_dir = str(tmp_path / "m")
    shutil.copytree(prepared, state_dir)
    clock = FakeClock(2000.0)
    ctl = crashing.controller(state_dir, clock)
    crashing.lose_c(ctl, clock)
    assert ctl.check_membership() == ["c"]
    assert sorted(v.name for v in ctl.store.list_vnodes() if not v.node) == ["api-2", "web-2"]
    ctl.delete_service("web")
    assert {v.name for v in ctl.store.get_service("web").vnodes} == {"web-0", "web-1"}
    crashing.report(ctl, "b", {"web-1": crashing.model.Phase.STOPPED}, complete=False)
    crashing.report(ctl, "a", {"web-0": crashing.model.Phase.STOPPED, "api-0": crashing.model.Phase.RUNNING})
    assert [s.name for s in ctl.store.list_services()] == ["api"]
    check_invariants(ctl.store)
    ctl.store.close()
