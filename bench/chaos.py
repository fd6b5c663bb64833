#!/usr/bin/env python3
"""Chaos and soak: SODA's processes killed with SIGKILL at random moments
while services are created, resized and deleted and clients keep calling
two untouched services through the Switch; then a long create/delete soak
that watches the Master's and the Agent's memory and descriptors.

Starts a local cluster (soda.devcluster: Master, Daemon, Agent, Switch as
supervised processes, restarted with backoff as systemd's
Restart=on-failure would) with real User-Mode Linux guests at 32 MiB
(SODA's guest kernel when built) and the reference image
(scripts/build-rootfs). The harness is tests/system/chaos.py: its docstring
says what each round does, what is checked after it (from /proc, the cgroup
tree, `ip`, `nft` and `sodactl -o json`, never from the code under test)
and what a kill may legitimately affect (only a Switch kill touches client
traffic; those failures are counted apart).

    python bench/chaos.py [--rounds 50] [--soak 500] [--soak-sample-at 50] [--seed N]
                          [--memory 32] [--settle-timeout 60] [--keep-logs DIR] [--json]

Prints one line per round (which part was killed, when in the churn, how
long until it was back and the cluster settled, anything found wrong), the
failed requests to untouched services, the soak's samples, and a summary;
with --json the figures as one JSON object on the last line. Exits 1 if any
virtual node was lost or doubled, anything leaked, a client of an untouched
service saw a failure outside the Switch's restarts, or the Master's or the
Agent's RSS or descriptors moved by 10 % or more between the soak's samples.

Run it alone (`flock /tmp/soda-bench.lock python bench/chaos.py`): it
takes about 10 s a round and 3-4 s a soak cycle on two cores. Needs root
(namespaces, TAPs, cgroups, nftables). Everything it creates goes at the
end, also on failure; it signals only processes the launcher or the Agent
recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.system.chaos import (PARTS, STEADY, ChaosCluster, Settings, failure_report, make_work_dir,  # noqa: E402
                                run_chaos)
from tests.system.guests import build_rootfs  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=50, help="chaos rounds, one kill each (default 50)")
    p.add_argument("--soak", type=int, default=500, metavar="N",
                   help="create/delete cycles of a 3-node service after the rounds (default 500; 0: none)")
    p.add_argument("--soak-sample-at", type=int, default=50, metavar="CYCLE",
                   help="the cycle whose RSS and descriptors the last one is compared with (default 50)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a new one, printed)")
    p.add_argument("--memory", type=int, default=32, help="guest memory, MiB (default 32)")
    p.add_argument("--settle-timeout", type=float, default=60.0,
                   help="seconds the cluster gets to settle after each kill (default 60)")
    p.add_argument("--keep-logs", metavar="DIR", help="copy the parts' logs there at the end")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    args = p.parse_args(argv)
    if args.rounds < 0 or args.soak < 0 or args.soak_sample_at < 1:
        p.error("--rounds and --soak must not be negative, --soak-sample-at must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/chaos.py needs root (namespaces, TAPs, cgroups, nftables)", file=sys.stderr)
        return 1
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings(rounds=args.rounds, seed=seed, memory=args.memory,
                        settle_timeout=args.settle_timeout, soak_cycles=args.soak,
                        soak_sample_at=args.soak_sample_at)
    print(f"chaos: {args.rounds} rounds, soak {args.soak} cycles, seed {seed}", flush=True)

    def log(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    work = make_work_dir("soda-bench-chaos-")
    cluster = None
    result = None
    try:
        image = build_rootfs(work)
        cluster = ChaosCluster(work, image, memory=args.memory, log=log)
        cluster.up()
        result = run_chaos(cluster, settings, each_part_once=args.rounds >= len(PARTS), log=log)
    finally:
        if cluster is not None:
            if args.keep_logs:
                shutil.copytree(cluster.cluster.log_dir, args.keep_logs, dirs_exist_ok=True)
            left = cluster.close()
            if result is not None:
                result.left_after_down = left
        shutil.rmtree(work, ignore_errors=True)

    figures = {"seed": seed, **result.figures()}
    print()
    print(f"rounds: {figures['rounds']}, kills: " + ", ".join(f"{p} {n}" for p, n in figures["kills"].items()))
    print("restarted after SIGKILL (median s): " +
          ", ".join(f"{p} {v}" for p, v in figures["restart_seconds_median"].items()))
    print("serving again after SIGKILL (median s): " +
          ", ".join(f"{p} {v}" for p, v in figures["serving_again_seconds_median"].items()))
    req = figures["requests"]
    print(f"requests: {req['total']}, failed {req['failed']}: {req['failed_switch_down']} while the Switch "
          f"was down (window median {figures['switch_down_seconds']['median']} s, max "
          f"{figures['switch_down_seconds']['max']} s), {req['failed_untouched']} to untouched nodes")
    for name, svc in req["per_service"].items():
        print(f"  {name}: {svc['total']} requests, {svc['failed']} failed "
              f"({svc['failed_switch_down']} while the Switch was down), answered by {svc['answered_by']}")
    for name, mode in STEADY.items():
        offsets = result.switch_down_offsets(name)
        if offsets:
            print(f"  {name} ({mode}): failed requests began {', '.join(f'{o:+.2f}' for o in offsets[:40])}"
                  f"{' ...' if len(offsets) > 40 else ''} s after their Switch kill")
    for line in failure_report(result):
        print(f"  failed outside the Switch's restarts: {line}")
    print(f"lost vnodes {figures['lost_vnodes']}, doubled {figures['doubled_vnodes']}, untouched restarted "
          f"{figures['restarted_untouched_vnodes']}, leaks {figures['leaks']}, state mismatches "
          f"{figures['state_mismatches']}, rounds not settled {figures['rounds_not_settled']}, "
          f"left after down {figures['left_after_down']}")
    for problem in result.problems():
        print(f"  {problem}")
    for item in result.left_after_down:
        print(f"  left after down: {item}")
    soak = figures.get("soak") or {}
    if soak:
        for part in ("master", "agent"):
            s = soak[part]
            print(f"soak {part}: RSS {s['rss_kib'][0]} -> {s['rss_kib'][1]} KiB ({s['rss_drift_pct']:+.1f} %), "
                  f"fds {s['fds'][0]} -> {s['fds'][1]} ({s['fds_drift_pct']:+.1f} %), cycles "
                  f"{soak['sample_at']} -> {soak['cycles']}")
    print(f"took {figures['seconds']:.0f} s")
    if args.json:
        figures["soak"] = {k: v for k, v in soak.items() if k != "series"}
        print(json.dumps(figures))
    drifted = [part for part in ("master", "agent") if soak and
               max(abs(soak[part]["rss_drift_pct"]), abs(soak[part]["fds_drift_pct"])) >= 10.0]
    bad = (figures["lost_vnodes"] or figures["doubled_vnodes"] or figures["leaks"] or req["failed_untouched"]
           or figures["restarted_untouched_vnodes"] or figures["left_after_down"] or drifted
           or soak.get("problems"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
