#!/usr/bin/env python3
"""Boot time: SODA's UML kernel vs Debian's vs QEMU, launch → service
port open, and create → first answer through the Switch, in one run.

1. Boots the reference image (scripts/build-rootfs) under the UML driver
   with SODA's own kernel and with Debian's `linux.uml`, and under the QEMU
   driver (TCG unless KVM really works here), a few times each, rotating,
   on a TAP in a network namespace this benchmark creates (192.168.253.0/24,
   nothing leaves it), and prints each one's median, min and max from
   `start()` to the first successful TCP connect to port 80 from inside the
   namespace. The same for a stock Debian image (scripts/build-rootfs
   --debian: systemd, nginx's default site) as KEY+debian, on SODA's kernel
   and under QEMU (Debian's UML kernel has no IP autoconfig, so a stock
   image gets no network there). The bridge holds a permanent neighbour entry for the guest,
   as the Agent installs one for every guest it plugs in.
2. Starts a real cluster (Master, Daemon, Agent, Switch as processes, as
   tests/system/guests.py does; SODA's kernel when built) and times
   `sodactl service create --nodes 1 --wait` until the first HTTP answer
   through the Switch (20 times: median, p95 and every value, since a
   bimodal spread is a bug to find), alternating with the same create made
   through the Master's API (no sodactl start-up: what the platform itself
   takes), and `sodactl service create --nodes 10 --wait` until it returns
   with all 10 RUNNING. sodactl figures are measured from just before it
   starts, so they include its start-up, which is also timed alone.

3. The cost of confining the VMM: the same UML guest (SODA's kernel when
   built) booted alternately as root, unconfined (what `guest_uid_drop:
   false` and `confine_files: false` give), and as an Agent boots it: as an
   unprivileged uid (the launcher's --user/--nofile, a TAP owned by that
   uid, the VMM's files its own) and confined with Landlock to its own
   files (where the host kernel has Landlock), `--uid-drop-repeats` times
   each: launch -> port open, medians and p95 side by side and the
   difference of the medians in ms.

The reference image does not announce itself (no ping of its gateway), so
these figures hold for any image: the first packet towards a new guest
must not wait for an ARP retry.

    python bench/boot.py [--repeats 5] [--memory-uml 32] [--memory-debian 32] [--memory-qemu 128]
                         [--no-debian] [--memory-debian-image 64] [--memory-qemu-debian-image 256]
                         [--no-qemu] [--create-repeats 20] [--wide 10]
                         [--uid-drop-repeats 20] [--json]

Needs root (namespaces, TAPs, cgroups). Everything it creates goes at the
end, also on failure; it signals only the guests its drivers recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.stats import p95  # noqa: E402
from soda.agent.network import bridge_mac  # noqa: E402
from soda.hypervisors.base import GuestSpec, guest_mac  # noqa: E402
from soda.hypervisors.kernels import DEBIAN_KERNEL, DEBIAN_MIN_MEMORY, SODA, find_uml_kernel  # noqa: E402
from soda.hypervisors.probe import probe_tcp  # noqa: E402
from soda.hypervisors.qemu import QemuDriver  # noqa: E402
from soda.hypervisors.uml import UmlDriver  # noqa: E402
from soda.model.spec import Resources, parse_spec  # noqa: E402
from tests.support import free_port, traversable  # noqa: E402
from tests.system.cluster import Cluster  # noqa: E402
from tests.system.guests import guest_records, uml_node  # noqa: E402

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATEWAY = "192.168.253.1"
ADDRESS = "192.168.253.2"
LIMIT = 90.0


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "p95": round(p95(values), 3),
            "min": round(min(values), 3), "max": round(max(values), 3), "n": len(values),
            "values": [round(v, 3) for v in values]}


def build(script: str, out: str) -> str:
    return sh(os.path.join(TOP, "scripts", script), out).strip().splitlines()[-1]


def boot_once(driver, spec: GuestSpec) -> float:
    """Seconds from start() to the port answering; the guest is stopped after."""
    began = time.monotonic()
    driver.start(spec)
    try:
        while not probe_tcp(spec.address, spec.port, spec.netns, timeout=0.2):
            info = driver.info(spec.name)
            if info is None or info.state != "running":
                raise RuntimeError(f"{driver.name} guest died while booting: "
                                   f"{info.exit_reason if info else 'gone'}")
            if time.monotonic() - began > LIMIT:
                raise RuntimeError(f"{driver.name} guest not up within {LIMIT:g}s")
            time.sleep(0.01)
        return time.monotonic() - began
    finally:
        driver.stop(spec.name, timeout=0)


def memory_of(args, key: str) -> int:
    if key.endswith("+debian"):
        return args.memory_qemu_debian_image if key.startswith("qemu") else args.memory_debian_image
    return {"uml-soda": args.memory_uml, "uml-debian": args.memory_debian}.get(key, args.memory_qemu)


def launch_to_port(args, work: str, image: str, debian_image: str = "") -> dict[str, list[float]]:
    """Part 1: launch → port open for each UML kernel (and QEMU), rotating,
    with the reference image and (KEY+debian) the stock Debian image."""
    netns = f"sodab-{os.getpid()}-{secrets.token_hex(3)}"
    drivers: dict[str, object] = {}
    try:
        sh("ip", "netns", "add", netns)
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", netns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", netns, "addr", "add", f"{GATEWAY}/24", "dev", "br0")
        # As the Agent's bridge: a fixed MAC, so ports joining it do not
        # change it (which would flush its neighbour entries).
        sh("ip", "-n", netns, "link", "set", "br0", "address", bridge_mac(GATEWAY), "up")
        state, run = os.path.join(work, "state"), os.path.join(work, "run")
        soda = find_uml_kernel()
        if soda.kind == SODA:
            drivers["uml-soda"] = UmlDriver(os.path.join(state, "soda"), kernel=soda.path, short_dir=run)
        else:
            print("  (SODA's kernel is not built: scripts/build-guest-kernel)", file=sys.stderr)
        drivers["uml-debian"] = UmlDriver(os.path.join(state, "debian"), kernel=DEBIAN_KERNEL,
                                          short_dir=run)
        if not args.no_qemu:
            initramfs = build("build-initramfs", os.path.join(work, "initramfs.img"))
            drivers["qemu"] = QemuDriver(os.path.join(state, "qemu"), initramfs=initramfs, short_dir=run)
        keys = list(drivers)
        if debian_image:
            # Debian's UML kernel has no IP autoconfig (ip=): a stock image
            # gets no network there, only the reference image's own init does.
            keys += [f"{k}+debian" for k in drivers if k != "uml-debian"]
        times: dict[str, list[float]] = {k: [] for k in keys}
        failures: dict[str, list[str]] = {k: [] for k in keys}
        for i in range(args.repeats):
            for key in keys[i % len(keys):] + keys[:i % len(keys)]:
                driver = drivers[key.split("+")[0]]
                memory = memory_of(args, key)
                spec = GuestSpec(name="bench-0", service="bench",
                                 image_path=debian_image if key.endswith("+debian") else image,
                                 image_digest="", address=ADDRESS, prefix_length=24,
                                 gateway=GATEWAY, port=80, hypervisor=driver.name, tap="tap0",
                                 netns=netns,
                                 resources=Resources(cpu=1, memory=memory, bandwidth=0, disk=0))
                # A fresh TAP per boot, as the Agent gives each virtual node,
                # and, as the Agent does, the guest's MAC known before it boots.
                subprocess.run(["ip", "-n", netns, "link", "del", "tap0"], capture_output=True)
                sh("ip", "-n", netns, "tuntap", "add", "dev", "tap0", "mode", "tap")
                sh("ip", "-n", netns, "link", "set", "tap0", "master", "br0")
                sh("ip", "-n", netns, "link", "set", "tap0", "up")
                sh("ip", "-n", netns, "neigh", "flush", "dev", "br0")
                sh("ip", "-n", netns, "neigh", "replace", ADDRESS, "lladdr", guest_mac(ADDRESS),
                   "dev", "br0", "nud", "permanent")
                try:
                    t = boot_once(driver, spec)
                except RuntimeError as exc:
                    # Counted and shown, not hidden: a failed boot is a finding.
                    failures[key].append(str(exc))
                    print(f"  {key:16s} boot {i + 1}: FAILED: {exc}", file=sys.stderr)
                    continue
                times[key].append(t)
                print(f"  {key:16s} boot {i + 1}: {t:6.2f} s", file=sys.stderr)
        print(f"launch -> port 80 open, {args.repeats} boots each, rotating, one run:")
        for key in keys:
            driver, memory = drivers[key.split("+")[0]], memory_of(args, key)
            what = (f"{driver.kernel}, accel {driver.accel}" if driver.name == "qemu"
                    else f"{driver.kernel} ({driver.kernel_kind})")
            image_name = "debian (systemd, nginx)" if key.endswith("+debian") else "busybox"
            print(f"  {key:16s} mem {memory:3d}M  {image_name}  {what}")
        print(f"  {'':16s} {'median':>8s} {'p95':>8s} {'min':>8s} {'max':>8s} {'failed':>7s}")
        for key, values in times.items():
            if values:
                print(f"  {key:16s} {statistics.median(values):7.2f}s {p95(values):7.2f}s "
                      f"{min(values):7.2f}s {max(values):7.2f}s {len(failures[key]):7d}")
            else:
                print(f"  {key:16s} {'-':>8s} {'-':>8s} {'-':>8s} {'-':>8s} {len(failures[key]):7d}")
            if failures[key]:
                print(f"  {'':16s} first failure: {failures[key][0]}")
        return {key: values for key, values in times.items() if values}
    finally:
        for driver in drivers.values():
            for name in list(driver.list()):
                driver.stop(name, timeout=0)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


BENCH_UID = 265000                   # in the Agent's default guest_uids, unlikely to be taken
OPEN_FILES = 1024


def uid_drop_cost(args, work: str, image: str) -> dict[str, list[float]]:
    """Part 3: launch -> port open as root unconfined ("off") and as
    BENCH_UID confined to its files ("on"), alternating."""
    netns = f"sodab-{os.getpid()}-{secrets.token_hex(3)}"
    soda = find_uml_kernel()
    memory = args.memory_uml if soda.kind == SODA else args.memory_debian
    drivers = {key: UmlDriver(os.path.join(work, "state", f"uid-drop-{key}"), kernel=soda.path,
                              short_dir=os.path.join(work, f"run-{key}"),
                              hostfs_root=os.path.join(work, "empty-hostfs"),
                              confine_files=key == "on")
               for key in ("off", "on")}
    driver = drivers["on"]
    confined = "a uid, Landlock" if driver.kernel_files is not None else "a uid (no Landlock here)"
    times: dict[str, list[float]] = {"off": [], "on": []}
    try:
        sh("ip", "netns", "add", netns)
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", netns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", netns, "addr", "add", f"{GATEWAY}/24", "dev", "br0")
        sh("ip", "-n", netns, "link", "set", "br0", "address", bridge_mac(GATEWAY), "up")
        for i in range(2 * args.uid_drop_repeats):
            key = ("off", "on")[(i + i // 2) % 2]          # off on on off off on ...: no order bias
            uid = BENCH_UID if key == "on" else 0
            spec = GuestSpec(name="bench-0", service="bench", image_path=image, image_digest="",
                             address=ADDRESS, prefix_length=24, gateway=GATEWAY, port=80,
                             hypervisor="uml", tap="tap0", netns=netns, uid=uid,
                             open_files=OPEN_FILES,
                             resources=Resources(cpu=1, memory=memory, bandwidth=0, disk=0))
            # As the Agent plugs a guest in: a fresh TAP, the uid's when it drops.
            subprocess.run(["ip", "-n", netns, "link", "del", "tap0"], capture_output=True)
            owner = ["user", str(uid), "group", str(uid)] if uid else []
            sh("ip", "-n", netns, "tuntap", "add", "dev", "tap0", "mode", "tap", *owner)
            sh("ip", "-n", netns, "link", "set", "tap0", "master", "br0")
            sh("ip", "-n", netns, "link", "set", "tap0", "up")
            sh("ip", "-n", netns, "neigh", "replace", ADDRESS, "lladdr", guest_mac(ADDRESS),
               "dev", "br0", "nud", "permanent")
            t = boot_once(drivers[key], spec)
            times[key].append(t)
            print(f"  uid drop {key:3s} boot {len(times[key]):2d}: {t:6.3f} s", file=sys.stderr)
        print(f"confinement ({confined}): launch -> port 80 open, {driver.kernel} "
              f"({driver.kernel_kind}), "
              f"mem {memory}M, {args.uid_drop_repeats} boots each, alternating:")
        print(f"  {'':10s} {'median':>8s} {'p95':>8s} {'min':>8s} {'max':>8s}")
        for key, label in (("off", "as root"), ("on", "confined")):
            v = times[key]
            print(f"  {label:10s} {statistics.median(v):7.3f}s {p95(v):7.3f}s {min(v):7.3f}s "
                  f"{max(v):7.3f}s")
        delta = 1000 * (statistics.median(times["on"]) - statistics.median(times["off"]))
        print(f"  confined - root (medians): {delta:+.1f} ms")
        return times
    finally:
        for each in drivers.values():
            for name in list(each.list()):
                each.stop(name, timeout=0)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def first_answer(url: str, expect: str, limit: float = LIMIT) -> float:
    """monotonic() of the first HTTP answer from `url` that names `expect`."""
    began = time.monotonic()
    while time.monotonic() - began < limit:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if expect in r.read().decode(errors="replace"):
                    return time.monotonic()
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"no answer naming {expect} from {url} within {limit:g}s")


def create_to_answer(c, name: str, memory: int) -> tuple[float, float]:
    """(seconds until `create --wait` returned, seconds until the first
    answer through the Switch), both from just before sodactl starts."""
    port = free_port()
    began = time.monotonic()
    c.ctl("service", "create", name, "--image", "busybox-httpd", "--hypervisor", "uml",
          "--nodes", "1", "--memory", str(memory), "--switch", f"127.0.0.1:{port}",
          "--wait", "--timeout", "60", timeout=90)
    waited = time.monotonic() - began
    answered = first_answer(f"http://127.0.0.1:{port}/", f"{name}-0") - began
    return waited, answered


def create_api_to_answer(client, name: str, memory: int) -> float:
    """Seconds from the CreateService call (the Master's API, without
    sodactl's start-up) until the first answer through the Switch."""
    port = free_port()
    spec = parse_spec({"name": name, "image": "busybox-httpd", "hypervisor": "uml", "nodes": 1,
                       "resources": {"memory": memory}, "switch": {"listen": f"127.0.0.1:{port}"}})
    began = time.monotonic()
    client.create_service(spec)
    return first_answer(f"http://127.0.0.1:{port}/", f"{name}-0") - began


def sodactl_startup() -> float:
    """Seconds sodactl takes to start and exit (`--help`): the Python
    interpreter and its imports, part of every sodactl-measured figure."""
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "soda.cli.sodactl", "--help"], check=True, capture_output=True)
    return time.monotonic() - began


