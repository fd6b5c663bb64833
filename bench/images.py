#!/usr/bin/env python3
"""Image transfer: bytes on the wire and push/pull times, whole vs layered,
raw vs zstd, side by side in one run. The yardstick: Dynasoar, the system
SODA's images follow, shipped a service as a shared base VM image plus a
differencing disk, 0.5 GB compressed to 9 MB on the wire.

The base is a stock Debian bookworm image with nginx and Python
(scripts/build-rootfs --debian, a 400 MiB filesystem, built once and
cached); the app is that image with
a new front page and a few MiB of application files written into its
filesystem (debugfs), as an ASP makes an application image from a base.
One Master process (TLS), a client in this process. Each repeat, in turn
per path:

  whole/raw     push base and app whole, uncompressed; pull both
  whole/zstd    the same, zstd on the wire
  layered/zstd  push base whole and app --base base, zstd; pull as an Agent
                does (soda.agent.images.ImageCache): on a node that has the
                base, the app's layer alone, composed and verified there

Bytes on the wire are the chunks' bytes as sent or received (gRPC/TLS
framing not counted); a layered push also counts the base's block hashes it
fetched. Times are wall clock of the client's call (pull: until the file
is complete and verified). Images are deleted between repeats, so every
push stores anew.

    sudo python bench/images.py [--repeats 5] [--app-mib 4] [--json]
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.stats import p95  # noqa: E402
from soda.agent.images import ImageCache  # noqa: E402
from soda.rpc.client import sha256_file  # noqa: E402
from tests.system.cluster import Cluster  # noqa: E402
from tests.system.guests import TOP, app_image  # noqa: E402

PATHS = ("whole/raw", "whole/zstd", "layered/zstd")


def build_images(work: str, app_mib: int) -> tuple[str, str]:
    base = subprocess.run([os.path.join(TOP, "scripts", "build-rootfs"), "--debian",
                           os.path.join(work, "debian.img"), "--include", "nginx-light,python3",
                           "--size", "400M"], check=True, capture_output=True, text=True).stdout.split()[-1]
    page = b"<html><body><h1>the app, layered on Debian</h1></body></html>\n"
    app = app_image(base, os.path.join(work, "app.img"), {
        "/var/www/html/index.nginx-debian.html": page,
        "/opt/app.bin": os.urandom(app_mib << 20),
    })
    return base, app


class Wire:
    """A progress callback keeping the last bytes-on-the-wire figure."""

    def __init__(self):
        self.bytes = 0

    def __call__(self, done: int, total: int, wire: int | None = None) -> None:
        self.bytes = wire if wire is not None else done


def one_repeat(client, path_kind: str, base: str, app: str, digests: dict[str, str], scratch: str) -> dict:
    compress = path_kind.endswith("zstd")
    layered = path_kind.startswith("layered")
    out: dict[str, float] = {}
    wire = Wire()
    started = time.perf_counter()
    pushed_base = client.push_image(base, name="bench-base", digest=digests["base"], progress=wire,
                                    compress=compress)
    out["push_base_s"] = time.perf_counter() - started
    out["push_base_wire"] = wire.bytes
    wire = Wire()
    started = time.perf_counter()
    if layered:
        hashes = len(client.image_block_hashes("bench-base"))
        pushed_app = client.push_image(app, name="bench-app", digest=digests["app"], progress=wire,
                                       base="bench-base", compress=compress)
        out["push_app_wire"] = wire.bytes + hashes
        out["block_hashes"] = hashes
    else:
        pushed_app = client.push_image(app, name="bench-app", digest=digests["app"], progress=wire,
                                       compress=compress)
        out["push_app_wire"] = wire.bytes
    out["push_app_s"] = time.perf_counter() - started
    out["app_stored"] = pushed_app.stored_size

    cache_dir = os.path.join(scratch, "cache")
    shutil.rmtree(cache_dir, ignore_errors=True)
    if layered:
        received = Wire()

        class Counting:
            def pull_image(self, digest, f, layer=False):
                return client.pull_image(digest, f, progress=received, layer=layer)

        cache = ImageCache(cache_dir, Counting())
        started = time.perf_counter()
        cache.ensure(pushed_base.digest)
        out["pull_base_s"] = time.perf_counter() - started
        out["pull_base_wire"] = received.bytes
        received.bytes = 0
        started = time.perf_counter()
        got = cache.ensure(pushed_app.digest)          # the node has the base: the layer alone
        out["pull_app_s"] = time.perf_counter() - started
        out["pull_app_wire"] = received.bytes
    else:
        os.makedirs(cache_dir)
        for which, image in (("base", pushed_base), ("app", pushed_app)):
            received = Wire()
            got = os.path.join(cache_dir, which)
            started = time.perf_counter()
            with open(got, "wb") as f:
                client.pull_image(image.digest, f, progress=received, compress=compress)
                os.fsync(f.fileno())
            out[f"pull_{which}_s"] = time.perf_counter() - started
            out[f"pull_{which}_wire"] = received.bytes
    if sha256_file(got) != digests["app"]:
        raise SystemExit(f"{path_kind}: the app pulled is not the app pushed")
    client.delete_image("bench-app")
    client.delete_image("bench-base")
    shutil.rmtree(cache_dir, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--app-mib", type=int, default=4, help="MiB of new application files in the app image")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object last")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="soda-bench-images-")
    cluster = Cluster(os.path.join(work, "cluster"))
    try:
        base, app = build_images(work, args.app_mib)
        sizes = {"base": os.path.getsize(base), "app": os.path.getsize(app)}
        digests = {"base": sha256_file(base), "app": sha256_file(app)}
        cluster.start_master()
        runs: dict[str, list[dict]] = {k: [] for k in PATHS}
        with cluster.client(timeout=300) as client:
            for repeat in range(args.repeats):
                for kind in PATHS:                    # side by side, in turn
                    runs[kind].append(one_repeat(client, kind, base, app, digests, work))
                print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
        figures: dict = {"base_bytes": sizes["base"], "app_bytes": sizes["app"],
                         "app_mib_added": args.app_mib, "repeats": args.repeats}
        for kind, rows in runs.items():
            f = {}
            for key in rows[0]:
                values = [r[key] for r in rows]
                if key.endswith("_s"):
                    f[key] = {"median": round(statistics.median(values), 3), "p95": round(p95(values), 3),
                              "min": round(min(values), 3), "max": round(max(values), 3)}
                else:
                    f[key] = int(statistics.median(values))
            f["wire_total"] = f["push_base_wire"] + f["push_app_wire"]
            f["app_wire_share"] = round(f["push_app_wire"] / sizes["app"], 4)
            figures[kind] = f
        print(f"base {sizes['base'] / 2**20:.1f} MiB, app {sizes['app'] / 2**20:.1f} MiB "
              f"(+{args.app_mib} MiB of files), {args.repeats} repeats, medians (p95):")
        print(f"{'path':14} {'push base':>20} {'push app':>22} {'pull base':>20} {'pull app':>22}")
        for kind in PATHS:
            f = figures[kind]

            def cell(which: str) -> str:
                t = f[f"{which}_s"]
                return f"{f[which + '_wire'] / 2**20:7.2f} MiB {t['median']:5.2f}s ({t['p95']:.2f})"
            print(f"{kind:14} {cell('push_base'):>20} {cell('push_app'):>22} {cell('pull_base'):>20} "
                  f"{cell('pull_app'):>22}")
        lay = figures["layered/zstd"]
        print(f"app layer on the wire: {lay['push_app_wire'] / 2**20:.2f} MiB = "
              f"{100 * lay['app_wire_share']:.2f} % of the {sizes['app'] / 2**20:.0f} MiB image "
              f"(block hashes {lay['block_hashes'] / 2**20:.2f} MiB of it); both images, whole raw "
              f"{figures['whole/raw']['wire_total'] / 2**20:.1f} MiB, whole zstd "
              f"{figures['whole/zstd']['wire_total'] / 2**20:.1f} MiB, layered zstd "
              f"{lay['wire_total'] / 2**20:.1f} MiB")
        if args.json:
            print(json.dumps(figures))
        return 0
    finally:
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
