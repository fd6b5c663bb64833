"""Chaos, short: every SODA process (Master, Agent, Daemon, Switch) is
killed with SIGKILL at least once, at a random moment of a service's
create, resize or delete, while clients call two untouched services
through the Switch; after each kill the launcher's supervision starts it
again and the cluster must settle to exactly what the Master wants: no
virtual node lost or running twice, no untouched guest started again,
nothing leaked (cgroups, links, neighbour entries, guest dirs, listeners,
nft maps, processes), no failed request to an untouched service except
while the Switch itself was down, and none through its kernel path. Then a short create/delete soak whose
open descriptors must not grow. The harness, and how each thing is read
from outside the code under test, is tests/system/chaos.py; bench/chaos.py
runs the long version.

The seed is printed; SODA_CHAOS_SEED=N replays a run's choices (which part,
when) though not its timing.
"""

import json
import os
import random

import pytest

from tests.system.chaos import PARTS, STEADY, ChaosCluster, Settings, failure_report, run_chaos
from tests.system.guests import require_guest_support
from tests.support import reachable_tmp_dir

pytestmark = [pytest.mark.cluster, pytest.mark.root, pytest.mark.guest]

require_guest_support()

ROUNDS = 5                  # the first four kill each part once, in random order; bench/chaos.py runs more
SOAK_CYCLES = 14
SOAK_SAMPLE_AT = 5


@pytest.fixture
def work_dir():
    """The cluster's state: guests' uids must reach it."""
    with reachable_tmp_dir("soda-test-chaos-") as path:
        yield path


def test_killed_parts_come_back_and_the_cluster_settles_to_its_desired_state(work_dir, rootfs):
    seed = int(os.environ.get("SODA_CHAOS_SEED") or random.randrange(1 << 31))
    print(f"seed {seed}")
    c = ChaosCluster(work_dir, rootfs, log=print)
    result = None
    try:
        c.up()
        result = run_chaos(c, Settings(rounds=ROUNDS, seed=seed, soak_cycles=SOAK_CYCLES,
                                       soak_sample_at=SOAK_SAMPLE_AT, settle_timeout=45.0, max_seconds=400.0),
                           each_part_once=True)
    finally:
        left = c.close()
    figures = result.figures()
    print(json.dumps(figures))

    assert all(figures["kills"][part] >= 1 for part in PARTS), figures["kills"]
    problems = "\n".join(str(p) for p in result.problems())
    assert not problems, f"found wrong after the kills:\n{problems}"
    assert result.doubled == {}
    assert failure_report(result) == []
    assert left == []
    # Every part came back after each kill and served again.
    assert all(r.kill.restarted_after < 10 for r in result.rounds)
    assert all(r.kill.serving_at is not None for r in result.rounds)
    # The clients kept being answered by every untouched virtual node.
    for name, svc in figures["requests"]["per_service"].items():
        assert len(svc["answered_by"]) == 2 and min(svc["answered_by"].values()) > 20, (name, svc)
    # The kernel path forwards while its Switch is down: a restarted Switch
    # takes the nft table over as it finds it.
    l4 = [name for name, path in STEADY.items() if path == "l4"]
    assert all(figures["requests"]["per_service"][name]["failed"] == 0 for name in l4), figures["requests"]
    soak = figures["soak"]
    assert soak["problems"] == []
    # Twenty cycles say little about memory (bench/chaos.py measures 500),
    # but a descriptor per service or per virtual node shows at once.
    for part in ("master", "agent"):
        assert abs(soak[part]["fds"][1] - soak[part]["fds"][0]) <= 2, (part, soak[part])
