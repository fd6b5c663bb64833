#!/usr/bin/env python3
"""Many physical nodes: node-loss recovery, drain, and the Switch's
throughput to guests on other hosts against guests on its own host.

On a local cluster of N physical nodes (soda-devcluster's fabric layout:
each node a network namespace acting as a host, its Daemon and Agent
inside, real UML guests, routes between hosts from their watches of the
node list), in one run:

    loss        a service of 2N virtual nodes; per run, the host holding the
                most of them is lost (its Agent and Daemon SIGKILLed, its
                fabric link down): seconds from the loss until every virtual
                node is RUNNING elsewhere and healthy through the Switch
                (node_lost_seconds of it is the Master waiting for
                heartbeats); then the host comes back (link up, Daemon and
                Agent started): seconds until it is READY, which it is only
                once it has stopped its old guests
    drain       a service of N+1 virtual nodes; per run, `sodactl node drain
                --wait` of the host holding the most, under a client loop:
                seconds per virtual node moved, and failed requests
    throughput  wrk through the Switch to one guest (1 CPU) on another host
                (this cluster, routed over the fabric) and to one on the
                Switch's own host (a one-node cluster started after it,
                guest reached over the node's uplink veth): requests/s and
                latency, medians over rounds

    sudo .venv/bin/python bench/cluster.py [--nodes 3] [--runs 5] [--drains 3]
        [--node-lost-seconds 4] [--duration 5] [--rounds 3] [--json]

Everything it starts is taken down at the end, also on failure; traffic
stays on loopback and inside the namespaces the clusters made.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench.stats import p95  # noqa: E402
from switch import parse_wrk  # noqa: E402  (bench/switch.py)
from soda.devcluster import ClusterConfig  # noqa: E402
from tests.support import free_port  # noqa: E402
from tests.system.cluster import wait_until  # noqa: E402
from tests.system.guests import build_rootfs  # noqa: E402
from tests.system.multinode import ClientLoop, MultiNode, fabric_config  # noqa: E402


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "p95": round(p95(values), 3),
            "min": round(min(values), 3), "max": round(max(values), 3),
            "runs": [round(v, 3) for v in values]}


def busiest(mn: MultiNode, service: str) -> int:
    """The index of the host that holds the most of `service`."""
    placement = list(mn.placement(service).values())
    return max(mn.layout.hosts, key=lambda h: placement.count(h.name)).index


def loss_runs(mn: MultiNode, args) -> dict:
    name, count = "loss", 2 * args.nodes
    mn.create(name, [0.25] * count)
    recovery, back, failed = [], [], []
    for run in range(args.runs):
        index = busiest(mn, name)
        victim = mn.layout.host(index)
        others = {h.name for h in mn.layout.hosts if h is not victim}
        port = int(mn.json("service", "get", name)["switch"]["listen"].rsplit(":", 1)[1])
        with ClientLoop(port) as loop:
            time.sleep(0.5)
            began = time.monotonic()
            mn.cluster.lose_host(index)
            wait_until(lambda: mn.all_running_on(name, count, others) and mn.healthy_through_switch(name),
                       args.node_lost_seconds + 60, 0.05, what="replacements running and healthy")
            recovery.append(time.monotonic() - began)
        failed.append(len(loop.failures))
        began = time.monotonic()
        mn.cluster.restore_host(index)
        back.append(time.monotonic() - began)
        print(f"loss run {run + 1}: {victim.name} lost, recovered in {recovery[-1]:.2f} s "
              f"({failed[-1]} of {loop.sent} requests failed); back READY in {back[-1]:.2f} s",
              file=sys.stderr)
    mn.delete(name)
    return {"recovery_s": summary(recovery), "back_ready_s": summary(back), "failed_requests": failed}


def drain_runs(mn: MultiNode, args) -> dict:
    name, count = "drain", args.nodes + 1
    port = mn.create(name, [0.25] * count)
    per_vnode, failed, sent = [], [], []
    for run in range(args.drains):
        victim = mn.layout.host(busiest(mn, name))
        moving = sum(1 for node in mn.placement(name).values() if node == victim.name)
        with ClientLoop(port) as loop:
            time.sleep(0.5)
            began = time.monotonic()
            mn.ctl("node", "drain", victim.name, "--wait", "--timeout", "600")
            took = time.monotonic() - began
            time.sleep(0.5)
        per_vnode.append(took / moving)
        failed.append(len(loop.failures))
        sent.append(loop.sent)
        mn.ctl("node", "undrain", victim.name)
        print(f"drain run {run + 1}: {moving} virtual node(s) off {victim.name} in {took:.2f} s, "
              f"{failed[-1]} of {loop.sent} requests failed", file=sys.stderr)
    mn.delete(name)
    return {"s_per_vnode": summary(per_vnode), "failed_requests": failed, "requests": sent}


def throughput(mn: MultiNode, args, label: str) -> dict:
    port = mn.create(f"tp-{label}", [1.0], bandwidth=100)
    url = f"http://127.0.0.1:{port}/"
    runs = []
    for _ in range(args.rounds):
        out = subprocess.run(["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency", url],
                             capture_output=True, text=True, timeout=args.duration + 60, check=True).stdout
        runs.append(parse_wrk(out))
    mn.delete(f"tp-{label}")
    return {"rps": round(statistics.median(r["rps"] for r in runs), 1),
            "p50_ms": round(statistics.median(r["p50"] for r in runs), 2),
            "p99_ms": round(statistics.median(r["p99"] for r in runs), 2),
            "rps_runs": [r["rps"] for r in runs]}


def one_node_config(state_dir: str) -> ClusterConfig:
    tag = uuid.uuid4().hex[:6]
    return ClusterConfig(state_dir=state_dir, master_addr=f"127.0.0.1:{free_port()}", node="local-1",
                         netns=f"sodabl{tag}", cgroup_parent=f"soda-bl-{tag}",
                         cluster_cidr=f"10.{100 + int(tag, 16) % 100}.0.0/16",
                         switch_metrics=f"127.0.0.1:{free_port()}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3, help="physical nodes (default 3)")
    p.add_argument("--runs", type=int, default=5, help="node-loss runs (default 5)")
    p.add_argument("--drains", type=int, default=3, help="drain runs (default 3)")
    p.add_argument("--node-lost-seconds", type=float, default=4.0,
                   help="the Master's node_lost_seconds (default 4)")
    p.add_argument("--duration", type=float, default=5, help="seconds per wrk run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="wrk runs per path (default 3)")
    p.add_argument("--connections", type=int, default=8, help="wrk connections (default 8)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object last")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/cluster.py needs root (namespaces, TAPs, cgroups)")
    work = tempfile.mkdtemp(prefix="soda-bench-cluster-")
    result: dict = {"nodes": args.nodes, "node_lost_seconds": args.node_lost_seconds}
    began = time.monotonic()
    try:
        rootfs = build_rootfs(work)
        with MultiNode(fabric_config(os.path.join(work, "fabric"), nodes=args.nodes,
                                     node_lost_seconds=args.node_lost_seconds)) as mn:
            mn.push(rootfs)
            result["throughput_other_host"] = throughput(mn, args, "remote")
            result["loss"] = loss_runs(mn, args)
            result["drain"] = drain_runs(mn, args)
        with MultiNode(one_node_config(os.path.join(work, "local"))) as local:
            local.push(rootfs)
            result["throughput_own_host"] = throughput(local, args, "local")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["throughput_other_vs_own"] = round(result["throughput_other_host"]["rps"]
                                              / result["throughput_own_host"]["rps"], 3)
    result["wall_s"] = round(time.monotonic() - began, 1)
    loss, drain = result["loss"], result["drain"]
    print(f"node loss -> all replacements RUNNING and healthy: median {loss['recovery_s']['median']} s, "
          f"p95 {loss['recovery_s']['p95']} s (node_lost_seconds {args.node_lost_seconds}); back READY "
          f"median {loss['back_ready_s']['median']} s")
    print(f"drain: median {drain['s_per_vnode']['median']} s per virtual node; failed requests "
          f"{drain['failed_requests']}")
    print(f"Switch -> guest on another host: {result['throughput_other_host']['rps']} req/s "
          f"(p50 {result['throughput_other_host']['p50_ms']} ms); on its own host: "
          f"{result['throughput_own_host']['rps']} req/s (p50 {result['throughput_own_host']['p50_ms']} ms)")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
