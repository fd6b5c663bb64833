#!/usr/bin/env python3
"""Moving a running guest between physical nodes: `sodactl service move`
of a UML guest (stop-and-copy: it is drained at the Switch, synced, frozen,
its disk sent as a layer over its image and booted on the target) under a
client loop of idempotent requests through the Switch, back and forth
between two nodes, `--runs` times.

Starts a fabric cluster (tests/system/multinode.py: each physical node a
network namespace with its own Daemon and Agent, the Master and the Switch
in the root namespace), one service of one 32 MiB guest of the reference
image plus /cgi-bin/run. Before each move a token is written into the
guest (never synced); after it, the token is read back through the Switch
from the new guest (state carried) and its boot id compared (booted anew).
Per move:

- total: from the move asked to the first answer from the new guest;
- wait: from the move asked to `--wait` returning (the old one gone);
- gap: the last answer from the old guest to the first from the new one
  (the Switch holds new connections meanwhile: a delay, not an error);
- slowest: the longest single request of the loop during the move;
- failed requests, and the size of the layer the disk travelled as.

Prints median, p95, min and max of each; with --json one JSON object last.

    python bench/migrate.py [--runs 5] [--interval 0.02] [--json]

Run it alone: `flock /tmp/soda-bench.lock python bench/migrate.py`.
Needs root. Everything it creates goes at the end, also on failure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.stats import summary  # noqa: E402
from tests.support import reachable_tmp_dir  # noqa: E402
from tests.system.guests import HOSTILE_IMAGE, build_rootfs  # noqa: E402
from tests.system.multinode import ANSWER_PREFIX, MultiNode, fabric_config  # noqa: E402

SERVICE = "migrate-bench"


def request(port: int, path: str = "/", timeout: float = 60.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def run_in_guest(port: int, command: str) -> str:
    status, body = request(port, "/cgi-bin/run?" + urllib.parse.quote(command, safe=""))
    if status != 200:
        raise RuntimeError(f"{command!r}: HTTP {status}: {body[:200]}")
    return body.strip()


class Loop:
    """Requests through the Switch from a thread, each recorded as (start,
    end, the virtual node that answered or None)."""

    def __init__(self, port: int, interval: float):
        self.port, self.interval = port, interval
        self.records: list[tuple[float, float, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Loop:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=90)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                status, body = request(self.port)
                who = body[len(ANSWER_PREFIX):].split()[0] if status == 200 and body.startswith(ANSWER_PREFIX) \
                    else None
            except (OSError, http.client.HTTPException):
                who = None
            self.records.append((began, time.monotonic(), who))
            self._stop.wait(self.interval)


def one_move(mn: MultiNode, port: int, interval: float) -> dict:
    [old] = [v for v in mn.vnodes(SERVICE) if not v.get("deleting")]
    target = next(h.name for h in mn.layout.hosts if h.name != old["node"])
    token = uuid.uuid4().hex
    run_in_guest(port, f"echo {token} > /root/token")
    boot = run_in_guest(port, "cat /proc/sys/kernel/random/boot_id")
    with Loop(port, interval) as loop:
        time.sleep(0.3)
        asked = time.monotonic()
        mn.ctl("service", "move", SERVICE, old["name"], "--to", target, "--wait", "--timeout", "120")
        waited = time.monotonic() - asked
        time.sleep(0.5)
    [new] = [v for v in mn.vnodes(SERVICE) if not v.get("deleting")]
    during = [r for r in loop.records if r[1] >= asked]
    from_old = [r for r in loop.records if r[2] == old["name"]]
    from_new = [r for r in during if r[2] == new["name"]]
    if not from_new:
        raise RuntimeError(f"no answer from {new['name']} after the move")
    first_new = min(r[1] for r in from_new)
    last_old = max(r[1] for r in from_old)
    layer = next((i["stored_size"] for i in mn.json("image", "list")
                  if f"disk.{new['name']}" in i["names"]), 0)
    return {"total": first_new - asked, "wait": waited, "gap": max(0.0, first_new - last_old),
            "slowest": max(r[1] - r[0] for r in during), "requests": len(during),
            "failed": sum(1 for r in during if r[2] is None),
            "state_kept": run_in_guest(port, "cat /root/token") == token,
            "booted_anew": run_in_guest(port, "cat /proc/sys/kernel/random/boot_id") != boot,
            "layer_bytes": layer, "node": new["node"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="moves (back and forth between two nodes)")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between the loop's requests")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object last")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/migrate.py needs root (namespaces, TAPs, cgroups)", file=sys.stderr)
        return 1
    image = build_rootfs(tempfile.mkdtemp(prefix="soda-bench-migrate-image-"), overlay=HOSTILE_IMAGE)
    moves = []
    with reachable_tmp_dir("soda-bench-migrate-") as state_dir:
        with MultiNode(fabric_config(state_dir, nodes=2)) as mn:
            mn.push(image)
            port = mn.create(SERVICE, [0.5])
            for n in range(args.runs):
                move = one_move(mn, port, args.interval)
                moves.append(move)
                print(f"move {n + 1}: to {move['node']}: total {move['total']:.2f} s, gap {move['gap']:.2f} s, "
                      f"slowest request {move['slowest']:.2f} s, {move['failed']} of {move['requests']} failed, "
                      f"state kept {move['state_kept']}, booted anew {move['booted_anew']}, "
                      f"layer {move['layer_bytes']} bytes", file=sys.stderr)
            mn.delete(SERVICE)
    os.unlink(image)
    os.rmdir(os.path.dirname(image))
    figures = {key: {k: round(v, 3) for k, v in summary([m[key] for m in moves]).items()}
               for key in ("total", "wait", "gap", "slowest")}
    figures.update(moves=len(moves), failed_requests=sum(m["failed"] for m in moves),
                   requests=sum(m["requests"] for m in moves),
                   state_kept=sum(m["state_kept"] for m in moves),
                   booted_anew=sum(m["booted_anew"] for m in moves),
                   layer_bytes=summary([m["layer_bytes"] for m in moves]))
    for key in ("total", "wait", "gap", "slowest"):
        f = figures[key]
        print(f"{key:8s} median {f['median']:.2f} s  p95 {f['p95']:.2f} s  min {f['min']:.2f}  max {f['max']:.2f}")
    print(f"failed requests: {figures['failed_requests']} of {figures['requests']}; state kept in "
          f"{figures['state_kept']} of {len(moves)} moves, booted anew in {figures['booted_anew']}")
    if args.json:
        print(json.dumps(figures))
    return 0 if figures["failed_requests"] == 0 and figures["state_kept"] == len(moves) else 1


if __name__ == "__main__":
    sys.exit(main())
