#!/usr/bin/env python3
"""Deploy on first request: how long the first client of a service resting
at zero virtual nodes waits (held by the Switch → served by a guest booted
for it), beside the first client of a service resting with a warm pool
(held → a frozen guest thawed → served) and a warm request to a running
guest, in one run.

Starts a real cluster (Master, Daemon, Agent, Switch as processes, one
physical node with real User-Mode Linux guests, as tests/system/guests.py
does; SODA's guest kernel when built), creates a service with
`--on-demand 1 --idle-seconds S`, and repeats: one HTTP request through the
Switch while the service is at zero (cold), then `--warm` requests to the
guest it started (warm), then waits until the Switch has sent the service
back to zero and the guest process is gone. Also times bursts of `--burst`
concurrent first clients (each one's whole wait; one guest serves them all).
Then a second service with `--warm 1` (a pool of one frozen guest, `idle:
freeze`), `--runs` times: a first request while its guest is FROZEN, and
back to FROZEN once idle; the guest's pid must stay the same (thawed, never
booted again). Prints median, p95, min and max of each. Times are from
connect to the last byte of the answer, measured by this script.

    python bench/ondemand.py [--runs 7] [--warm 20] [--burst 10] [--burst-runs 3]
                             [--idle-seconds 1] [--memory 32] [--no-pool] [--keep-logs]

Run it alone: `flock /tmp/soda-bench.lock python bench/ondemand.py`.
Needs root (namespaces, TAPs, cgroups). Everything it creates goes at the
end, also on failure; it signals only the guests its Agent recorded.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soda.hypervisors.kernels import find_uml_kernel  # noqa: E402
from tests.support import free_port  # noqa: E402
from tests.system.cluster import Cluster, wait_until  # noqa: E402
from tests.system.guests import alive, build_rootfs, guest_records, uml_node  # noqa: E402

SERVICE = "ondemand-bench"
POOLED = "ondemand-pool"
REQUEST_TIMEOUT = 60.0


def get(port: int) -> tuple[bytes, float]:
    """One HTTP/1.0 request through the Switch: (answer, seconds)."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    if b"SODA virtual node" not in answer:
        raise RuntimeError(f"unexpected answer through the Switch: {answer[:200]!r}")
    return answer, time.perf_counter() - started


def at_zero(c: Cluster, pids: set[int]) -> bool:
    return c.json("service", "get", SERVICE)["vnodes"] == [] and not any(alive(p) for p in pids)


def listening(port: int) -> bool:
    # Look at the listener without connecting: a connection would deploy.
    with open("/proc/net/tcp") as f:
        return any(line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A"
                   for line in f.readlines()[1:])


def host_routes(subnet: str) -> int:
    """How many host routes lead to `subnet`: more than one means another
    cluster (another test's namespace) uses the same range right now, and
    the Switch's packets may go there instead of to this run's guests."""
    out = subprocess.run(["ip", "-j", "route", "show", subnet], capture_output=True, text=True).stdout
    return len(json.loads(out or "[]"))


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))]


