#!/usr/bin/env python3
"""Performance isolation, the paper's scenario: a CPU-bound, an I/O-bound
and a web virtual node side by side on one physical node (every guest
confined to one core, so they really compete), each a real UML guest.

Prints, for one run, the web node's response time (p50/p99 over sequential
GET /) while its neighbours are loaded, twice on the same guests:

  isolated    shares per the spec: web 1.0 core, cpu-hog 0.25, io 0.25 with
              10 Mbit/s both ways (web and hog 300 Mbit/s)
  unisolated  no fence between them: equal shares (0.5 core each, changed
              live with `sodactl service resize`), no CPU cap, and no
              traffic shaping at all (the bench removes the TAPs' HTB and
              ingress redirect itself: the Master accepts no bandwidth
              below 1 Mbit/s, so "unshaped" cannot be asked for)

Two things stay in both phases, on purpose:
  - the cpuset: it is the same single core for all three guests, so it
    does not fence them from each other; it is the size of the physical
    node. Without it the unisolated phase would run on twice the hardware.
    Equal shares of 0.5 keep the three guests' total weight against the
    rest of the machine (1.5 cores) what it is in the isolated phase.
  - the memory limit: each guest's RAM is fixed when it boots (mem=), and
    the cgroup limit sits above it with the VMM's headroom; it never binds
    here (memory.failcnt, printed, stays 0).

Before measuring, each phase reads the kernel's values (cpu.shares,
cpu.cfs_quota_us, cpuset.cpus, the HTB rates on each TAP and on the IFB its
ingress is redirected to, or their absence) and refuses to measure if they
are not what was asked; it reads them again afterwards. Also prints the
CPU split measured from cpuacct over --window seconds while the web client
runs and the I/O node's measured bandwidth against its limit. Traffic goes
only to guests inside the namespace this script creates; everything is torn
down at the end. With --json, the figures as one JSON object on the last
line.

    sudo python bench/isolation.py [--requests 300] [--window 8] [--json]
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

from bench.stats import percentile  # noqa: E402
from tests.system.cluster import Cluster  # noqa: E402
from tests.system.guests import (build_rootfs, cgroup_file, guest_records, htb_rates, qdiscs,  # noqa: E402
                                 read, uml_node)

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

SERVICES = ("web", "hog", "io")
CPUSET = "0"
# service: (cores, Mbit/s each way; None = not shaped at all)
ISOLATED = {"web": ("1.0", 300), "hog": ("0.25", 300), "io": ("0.25", 10)}
UNISOLATED = {"web": ("0.5", None), "hog": ("0.5", None), "io": ("0.5", None)}
SETTLE_SECONDS = 15


class Refused(Exception):
    """The kernel does not hold what the phase asked for: no figures."""


def in_netns(netns, code, **fmt):
    return ["ip", "netns", "exec", netns, sys.executable, "-c", code.format(**fmt)]


def tc(netns, *args):
    return subprocess.run(["ip", "netns", "exec", netns, "tc", *args], capture_output=True, text=True,
                          check=True).stdout


def tap_of(record):
    """The guest's TAP, from the command line its VMM was started with."""
    for arg in record["argv"]:
        if arg.startswith("eth0=tuntap,"):
            return arg.split(",")[1]
    raise Refused(f"no eth0=tuntap in {record['argv']}")


def redirect_target(netns, tap):
    """The device the TAP's ingress is redirected to (its IFB), or None."""
    out = tc(netns, "filter", "show", "dev", tap, "ingress")
    for word in out.replace(")", " ").split():
        if word.startswith("ifb-"):
            return word
    return None


def root_qdiscs(netns, tap):
    return sorted(kind for dev, kind, _ in qdiscs(netns) if dev == tap and kind in ("htb", "ingress"))


