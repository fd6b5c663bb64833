#!/usr/bin/env python3
"""Performance isolation, the paper's scenario: a CPU-bound, an I/O-bound
and a web virtual node side by side on one physical node (every guest
confined to one core, so they really compete), each a real UML guest.

Prints, for one run, the web node's response time (p50/p99 over sequential
GET /) while its neighbours are loaded, twice on the same guests:

  isolated    shares per the spec: web 1.0 core, cpu-hog 0.25, io 0.25 with
              10 Mbit/s both ways
  unisolated  all equal: 0.5 core each, 300 Mbit/s (the same guests, changed
              live with `sodactl service resize`)

plus the CPU split measured from cpuacct and the I/O node's measured
bandwidth against its limit. Traffic goes only to guests inside the
namespace this script creates; everything is torn down at the end.

    sudo python bench/isolation.py [--requests 300] [--window 8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.system.cluster import Cluster  # noqa: E402
from tests.system.guests import build_rootfs, cgroup_file, guest_records, read, uml_node  # noqa: E402

LOAD = {
    # Keeps the guest's CPU busy, burn after burn.
    "cpu": "import urllib.request as u\nwhile True: u.urlopen('http://{addr}/cgi-bin/burn?seconds=5', timeout=60).read()",
    # Moves data both ways, transfer after transfer.
    "io": ("import urllib.request as u\nblob = bytes(2_000_000)\nwhile True:\n"
           "    u.urlopen('http://{addr}/cgi-bin/send?bytes=2000000', timeout=120).read()\n"
           "    u.urlopen(u.Request('http://{addr}/cgi-bin/recv', data=blob), timeout=120).read()"),
}
WEB = """
import json, time, urllib.request as u
out = []
for _ in range({n}):
    t = time.perf_counter()
    u.urlopen('http://{addr}/', timeout=30).read()
    out.append(time.perf_counter() - t)
print(json.dumps(out))
"""
RATE = """
import time, urllib.request as u
t = time.perf_counter(); r = u.urlopen('http://{addr}/cgi-bin/send?bytes=3000000', timeout=120)
r.read(1); t = time.perf_counter(); n = 1 + len(r.read())
print(n * 8 / (time.perf_counter() - t) / 1e6)
"""

ISOLATED = {"web": ("1.0", "300"), "hog": ("0.25", "300"), "io": ("0.25", "10")}
UNISOLATED = {"web": ("0.5", "300"), "hog": ("0.5", "300"), "io": ("0.5", "300")}


def in_netns(netns, code, **fmt):
    return ["ip", "netns", "exec", netns, sys.executable, "-c", code.format(**fmt)]


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def phase(c, name, settings, addr, args):
    for svc, (cpu, bw) in settings.items():
        c.ctl("service", "resize", svc, "--cpu", cpu, "--bandwidth", bw, timeout=60)
    time.sleep(1.0)                           # the Agent applies them live
    loads = [subprocess.Popen(in_netns(c.netns, LOAD[kind], addr=addr[svc]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for svc, kind in (("hog", "cpu"), ("io", "io"))]
    try:
        time.sleep(2.0)                       # warm-up: both neighbours busy
        vnodes = ("web-0", "hog-0", "io-0")
        before = {v: int(read(cgroup_file(c, "cpuacct", v, "cpuacct.usage"))) for v in vnodes}
        web = subprocess.run(in_netns(c.netns, WEB, addr=addr["web"], n=args.requests),
                             capture_output=True, text=True, check=True, timeout=600)
        used = {v: int(read(cgroup_file(c, "cpuacct", v, "cpuacct.usage"))) - before[v] for v in vnodes}
    finally:
        for proc in loads:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    times = json.loads(web.stdout)
    total = sum(used.values()) or 1
    rates = [float(subprocess.run(in_netns(c.netns, RATE, addr=addr["io"]), capture_output=True,
                                  text=True, check=True, timeout=120).stdout) for _ in range(3)]
    print(f"{name:11s} web p50 {1000 * percentile(times, 50):7.1f} ms  p99 {1000 * percentile(times, 99):7.1f} ms"
          f"  ({len(times)} requests)")
    print(f"{'':11s} cpu split  " + "  ".join(f"{v.split('-')[0]} {100 * used[v] / total:4.1f} %"
                                             for v in used)
          + f"   (spec: " + " : ".join(settings[s][0] for s in ("web", "hog", "io")) + ")")
    limit = float(settings["io"][1])
    rate = statistics.median(rates)
    print(f"{'':11s} io bandwidth (guest->host, idle neighbours) {rate:.2f} Mbit/s for a limit of "
          f"{limit:g} ({100 * rate / limit:.0f} %)")
    return percentile(times, 50), percentile(times, 99)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (namespaces, TAPs, cgroups)", file=sys.stderr)
        return 1
    root = tempfile.mkdtemp(prefix="soda-bench-iso-")
    cluster = Cluster(root)
    try:
        rootfs = build_rootfs(root)
        with uml_node(cluster, rootfs, daemon_config='cpuset: "0"') as c:
            addr = {}
            for svc, (cpu, bw) in ISOLATED.items():
                c.ctl("service", "create", svc, "--image", "busybox-httpd", "--hypervisor", "uml",
                      "--nodes", "1", "--cpu", cpu, "--bandwidth", bw, "--memory", "48",
                      "--wait", "--timeout", "120", timeout=180)
                addr[svc] = c.json("service", "get", svc)["vnodes"][0]["address"]
            c.guest_pids.update(r["pid"] for r in guest_records(c).values())
            print(f"3 UML guests on one core (cpuset 0); web: {args.requests} sequential GET / per phase")
            iso = phase(c, "isolated", ISOLATED, addr, args)
            flat = phase(c, "unisolated", UNISOLATED, addr, args)
            print(f"web p50 unisolated/isolated: {flat[0] / iso[0]:.2f}x   "
                  f"p99: {flat[1] / iso[1]:.2f}x")
    finally:
        cluster.close()
        subprocess.run(["rm", "-rf", root])
    return 0


if __name__ == "__main__":
    sys.exit(main())