def create_wide(c, name: str, nodes: int, memory: int) -> float:
    """Seconds from the request until `create --nodes N --wait` returned,
    checked afterwards: every virtual node RUNNING."""
    began = time.monotonic()
    c.ctl("service", "create", name, "--image", "busybox-httpd", "--hypervisor", "uml",
          "--nodes", str(nodes), "--memory", str(memory), "--cpu", "0.1",
          "--wait", "--timeout", "120", timeout=180)
    took = time.monotonic() - began
    vnodes = c.json("service", "get", name)["vnodes"]
    late = [v["name"] for v in vnodes if v["phase"] != "RUNNING"]
    if late:
        # What the Agent says of them: --wait saw them all RUNNING first.
        agent_log = [line for line in c.log("node-a").splitlines() if any(n in line for n in late)]
        print("\n".join(agent_log[-20:]), file=sys.stderr)
        raise RuntimeError(f"{name}: not RUNNING after --wait returned: {late}")
    return took


def through_the_switch(args, work: str, image: str) -> dict[str, list[float]]:
    """Part 2: a real cluster; create → first answer, and N nodes at once."""
    cluster = Cluster(os.path.join(work, "cluster"))
    os.makedirs(cluster.root, exist_ok=True)
    try:
        with uml_node(cluster, image) as c:
            kernel = find_uml_kernel()
            waits, answers, api_answers, startups, wide = [], [], [], [], []
            client = c.client()
            for i in range(args.create_repeats):
                # Alternating: sodactl (what an operator feels) and the API
                # (what the platform takes), under the same conditions.
                name = f"one{i}"
                waited, answered = create_to_answer(c, name, args.memory_uml)
                c.guest_pids.update(r["pid"] for r in guest_records(c).values())
                waits.append(waited)
                answers.append(answered)
                c.ctl("service", "delete", name, "--wait", "--timeout", "60", timeout=90)
                name = f"api{i}"
                api = create_api_to_answer(client, name, args.memory_uml)
                c.guest_pids.update(r["pid"] for r in guest_records(c).values())
                api_answers.append(api)
                c.ctl("service", "delete", name, "--wait", "--timeout", "60", timeout=90)
                startups.append(sodactl_startup())
                print(f"  create {i + 1}: sodactl --wait returned {waited:5.2f} s, first answer "
                      f"{answered:5.2f} s; API create, first answer {api:5.2f} s", file=sys.stderr)
            client.close()
            for i in range(args.wide_repeats):
                name = f"wide{i}"
                took = create_wide(c, name, args.wide, args.memory_uml)
                c.guest_pids.update(r["pid"] for r in guest_records(c).values())
                wide.append(took)
                print(f"  create --nodes {args.wide} {i + 1}: {took:5.2f} s", file=sys.stderr)
                c.ctl("service", "delete", name, "--wait", "--timeout", "60", timeout=90)
            print(f"through a real cluster (Master, Daemon, Agent, Switch), uml {kernel.path} "
                  f"({kernel.kind}), mem {args.memory_uml}M:")
            print(f"  {'':34s} {'median':>8s} {'p95':>8s} {'min':>8s} {'max':>8s}")
            for label, values in (("sodactl create --wait returned", waits),
                                  ("sodactl create -> first answer", answers),
                                  ("API create -> first answer", api_answers),
                                  ("sodactl start-up alone (--help)", startups),
                                  (f"create --nodes {args.wide} --wait, all RUNNING", wide)):
                if values:
                    print(f"  {label:34s} {statistics.median(values):7.2f}s {p95(values):7.2f}s "
                          f"{min(values):7.2f}s {max(values):7.2f}s")
            for label, values in (("sodactl create -> first answer", answers),
                                  ("API create -> first answer", api_answers)):
                if values:
                    print(f"  {label}, every value (s): " + " ".join(f"{v:.2f}" for v in sorted(values)))
            return {"create_wait": waits, "create_first_answer": answers,
                    "api_create_first_answer": api_answers, "sodactl_startup": startups,
                    "create_wide": wide}
    finally:
        cluster.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory-uml", type=int, default=32, help="SODA kernel guests, MiB")
    p.add_argument("--memory-debian", type=int, default=DEBIAN_MIN_MEMORY,
                   help="Debian kernel guests, MiB (its minimum: soda.hypervisors.kernels)")
    p.add_argument("--memory-qemu", type=int, default=128)
    p.add_argument("--no-qemu", action="store_true", help="skip QEMU (7-9 s a boot under TCG)")
    p.add_argument("--no-debian", action="store_true",
                   help="skip the stock Debian image (scripts/build-rootfs --debian)")
    p.add_argument("--memory-debian-image", type=int, default=64, help="Debian image on UML, MiB")
    p.add_argument("--memory-qemu-debian-image", type=int, default=256, help="Debian image on QEMU, MiB")
    p.add_argument("--create-repeats", type=int, default=20)
    p.add_argument("--wide", type=int, default=10, help="virtual nodes of the wide create")
    p.add_argument("--wide-repeats", type=int, default=3)
    p.add_argument("--uid-drop-repeats", type=int, default=20,
                   help="boots each as root unconfined and as a confined uid (0: skip)")
    p.add_argument("--json", action="store_true",
                   help="print the figures as one JSON object on the last line")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/boot.py needs root (network namespace, TAP)", file=sys.stderr)
        return 1
    # Reachable by the guests' uids (mkdtemp makes it 0700).
    work = traversable(tempfile.mkdtemp(prefix="soda-bench-boot-"))
    try:
        image = build("build-rootfs", os.path.join(work, "rootfs.img"))
        debian_image = "" if args.no_debian else sh(
            os.path.join(TOP, "scripts", "build-rootfs"), "--debian",
            os.path.join(work, "debian.img")).strip().splitlines()[-1]
        times = launch_to_port(args, work, image, debian_image) if args.repeats else {}
        if "uml-soda" in times and "uml-debian" in times:
            soda, debian = statistics.median(times["uml-soda"]), statistics.median(times["uml-debian"])
            print(f"  debian / soda kernel (medians): {debian / soda:.1f}x")
        if "qemu" in times:
            uml = statistics.median(times.get("uml-soda") or times.get("uml-debian") or [float("nan")])
            print(f"  qemu / uml (medians): {statistics.median(times['qemu']) / uml:.1f}x")
        drop = uid_drop_cost(args, work, image) if args.uid_drop_repeats else {}
        cluster = through_the_switch(args, work, image) if args.create_repeats or args.wide_repeats else {}
        if args.json:
            figures = {f"launch_to_port_{key.replace('-', '_').replace('+', '_')}": summary(values)
                       for key, values in times.items()}
            figures.update({key: summary(values) for key, values in cluster.items() if values})
            if drop:
                figures["uid_drop"] = {
                    "off": summary(drop["off"]), "on": summary(drop["on"]),
                    "median_delta_ms": round(1000 * (statistics.median(drop["on"])
                                                     - statistics.median(drop["off"])), 1)}
            print(json.dumps(figures))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