def summary(label: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (f"{label:<44} median {statistics.median(ms):8.1f} ms   p95 {p95(ms):8.1f}   "
            f"min {min(ms):8.1f}   max {max(ms):8.1f}   (n={len(ms)})")


def phases(c: Cluster, service: str) -> list[str]:
    return [v["phase"] for v in c.json("service", "get", service)["vnodes"]]


def pool_runs(c: Cluster, args: argparse.Namespace, failed: list[str]) -> list[float]:
    """First requests to a service resting with a warm pool of one."""
    port = free_port()
    c.ctl("service", "create", POOLED, "--image", "busybox-httpd", "--hypervisor", "uml",
          "--cpu", "0.5", "--memory", str(args.memory), "--on-demand", "1", "--warm", "1",
          "--idle-seconds", str(args.idle_seconds), "--switch", f"127.0.0.1:{port}")
    wait_until(lambda: listening(port), 30, what="the Switch to listen")
    out = []
    pid = 0
    for i in range(args.runs):
        wait_until(lambda: phases(c, POOLED) == ["FROZEN"], 120, interval=0.05,
                   what="the pool's guest to be FROZEN")
        records = guest_records(c)
        record = records.get(f"{POOLED}-0") or {}
        c.guest_pids.update(r["pid"] for r in records.values())
        if pid and record.get("pid") != pid:
            raise RuntimeError(f"the pool's guest was booted again (pid {pid} -> {record.get('pid')})")
        pid = record["pid"]
        try:
            _, first = get(port)
        except (RuntimeError, OSError) as exc:
            failed.append(f"pool run {i + 1}: {exc}")
            print(f"  pool run {i + 1}: first request FAILED: {exc}", file=sys.stderr)
            continue
        out.append(first)
        print(f"  pool run {i + 1}: first request (thawed) {first * 1000:7.1f} ms", file=sys.stderr)
        # Idle again: the Switch asks for the idle state, the guest freezes.
        wait_until(lambda: phases(c, POOLED) == ["RUNNING"], 30, interval=0.02,
                   what="the thawed guest to be RUNNING")
    c.ctl("service", "delete", POOLED, "--wait", "--timeout", "60")
    return out


def run(args: argparse.Namespace, work: str) -> None:
    image = build_rootfs(work)
    cluster = Cluster(os.path.join(work, "cluster"))
    os.makedirs(cluster.root, exist_ok=True)
    with uml_node(cluster, image) as c:
        port = free_port()
        c.ctl("service", "create", SERVICE, "--image", "busybox-httpd", "--hypervisor", "uml",
              "--cpu", "0.5", "--memory", str(args.memory), "--on-demand", "1",
              "--idle-seconds", str(args.idle_seconds), "--switch", f"127.0.0.1:{port}")
        wait_until(lambda: listening(port), 30, what="the Switch to listen")
        cold, warm, burst_max, burst_all = [], [], [], []
        subnet = c.json("node", "list")[0]["subnet"]
        shared = 0
        failed: list[str] = []
        pids: set[int] = set()

        def back_to_zero():
            c.guest_pids.update(pids)
            wait_until(lambda: at_zero(c, pids), 60, interval=0.1, what="the service to go back to zero")

        for i in range(args.runs):
            shared += host_routes(subnet) > 1
            try:
                _, first = get(port)
            except (RuntimeError, OSError) as exc:
                failed.append(f"run {i + 1}: {exc}")
                print(f"  run {i + 1}: first request FAILED: {exc}", file=sys.stderr)
                back_to_zero()
                continue
            records = guest_records(c)
            pids.update(r["pid"] for r in records.values())
            if len(records) != 1:
                raise RuntimeError(f"expected one guest after the first request, found {sorted(records)}")
            these = [get(port)[1] for _ in range(args.warm)]
            cold.append(first)
            warm.extend(these)
            print(f"  run {i + 1}: first request {first * 1000:7.1f} ms, warm median "
                  f"{statistics.median(these) * 1000:5.2f} ms", file=sys.stderr)
            back_to_zero()
        for i in range(args.burst_runs):
            shared += host_routes(subnet) > 1
            with concurrent.futures.ThreadPoolExecutor(args.burst) as pool:
                times = [t for _, t in pool.map(lambda _: get(port), range(args.burst))]
            records = guest_records(c)
            pids.update(r["pid"] for r in records.values())
            if len(records) != 1:
                raise RuntimeError(f"{args.burst} first clients started {len(records)} guests")
            burst_max.append(max(times))
            burst_all.extend(times)
            print(f"  burst {i + 1}: {args.burst} concurrent first clients, slowest {max(times) * 1000:7.1f} ms",
                  file=sys.stderr)
            back_to_zero()
        pooled = [] if args.no_pool else pool_runs(c, args, failed)
        kernel = find_uml_kernel()
        print(f"\nDeploy on first request: UML guest ({kernel.kind} kernel, "
              f"{args.memory} MiB), one physical node, idle_seconds {args.idle_seconds}")
        print(summary("first request (held -> served)", cold))
        if pooled:
            print(summary("first request, warm pool (thawed -> served)", pooled))
        print(summary("warm request (same guest)", warm))
        if burst_all:
            print(summary(f"{args.burst} concurrent first clients, each", burst_all))
            print(summary(f"{args.burst} concurrent first clients, slowest", burst_max))
        print(f"first / warm (medians): {statistics.median(cold) / statistics.median(warm):.0f}x")
        if failed:
            print(f"FAILED first requests: {len(failed)} of {args.runs}: " + "; ".join(failed))
        if shared:
            print(f"warning: in {shared} run(s) another cluster on this host routed {subnet} too: "
                  "those figures may include its traffic or lost packets")
        if args.json:
            def ms(values):
                return {"median_ms": round(statistics.median(values) * 1000, 1),
                        "p95_ms": round(p95(values) * 1000, 1),
                        "min_ms": round(min(values) * 1000, 1), "max_ms": round(max(values) * 1000, 1),
                        "n": len(values)} if values else None
            print(json.dumps({"first_request": ms(cold), "first_request_warm_pool": ms(pooled),
                              "warm_request": ms(warm),
                              "burst_each": ms(burst_all), "burst_slowest": ms(burst_max),
                              "failed_first_requests": len(failed), "shared_route_runs": shared}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7, help="cold starts of one client")
    p.add_argument("--warm", type=int, default=20, help="warm requests after each cold start")
    p.add_argument("--burst", type=int, default=10, help="concurrent first clients of a burst")
    p.add_argument("--burst-runs", type=int, default=3)
    p.add_argument("--idle-seconds", type=float, default=1.0)
    p.add_argument("--memory", type=int, default=32, help="MiB of each guest")
    p.add_argument("--no-pool", action="store_true", help="skip the warm-pool service")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (path on stderr)")
    p.add_argument("--json", action="store_true",
                   help="print the figures as one JSON object on the last line")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/ondemand.py needs root (network namespace, TAPs, cgroups)", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="soda-bench-ondemand-")
    try:
        run(args, work)
    finally:
        if args.keep_logs:
            print(f"logs in {os.path.join(work, 'cluster')}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
