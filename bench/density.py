#!/usr/bin/env python3
"""Density: what an idle virtual node costs, for N = 10, 50, 100 guests.

Starts a real cluster (Master, Daemon, Agent, Switch as processes, as
tests/system/guests.py does; the UML driver with SODA's own kernel when it
is built), then for each N creates one service of N virtual nodes with
`sodactl service create --nodes N --wait` and prints:

- how long N took to become ready (from the request until --wait returned
  with all N RUNNING) and the Agent's boot times (median, max);
- memory per guest: `memory.usage_in_bytes` of each virtual node's memory
  cgroup (the Daemon's; guest RAM the guest touched plus the VMM), read
  after the guests have idled `--settle` seconds;
- idle CPU per guest: the growth of each virtual node's `cpuacct.usage`
  over a `--window` second window, as a share of one core;

then deletes the service (--wait) before the next N. The figures are read
from the kernel's own counters, not from SODA. Everything it creates goes
at the end, also on failure; it signals only pids its Agent recorded.

    python bench/density.py [--counts 10,50,100] [--memory 32] [--window 10] [--settle 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soda.hypervisors.kernels import find_uml_kernel  # noqa: E402
from tests.system.cluster import Cluster  # noqa: E402
from tests.system.guests import build_rootfs, cgroup_file, guest_records, read, uml_node  # noqa: E402

MIB = 1024 * 1024


def counters(c, vnodes: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """(memory usage in bytes, cpuacct usage in ns) of each virtual node's cgroups."""
    memory = {v: int(read(cgroup_file(c, "memory", v, "memory.usage_in_bytes"))) for v in vnodes}
    cpu = {v: int(read(cgroup_file(c, "cpuacct", v, "cpuacct.usage"))) for v in vnodes}
    return memory, cpu


def one_count(c, n: int, args) -> dict:
    name = f"dense{n}"
    began = time.monotonic()
    c.ctl("service", "create", name, "--image", "busybox-httpd", "--hypervisor", "uml",
          "--nodes", str(n), "--memory", str(args.memory), "--cpu", "0.01", "--bandwidth", "1",
          "--disk", "16", "--wait", "--timeout", str(60 + 3 * n), timeout=120 + 3 * n)
    ready = time.monotonic() - began
    try:
        c.guest_pids.update(r["pid"] for r in guest_records(c).values())
        svc = c.json("service", "get", name)
        phases = {v["phase"] for v in svc["vnodes"]}
        if phases != {"RUNNING"}:
            raise RuntimeError(f"{name}: --wait returned with phases {sorted(phases)}")
        vnodes = [v["name"] for v in svc["vnodes"]]
        boots = [v.get("boot_seconds", 0.0) for v in svc["vnodes"]]
        time.sleep(args.settle)
        memory, cpu0 = counters(c, vnodes)
        t0 = time.monotonic()
        time.sleep(args.window)
        _, cpu1 = counters(c, vnodes)
        elapsed = time.monotonic() - t0
        share = {v: (cpu1[v] - cpu0[v]) / 1e9 / elapsed for v in vnodes}
        return {
            "n": n, "ready": ready, "boot_median": statistics.median(boots), "boot_max": max(boots),
            "mem_median": statistics.median(memory.values()) / MIB,
            "mem_max": max(memory.values()) / MIB, "mem_total": sum(memory.values()) / MIB,
            "cpu_median": 100 * statistics.median(share.values()),
            "cpu_mean": 100 * statistics.mean(share.values()),
            "cpu_total": 100 * sum(share.values()),
        }
    finally:
        c.ctl("service", "delete", name, "--wait", "--timeout", str(60 + n), timeout=120 + n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="10,50,100", help="comma list of N")
    p.add_argument("--memory", type=int, default=32, help="guest memory, MiB")
    p.add_argument("--window", type=float, default=10.0, help="idle CPU window, seconds")
    p.add_argument("--settle", type=float, default=3.0, help="idle time before measuring, seconds")
    p.add_argument("--json", action="store_true",
                   help="print the figures as one JSON object on the last line")
    args = p.parse_args()
    counts = [int(x) for x in args.counts.split(",") if x.strip()]
    if os.geteuid() != 0:
        print("bench/density.py needs root (namespaces, TAPs, cgroups)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="soda-bench-density-")
    cluster = Cluster(work)
    rows = []
    try:
        rootfs = build_rootfs(work)
        kernel = find_uml_kernel()
        with uml_node(cluster, rootfs) as c:
            for n in counts:
                row = one_count(c, n, args)
                rows.append(row)
                print(f"  N={n}: ready {row['ready']:.2f} s, {row['mem_median']:.1f} MiB and "
                      f"{row['cpu_median']:.3f} % of a core per guest", file=sys.stderr)
        print(f"density: idle UML guests, {kernel.path} ({kernel.kind}), mem={args.memory}M, "
              f"one physical node ({os.cpu_count()} cores); memory after {args.settle:g} s idle, "
              f"CPU over {args.window:g} s")
        print(f"  {'N':>4s} {'ready':>8s} {'boot med':>9s} {'boot max':>9s} {'MiB/guest':>10s} "
              f"{'max':>7s} {'MiB total':>10s} {'%core/guest':>12s} {'%core total':>12s}")
        for r in rows:
            print(f"  {r['n']:4d} {r['ready']:7.2f}s {r['boot_median']:8.2f}s {r['boot_max']:8.2f}s "
                  f"{r['mem_median']:10.1f} {r['mem_max']:7.1f} {r['mem_total']:10.0f} "
                  f"{r['cpu_median']:12.3f} {r['cpu_total']:12.2f}")
        if args.json:
            print(json.dumps({"kernel": kernel.kind, "memory_mib": args.memory,
                              "counts": [{k: (round(v, 4) if isinstance(v, float) else v)
                                          for k, v in r.items()} for r in rows]}))
        return 0
    finally:
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
