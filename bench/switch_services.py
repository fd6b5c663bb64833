#!/usr/bin/env python3
"""One Switch with many services: how long a resize takes to reach the
Switch's balancer, and what the Switch holds in memory.

Starts a real Master, `--agents` Agents on the fake driver (their virtual
nodes "run" without guests) and one soda-switch, as processes over mutual
TLS; creates `--services` services of `--vnodes` virtual nodes each, every
one with a listener of its own on loopback; waits until the Switch listens
for all of them. Then `--resizes` times: one service, picked in turn,
shrinks by one virtual node. The time measured is from the resize asked
(an upper bound of "after the Master commits it": the call's own round
trip is in it) to the Switch's log line that applies the
service's new endpoint set (the Switch logs every apply with the endpoints
it routes to, timestamped to the millisecond on the same clock); the
service grows back (not measured) before the next. Also the Switch's RSS
with everything listening, and its CPU time over the run.

    python bench/switch_services.py [--services 200] [--vnodes 5] [--resizes 100] [--json]

Needs no root. Everything it starts is stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.stats import summary  # noqa: E402
from soda import model  # noqa: E402
from tests.support import free_port, make_ext4_image  # noqa: E402
from tests.system.cluster import Cluster, wait_until  # noqa: E402

CAPACITY = "capacity: {cpu: 512, memory: 1048576, bandwidth: 10000000, disk: 100000000}\n"
APPLIED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*soda\.switch\.proxy: service (\S+): listen \S+, "
                     r"policy \S+, routing to (.*)$")


def applied_lines(path: str, offset: int) -> tuple[list[tuple[float, str, int]], int]:
    """(wall time, service, endpoints routed to) of the Switch's applies
    logged after byte `offset` of its log; and the new offset."""
    with open(path, errors="replace") as f:
        f.seek(offset)
        text = f.read()
        end = f.tell()
    out = []
    for line in text.splitlines():
        m = APPLIED.match(line)
        if m:
            when = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
            routed = 0 if m.group(4).startswith("nothing") else m.group(4).count("=")
            out.append((when, m.group(3), routed))
    return out, end


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--services", type=int, default=200)
    p.add_argument("--vnodes", type=int, default=5, help="virtual nodes per service")
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--resizes", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object last")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="soda-bench-switch-services-")
    c = Cluster(root)
    try:
        config = os.path.join(root, "agent.yaml")
        with open(config, "w") as f:
            f.write(CAPACITY)
        c.start_master()
        for i in range(args.agents):
            c.start_agent(f"node-{i}", "--config", config)
        switch = c.start_switch("--metrics-listen", "")
        wait_until(lambda: len(c.ready_nodes()) == args.agents, 60, what="the Agents to register")
        client = c.client()
        client.push_image(make_ext4_image(os.path.join(root, "img")), name="img")
        began = time.monotonic()
        for n in range(args.services):
            client.create_service(model.parse_spec({
                "name": f"s{n}", "image": "img", "nodes": args.vnodes, "port": 80,
                "resources": {"cpu": 0.01, "memory": 16, "bandwidth": 1, "disk": 16},
                "switch": {"listen": f"127.0.0.1:{free_port()}", "health": {"kind": "none"}}}))

        def all_routed() -> bool:
            lines, _ = applied_lines(c_log, 0)
            last = {}
            for _, service, routed in lines:
                last[service] = routed
            return len(last) == args.services and all(r == args.vnodes for r in last.values())
        c_log = os.path.join(root, "switch.log")
        wait_until(all_routed, 300, 0.5, what="the Switch routing to every virtual node")
        ready = time.monotonic() - began
        rss = rss_mib(switch.pid)
        cpu_before = cpu_seconds(switch.pid)
        if os.environ.get("PROFILE_PID_FILE"):
            with open(os.environ["PROFILE_PID_FILE"], "w") as f:
                f.write(f"{switch.pid} {[p.pid for k, p in c.procs.items() if k == 'master'][0]}\n")
        _, offset = applied_lines(c_log, 0)
        latencies = []
        for r in range(args.resizes):
            name = f"s{r % args.services}"
            asked = time.time()
            client.resize_service(name, nodes=args.vnodes - 1)
            seen: list[float] = []

            def shrunk() -> bool:
                nonlocal offset
                lines, offset = applied_lines(c_log, offset)
                seen.extend(when for when, service, routed in lines
                            if service == name and routed == args.vnodes - 1)
                return bool(seen)
            wait_until(shrunk, 30, 0.005, what=f"the Switch applying {name}'s resize")
            latencies.append(max(0.0, seen[0] - asked))
            client.resize_service(name, nodes=args.vnodes)

            def grown() -> bool:
                nonlocal offset
                lines, offset = applied_lines(c_log, offset)
                return any(service == name and routed == args.vnodes for _, service, routed in lines)
            wait_until(grown, 30, 0.01, what=f"{name} grown back")
        cpu = cpu_seconds(switch.pid) - cpu_before
        figures = {"services": args.services, "vnodes": args.services * args.vnodes,
                   "all_routed_s": round(ready, 2), "switch_rss_mib": round(rss, 1),
                   "switch_cpu_s_during_resizes": round(cpu, 2),
                   "resize_to_switch_ms": {k: round(v * 1000, 1) if k != "count" else v
                                           for k, v in summary(latencies).items()},
                   "resize_to_switch_p99_ms": round(sorted(latencies)[max(0, -(-99 * len(latencies) // 100) - 1)]
                                                    * 1000, 1)}
        f = figures["resize_to_switch_ms"]
        print(f"{args.services} services x {args.vnodes} virtual nodes: all routed {ready:.1f} s after the "
              f"first create; Switch RSS {rss:.1f} MiB")
        print(f"resize -> Switch's balancer: median {f['median']} ms, p95 {f['p95']} ms, "
              f"p99 {figures['resize_to_switch_p99_ms']} ms, min {f['min']} ms, max {f['max']} ms "
              f"over {f['count']} resizes; Switch CPU {cpu:.2f} s over them")
        if args.json:
            print(json.dumps(figures))
        return 0
    finally:
        c.close()


if __name__ == "__main__":
    sys.exit(main())