def kernel_state(c, taps):
    """What the kernel holds for each guest, read without the code under test."""
    state = {}
    for svc in SERVICES:
        vnode, tap = f"{svc}-0", taps[svc]
        ifb = redirect_target(c.netns, tap)
        state[svc] = {
            "cpu_shares": int(read(cgroup_file(c, "cpu", vnode, "cpu.shares"))),
            "cfs_quota_us": int(read(cgroup_file(c, "cpu", vnode, "cpu.cfs_quota_us"))),
            "cpuset": read(cgroup_file(c, "cpuset", vnode, "cpuset.cpus")),
            "qdiscs": root_qdiscs(c.netns, tap),
            "tap_rate": htb_rates(c.netns, tap),
            "ifb_rate": htb_rates(c.netns, ifb) if ifb else [],
        }
    return state


def wanted_state(settings):
    want = {}
    for svc, (cpu, bw) in settings.items():
        want[svc] = {"cpu_shares": round(1024 * float(cpu)), "cfs_quota_us": -1, "cpuset": CPUSET,
                     "qdiscs": ["htb", "ingress"] if bw else [],
                     "tap_rate": [f"{bw}Mbit"] if bw else [], "ifb_rate": [f"{bw}Mbit"] if bw else []}
    return want


def settle(c, taps, settings, name):
    """Wait until the kernel holds `settings`, or refuse."""
    want = wanted_state(settings)
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        have = kernel_state(c, taps)
        if have == want:
            return have
        if time.monotonic() > deadline:
            raise Refused(f"{name}: after {SETTLE_SECONDS} s the kernel holds {have}, not {want}")
        time.sleep(0.2)


def unshape(c, taps):
    """Take every guest's traffic out of HTB: its root qdisc and the ingress
    redirect to its IFB go; the Daemon removes the IFB at teardown."""
    for tap in taps.values():
        for kind, where in (("htb", "root"), ("ingress", "ingress")):
            if kind in root_qdiscs(c.netns, tap):
                tc(c.netns, "qdisc", "del", "dev", tap, where)


def failcnt(c):
    return {svc: int(read(cgroup_file(c, "memory", f"{svc}-0", "memory.failcnt"))) for svc in SERVICES}


