#!/usr/bin/env python3
"""Boot time, UML vs QEMU: launch → service port open, side by side.

Boots the reference image (scripts/build-rootfs) under the UML driver and
the QEMU driver (TCG unless KVM really works here) a few times each,
alternating, in one run, on a TAP in a network namespace this benchmark
creates (192.168.253.0/24, nothing leaves it), and prints each driver's
median, min and max from `start()` to the first successful TCP connect to
port 80 from inside the namespace, and the ratio of the medians.

    python bench/boot.py [--repeats 5] [--uml-kernel auto|PATH] [--memory-uml 64]
                         [--memory-qemu 128]

Needs root (namespace, TAP). Everything it creates goes at the end, also
on failure; it signals only the guests its drivers recorded.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soda.hypervisors.base import GuestSpec  # noqa: E402
from soda.hypervisors.probe import probe_tcp  # noqa: E402
from soda.hypervisors.qemu import QemuDriver  # noqa: E402
from soda.hypervisors.uml import UmlDriver  # noqa: E402
from soda.model import Resources  # noqa: E402

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATEWAY = "192.168.253.1"
ADDRESS = "192.168.253.2"
LIMIT = 90.0


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--uml-kernel", default="auto")
    p.add_argument("--memory-uml", type=int, default=64)
    p.add_argument("--memory-qemu", type=int, default=128)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/boot.py needs root (network namespace, TAP)", file=sys.stderr)
        return 1

    work = tempfile.mkdtemp(prefix="soda-bench-boot-")
    netns = f"sodab-{os.getpid()}-{secrets.token_hex(3)}"
    drivers = []
    try:
        image = build("build-rootfs", os.path.join(work, "rootfs.img"))
        initramfs = build("build-initramfs", os.path.join(work, "initramfs.img"))
        sh("ip", "netns", "add", netns)
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        sh("ip", "-n", netns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", netns, "addr", "add", f"{GATEWAY}/24", "dev", "br0")
        sh("ip", "-n", netns, "link", "set", "br0", "up")

        uml = UmlDriver(os.path.join(work, "state"), kernel=args.uml_kernel,
                        short_dir=os.path.join(work, "run"))
        qemu = QemuDriver(os.path.join(work, "state"), initramfs=initramfs,
                          short_dir=os.path.join(work, "run"))
        drivers = [uml, qemu]
        memory = {"uml": args.memory_uml, "qemu": args.memory_qemu}
        times: dict[str, list[float]] = {"uml": [], "qemu": []}
        for i in range(args.repeats):
            for driver in (uml, qemu) if i % 2 == 0 else (qemu, uml):
                spec = GuestSpec(name="bench-0", service="bench", image_path=image,
                                 image_digest="", address=ADDRESS, prefix_length=24,
                                 gateway=GATEWAY, port=80, hypervisor=driver.name, tap="tap0",
                                 netns=netns,
                                 resources=Resources(cpu=1, memory=memory[driver.name],
                                                     bandwidth=0, disk=0))
                # A fresh TAP per boot, as the Agent gives each virtual node,
                # and no neighbour entry left from the previous guest's MAC.
                subprocess.run(["ip", "-n", netns, "link", "del", "tap0"], capture_output=True)
                sh("ip", "-n", netns, "tuntap", "add", "dev", "tap0", "mode", "tap")
                sh("ip", "-n", netns, "link", "set", "tap0", "master", "br0")
                sh("ip", "-n", netns, "link", "set", "tap0", "up")
                sh("ip", "-n", netns, "neigh", "flush", "dev", "br0")
                t = boot_once(driver, spec)
                times[driver.name].append(t)
                print(f"  {driver.name:4s} boot {i + 1}: {t:6.2f} s", file=sys.stderr)

        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"boot (launch -> port 80 open), {args.repeats} boots each, alternating, one run:")
        print(f"  uml   kernel {uml.kernel} ({uml.kernel_kind}), mem={args.memory_uml}M")
        print(f"  qemu  {qemu.kernel}, accel {qemu.accel}, -m {args.memory_qemu}M")
        print(f"  {'driver':6s} {'median':>8s} {'min':>8s} {'max':>8s}")
        for k in ("uml", "qemu"):
            print(f"  {k:6s} {med[k]:7.2f}s {min(times[k]):7.2f}s {max(times[k]):7.2f}s")
        print(f"  qemu / uml (medians): {med['qemu'] / med['uml']:.1f}x")
        return 0
    finally:
        for driver in drivers:
            for name in list(driver.list()):
                driver.stop(name, timeout=0)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
