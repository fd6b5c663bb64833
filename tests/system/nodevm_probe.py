"""Run inside the node VM (by tests/system/test_node_vm.py, with the
installed SODA's Python): asks the running soda-daemon for fences over its
socket, puts real processes standing in for a guest's into the cgroups it
returns, and measures what the kernel then does, reading /proc and the
cgroup files itself. Prints one JSON object.

    python nodevm_probe.py split|cap|memory|standin NAME|check NAME PID|release NAME...
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from soda.model.spec import Resources
from soda.rpc.daemon_client import DaemonClient

BUSY = [sys.executable, "-c", "while True: pass"]
# Touches 1 MiB at a time, up to 512 MiB: far above any limit given here.
HOG = [sys.executable, "-c",
       "import time\nchunks = []\nfor _ in range(512):\n    chunks.append(bytearray(1 << 20))\n"
       "    time.sleep(0.005)\ntime.sleep(60)\n"]


def fence(client: DaemonClient, name: str, cpu: float, memory: int, cap: bool = False) -> str:
    f = client.apply_limits(name, Resources(cpu=cpu, memory=memory), "probe", 0, cpu_cap=cap)
    (path,) = f.cgroups
    return path


def start_in(path: str, argv: list[str], detach: bool = False) -> subprocess.Popen:
    """A process that joins the cgroup at `path` before it runs `argv`."""
    proc = subprocess.Popen(["/bin/sh", "-c", f'echo $$ > {path}/cgroup.procs && exec "$@"', "sh", *argv],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=detach)
    deadline = time.monotonic() + 5
    while str(proc.pid) not in read(f"{path}/cgroup.procs").split():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"process {proc.pid} did not join {path}")
        time.sleep(0.01)
    return proc


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def keyed(path: str) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in read(path).splitlines())}


def cpu_usage(paths: list[str], seconds: float) -> list[float]:
    """Each cgroup's CPU time over `seconds`, as a fraction of the wall time."""
    before = [keyed(f"{p}/cpu.stat")["usage_usec"] for p in paths]
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    after = [keyed(f"{p}/cpu.stat")["usage_usec"] for p in paths]
    return [(a - b) / 1e6 / elapsed for a, b in zip(after, before)]


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def split(client: DaemonClient) -> dict:
    paths = [fence(client, "probe-half", 0.5, 64), fence(client, "probe-one", 1.0, 64)]
    procs = [start_in(p, BUSY) for p in paths]
    try:
        time.sleep(1.0)
        usage = cpu_usage(paths, 6.0)
    finally:
        stop(*procs)
    total = sum(usage)
    return {"usage": usage, "shares": [u / total for u in usage],
            "weights": [int(read(f"{p}/cpu.weight")) for p in paths]}


def cap(client: DaemonClient) -> dict:
    path = fence(client, "probe-cap", 0.3, 64, cap=True)
    proc = start_in(path, BUSY)
    try:
        time.sleep(1.0)
        (usage,) = cpu_usage([path], 6.0)
    finally:
        stop(proc)
    return {"usage": usage, "cpu_max": read(f"{path}/cpu.max").strip()}


def memory(client: DaemonClient) -> dict:
    hog_path = fence(client, "probe-hog", 0.5, 64)
    calm_path = fence(client, "probe-calm", 0.5, 64)
    calm = start_in(calm_path, [sys.executable, "-c", "import time; b = bytearray(16 << 20); time.sleep(600)"])
    hog = start_in(hog_path, HOG)
    try:
        hog.wait(timeout=60)
        events = keyed(f"{hog_path}/memory.events")
        return {"hog_returncode": hog.returncode, "oom_kill": events.get("oom_kill", 0),
                "max_events": events.get("max", 0), "memory_max": read(f"{hog_path}/memory.max").strip(),
                "calm_alive": calm.poll() is None,
                "calm_oom_kill": keyed(f"{calm_path}/memory.events").get("oom_kill", 0)}
    finally:
        stop(hog, calm)


def standin(client: DaemonClient, name: str) -> dict:
    """A long-lived stand-in 'guest' (a sleeping process tree) that outlives
    this script and the ssh session that ran it."""
    path = fence(client, name, 0.5, 64)
    proc = start_in(path, ["/bin/sh", "-c", "sleep 3600 & sleep 3600 & wait"], detach=True)
    time.sleep(0.2)
    return {"pid": proc.pid, "cgroup": path, "procs": sorted(int(p) for p in read(f"{path}/cgroup.procs").split())}


def check(client: DaemonClient, name: str, pid: int) -> dict:
    listed = {f.name: list(f.cgroups) for f in client.list()}
    cgroup = read(f"/proc/{pid}/cgroup").strip() if os.path.exists(f"/proc/{pid}") else ""
    return {"listed": name in listed, "cgroups": listed.get(name, []), "alive": os.path.exists(f"/proc/{pid}"),
            "proc_cgroup": cgroup}


def release(client: DaemonClient, names: list[str]) -> dict:
    out = {}
    for name in names:
        paths = [f.cgroups for f in client.list() if f.name == name]
        pids = sorted(int(p) for p in read(f"{paths[0][0]}/cgroup.procs").split()) if paths else []
        done = client.release_limits(name)
        out[name] = {"existed": done.existed, "killed": done.killed, "pids_before": pids,
                     "pids_alive_after": [p for p in pids if alive(p)],
                     "cgroup_left": bool(paths) and os.path.exists(paths[0][0])}
    return out


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        return read(f"/proc/{pid}/stat").split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def main(argv: list[str]) -> int:
    client = DaemonClient()
    client.wait_ready(30)
    what, args = argv[0], argv[1:]
    if what == "split":
        result = split(client)
    elif what == "cap":
        result = cap(client)
    elif what == "memory":
        result = memory(client)
    elif what == "standin":
        result = standin(client, args[0])
    elif what == "check":
        result = check(client, args[0], int(args[1]))
    elif what == "release":
        result = release(client, args)
    else:
        raise SystemExit(__doc__)
    print(json.dumps(result))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