def phase(c, name, settings, addr, taps, args, shaped_as=None):
    """One measurement. `shaped_as`: the rates the guests have now, for a
    phase that takes their shaping away (`settings` with None rates)."""
    for svc, (cpu, bw) in settings.items():
        argv = ["service", "resize", svc, "--cpu", cpu] + (["--bandwidth", str(bw)] if bw else [])
        c.ctl(*argv, timeout=60)
    if shaped_as is not None:
        # The Daemon writes the cgroups before it shapes: once the new shares
        # and the old rates are both in, the resize is through.
        settle(c, taps, {svc: (cpu, bw or shaped_as[svc][1]) for svc, (cpu, bw) in settings.items()}, name)
        unshape(c, taps)
    state = settle(c, taps, settings, name)
    time.sleep(1.0)                           # nothing still on its way puts a fence back
    settle(c, taps, settings, name)
    loads = [subprocess.Popen(in_netns(c.netns, LOAD[kind], addr=addr[svc]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for svc, kind in (("hog", "cpu"), ("io", "io"))]
    try:
        time.sleep(2.0)                       # warm-up: both neighbours busy
        vnodes = tuple(f"{svc}-0" for svc in SERVICES)
        web = subprocess.Popen(in_netns(c.netns, WEB, addr=addr["web"], n=args.requests),
                               stdout=subprocess.PIPE, text=True)
        before = {v: int(read(cgroup_file(c, "cpuacct", v, "cpuacct.usage"))) for v in vnodes}
        t0 = time.monotonic()
        time.sleep(args.window)
        used = {v: int(read(cgroup_file(c, "cpuacct", v, "cpuacct.usage"))) - before[v] for v in vnodes}
        window = time.monotonic() - t0
        out, _ = web.communicate(timeout=600)
        if web.returncode != 0:
            raise RuntimeError(f"{name}: the web client exited {web.returncode}")
    finally:
        for proc in loads:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    if kernel_state(c, taps) != state:
        raise Refused(f"{name}: the kernel's values changed while measuring: {kernel_state(c, taps)}")
    times = json.loads(out)
    total = sum(used.values()) or 1
    rates = [float(subprocess.run(in_netns(c.netns, RATE, addr=addr["io"]), capture_output=True,
                                  text=True, check=True, timeout=120).stdout) for _ in range(3)]
    split = {v.split("-")[0]: round(100 * used[v] / total, 1) for v in vnodes}
    limit = settings["io"][1]
    rate = statistics.median(rates)
    p50, p99 = percentile(times, 50), percentile(times, 99)
    print(f"{name:11s} kernel: " + "  ".join(
        f"{svc} shares {s['cpu_shares']} quota {s['cfs_quota_us']} cpus {s['cpuset']} "
        f"{'/'.join(s['tap_rate'] + s['ifb_rate']) or 'unshaped'}" for svc, s in state.items()))
    print(f"{'':11s} web p50 {1000 * p50:7.1f} ms  p99 {1000 * p99:7.1f} ms  ({len(times)} requests)")
    print(f"{'':11s} cpu split  " + "  ".join(f"{svc} {pct:4.1f} %" for svc, pct in split.items())
          + f"   over {window:.1f} s (spec: " + " : ".join(settings[s][0] for s in SERVICES) + ")")
    print(f"{'':11s} io bandwidth (guest->host, idle neighbours) {rate:.2f} Mbit/s "
          + (f"for a limit of {limit} ({100 * rate / limit:.0f} %)" if limit else "unshaped"))
    return {"web_p50_ms": round(1000 * p50, 2), "web_p99_ms": round(1000 * p99, 2), "requests": len(times),
            "cpu_split_pct": split, "cpu_window_s": round(window, 2),
            "cpu_spec": {svc: float(settings[svc][0]) for svc in SERVICES},
            "io_mbit": round(rate, 2), "io_limit_mbit": limit, "kernel": state}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300, help="sequential GET / per phase (default 300)")
    p.add_argument("--window", type=float, default=8.0,
                   help="seconds over which the CPU split is measured in each phase (default 8)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    args = p.parse_args()
    if args.requests < 1 or args.window <= 0:
        p.error("--requests and --window must be positive")
    if os.geteuid() != 0:
        print("needs root (namespaces, TAPs, cgroups)", file=sys.stderr)
        return 1
    root = tempfile.mkdtemp(prefix="soda-bench-iso-")
    cluster = Cluster(root)
    figures: dict = {"requests": args.requests, "window_s": args.window}
    try:
        rootfs = build_rootfs(root)
        with uml_node(cluster, rootfs, daemon_config=f'cpuset: "{CPUSET}"') as c:
            addr = {}
            for svc, (cpu, bw) in ISOLATED.items():
                c.ctl("service", "create", svc, "--image", "busybox-httpd", "--hypervisor", "uml",
                      "--nodes", "1", "--cpu", cpu, "--bandwidth", str(bw), "--memory", "48",
                      "--wait", "--timeout", "120", timeout=180)
                addr[svc] = c.json("service", "get", svc)["vnodes"][0]["address"]
            records = guest_records(c)
            c.guest_pids.update(r["pid"] for r in records.values())
            taps = {svc: tap_of(records[f"{svc}-0"]) for svc in SERVICES}
            print(f"3 UML guests on one core (cpuset {CPUSET}); web: {args.requests} sequential GET / per phase")
            iso = phase(c, "isolated", ISOLATED, addr, taps, args)
            flat = phase(c, "unisolated", UNISOLATED, addr, taps, args, shaped_as=ISOLATED)
            figures["memory_failcnt"] = failcnt(c)
            print(f"memory.failcnt (the memory limit never bound if 0): {figures['memory_failcnt']}")
    except Refused as exc:
        print(f"refusing to measure: {exc}", file=sys.stderr)
        if args.json:
            print(json.dumps({"refused": str(exc)}))
        return 1
    finally:
        cluster.close()
        subprocess.run(["rm", "-rf", root])
    figures.update(isolated=iso, unisolated=flat,
                   web_p50_unisolated_over_isolated=round(flat["web_p50_ms"] / iso["web_p50_ms"], 2),
                   web_p99_unisolated_over_isolated=round(flat["web_p99_ms"] / iso["web_p99_ms"], 2))
    print(f"web p50 unisolated/isolated: {figures['web_p50_unisolated_over_isolated']:.2f}x   "
          f"p99: {figures['web_p99_unisolated_over_isolated']:.2f}x")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
