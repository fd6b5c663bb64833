#!/usr/bin/env python3
"""Control-plane throughput: how fast the Master drives virtual nodes to RUNNING.

Starts a Master and N Agents (fake hypervisor driver) as separate processes
on this machine, creates services totalling V virtual nodes, and prints the
rate at which virtual nodes reach RUNNING (as the Master reports them), the
create latency, the time until all are deleted again, and the Master's peak
RSS (VmHWM). Everything is torn down at the end, also on failure.

    python bench/control_plane.py [--agents 50] [--vnodes 1000] [--services V/50]
                                  [--agents-per-process max(10, N/10)] [--json]

Two shapes are the documented runs (`--shape` names them):

    --shape default      50 Agents, 1,000 virtual nodes in 20 services
                         (10 Agents per process)
    --shape many-nodes   500 Agents, 5,000 virtual nodes in 100 services
                         (50 Agents per process), the "many nodes" run; the
                         same as  --agents 500 --vnodes 5000

A flag given with --shape overrides that figure of the shape. Services hold
50 virtual nodes each unless --services says otherwise.

Agents are real soda-agent code talking gRPC to the Master process; several
share one Python process (`--agents-per-process`, by default enough for at
most 10 processes) so that hundreds of interpreters do not starve the Master
of this machine's CPU. With 1 every Agent is its own process, as in
production. The Agents' processes run at nice 10 (`--agent-nice`): they
stand for other machines. Every Agent heartbeats every 2 s and holds one
WatchAssignments stream, which takes one of the Master's gRPC worker
threads: the Master gets one worker per Agent plus 256, and a cluster range
with a /24 for each Agent (see master_config_text). The image every Agent
pulls once is 256 KiB (`--image-kib`): 500 pulls of a bigger one through the
Master are data path, not what this bench measures. The Agents' state dirs
are on tmpfs (`--agents-on-disk` to keep them on disk), the Master's on disk.

Milestones (50/90/100 % RUNNING) count from the first create call; the
Master is asked once all create calls have returned, at most every 0.1 s and
never more than a quarter of the time (each ListServices of thousands of
virtual nodes is work for the Master too). With --json the last line is one
JSON object: `vnodes_running_per_s` (virtual nodes RUNNING per second from
the first create call, the placement rate; also `running_per_s`),
`master_peak_rss_mib`, `create_median_ms`, `create_max_ms`, `delete_s`,
`delete_calls_s`, `wall_s` and more.
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

from soda import model  # noqa: E402
from soda.errors import SodaError  # noqa: E402
from soda.rpc.client import MasterClient  # noqa: E402
from tests.support import free_port, make_ext4_image, peak_rss_mib  # noqa: E402

AGENT_CONFIG = """\
log_level: WARNING
capacity: {cpu: 64, memory: 65536, bandwidth: 100000, disk: 10000000}
drivers: {fake: {boot_seconds: 0.2, stop_seconds: 0.01}}
max_parallel_boots: 8
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it holds. A poll that takes long (a list of
    500 nodes or 5,000 virtual nodes is work for the Master) is followed by
    a pause of three times as long, so that the bench's own questions take
    at most a quarter of the Master's time."""
    deadline = time.monotonic() + timeout
    while True:
        asked = time.monotonic()
        if predicate():
            return
        now = time.monotonic()
        if now > deadline:
            raise SystemExit(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(max(interval, 3 * (now - asked)))


def count_phase(client: MasterClient, phase: model.Phase) -> int:
    return sum(1 for s in client.list_services() for v in s.vnodes if v.phase == phase)


# The documented runs (see the module's docstring).
SHAPES = {
    "default": {"agents": 50, "vnodes": 1000},
    "many-nodes": {"agents": 500, "vnodes": 5000},
}


def master_config_text(agents: int, workers: int) -> str:
    """The Master's config for `agents` Agents. Each holds a WatchAssignments
    stream, which takes one of the Master's gRPC worker threads for as long
    as it is open: with fewer workers than Agents, the streams take them all
    and no unary call (heartbeat, registration) is served again. Each node
    also takes a /24 of the cluster range: the default /16 has 256."""
    text = f"max_workers: {workers}\n"
    if agents > 256:
        prefix = 24 - max(agents - 1, 1).bit_length()
        text += f"cluster_cidr: 10.0.0.0/{prefix}\n"
    return text


def agent_address(name: str) -> str:
    """One loopback address per Agent ("bench-N"): they all run on this host,
    and the Master refuses an address two READY nodes share."""
    index = int(name.rsplit("-", 1)[1])
    return f"127.1.{index // 250}.{index % 250 + 1}"


def agent_host(master: str, root: str, config_path: str, names: list[str]) -> int:
    """Run several Agents in this process until SIGTERM."""
    import dataclasses
    import threading

    from soda import config as soda_config
    from soda.agent.main import build_agent
    from soda.service import stop_event_on_signals

    stop = stop_event_on_signals()
    base = soda_config.load(soda_config.AgentConfig, config_path)
    agents = []
    for name in names:
        cfg = dataclasses.replace(base, master=master, name=name, state_dir=os.path.join(root, name),
                                  hypervisors=("fake",), address=agent_address(name))
        agent = build_agent(cfg, MasterClient(master), threading.Event())
        agent.start()
        agents.append(agent)
    stop.wait()
    for agent in agents:
        agent.stop()
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--agent-host"]:
        master, root, config_path, *names = sys.argv[2:]
        return agent_host(master, root, config_path, names)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="default",
                   help="a documented run: default (50 Agents, 1,000 virtual nodes) or many-nodes "
                        "(500 Agents, 5,000 virtual nodes); other flags override its figures")
    p.add_argument("--agents", type=int, help="physical nodes (Agents) to simulate")
    p.add_argument("--vnodes", type=int, help="virtual nodes in all")
    p.add_argument("--services", type=int, help="services they are split into (default: 50 virtual "
                                                 "nodes each)")
    p.add_argument("--agents-per-process", type=int,
                   help="Agents sharing one Python process (default: enough for at most 10 processes)")
    p.add_argument("--agent-nice", type=int, default=10,
                   help="niceness of the Agents' processes (default 10): they stand for other "
                        "machines and must not take the Master's CPU; 0 to share it equally")
    p.add_argument("--image-kib", type=int, default=256,
                   help="size of the image every Agent pulls once from the Master (default 256 KiB: "
                        "the pulls are data path, not what this bench measures)")
    p.add_argument("--agents-on-disk", dest="agents_on_tmpfs", action="store_false",
                   help="keep the Agents' state dirs on disk (default: on tmpfs, /dev/shm)")
    p.add_argument("--node-lost-seconds", type=float,
                   help="the Master's node_lost_seconds (default: its own, 10)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--master-workers", type=int, default=0,
                   help="the Master's gRPC worker threads (default: one per Agent plus 256)")
    p.add_argument("--json", action="store_true",
                   help="print the figures as one JSON object on the last line")
    args = p.parse_args()
    shape = SHAPES[args.shape]
    args.agents = args.agents or shape["agents"]
    args.vnodes = args.vnodes or shape["vnodes"]
    args.services = args.services or max(1, args.vnodes // 50)
    args.agents_per_process = args.agents_per_process or max(10, -(-args.agents // 10))
    per_service = args.vnodes // args.services
    workers = args.master_workers or max(256, args.agents + 256)

    root = tempfile.mkdtemp(prefix="soda-bench-cp-")
    # The Agents' state dirs (the fake driver's guest records, pulled
    # images) on tmpfs: thousands of small atomic file replacements on this
    # machine's disk stalled whole Agent processes in writeback for seconds,
    # long enough for their nodes to be taken for LOST; on other machines
    # they would not be the Master's disk. The Master's state stays on disk.
    agent_root = (tempfile.mkdtemp(prefix="soda-bench-cp-agents-", dir="/dev/shm")
                  if args.agents_on_tmpfs and os.path.isdir("/dev/shm") else os.path.join(root, "agents"))
    procs: list[subprocess.Popen] = []
    logs = []
    addr = f"127.0.0.1:{free_port()}"

    def spawn(name, argv, nice=0):
        log = open(os.path.join(root, f"{name}.log"), "wb")
        logs.append(log)
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        if nice:
            # Not in a preexec_fn: a fork of this process, whose gRPC
            # threads run, hung in gRPC's fork handler now and then, before
            # exec (one Agent process in ten never started). A few ms at
            # nice 0 before this call are nothing.
            os.setpriority(os.PRIO_PROCESS, procs[-1].pid, nice)
        return procs[-1]

    try:
        master_config = os.path.join(root, "master.yaml")
        with open(master_config, "w") as f:
            f.write(master_config_text(args.agents, workers))
            if args.node_lost_seconds:
                f.write(f"node_lost_seconds: {args.node_lost_seconds}\n")
        master = spawn("master", [sys.executable, "-m", "soda.master.main", "--listen", addr,
                                  "--config", master_config,
                                  "--state-dir", os.path.join(root, "master"), "--log-level", "WARNING"])
        client = MasterClient(addr, timeout=60)

        def master_up():
            try:
                client.list_nodes()
                return True
            except SodaError:
                return False
        wait_for(master_up, 30, "the Master")
        config = os.path.join(root, "agent.yaml")
        with open(config, "w") as f:
            f.write(AGENT_CONFIG)
        t0 = time.monotonic()
        names = [f"bench-{i}" for i in range(args.agents)]
        per = max(1, args.agents_per_process)
        for first in range(0, args.agents, per):
            group = names[first:first + per]
            if per == 1:
                argv = [sys.executable, "-m", "soda.agent.main", "--master", addr, "--name", group[0],
                        "--address", agent_address(group[0]),
                        "--state-dir", os.path.join(agent_root, group[0]), "--hypervisor", "fake",
                        "--config", config, "--log-level", "WARNING", "--no-routes"]
            else:
                argv = [sys.executable, os.path.abspath(__file__), "--agent-host", addr, agent_root, config,
                        *group]
            spawn(f"agents-{first}", argv, nice=args.agent_nice)
        ready = [0]

        def all_registered() -> bool:
            ready[0] = sum(n.state == "READY" for n in client.list_nodes())
            return ready[0] == args.agents
        wait_for(all_registered, max(120, args.agents * 0.5),
                 lambda: f"the Agents to register ({ready[0]}/{args.agents} READY)")
        register_s = time.monotonic() - t0
        client.push_image(make_ext4_image(os.path.join(root, "img"), size=args.image_kib << 10), name="bench")
        rss_idle = peak_rss_mib(master.pid)

        create_latencies = []
        t_start = time.monotonic()
        for s in range(args.services):
            spec = model.parse_spec({"name": f"svc-{s}", "image": "bench", "nodes": per_service,
                                     "hypervisor": "fake", "resources": {"cpu": 0.1, "memory": 16, "disk": 16}})
            t = time.monotonic()
            client.create_service(spec)
            create_latencies.append(time.monotonic() - t)
        t_created = time.monotonic() - t_start
        total = per_service * args.services
        milestones = {}
        while True:
            asked = time.monotonic()
            running = count_phase(client, model.Phase.RUNNING)
            now = time.monotonic() - t_start
            for frac in (0.5, 0.9, 1.0):
                if running >= frac * total and frac not in milestones:
                    milestones[frac] = now
            if running >= total:
                break
            if now > args.timeout:
                raise SystemExit(f"only {running}/{total} RUNNING after {args.timeout:.0f} s")
            time.sleep(max(0.1, 3 * (time.monotonic() - asked)))
        t_all = milestones[1.0]
        t_del = time.monotonic()
        for s in range(args.services):
            client.delete_service(f"svc-{s}")
        delete_calls_s = time.monotonic() - t_del
        wait_for(lambda: not client.list_services(), args.timeout, "the services to be deleted")
        delete_s = time.monotonic() - t_del
        rss_peak = peak_rss_mib(master.pid)
        master_cpu = cpu_seconds(master.pid)
        agents_cpu = sum(cpu_seconds(proc.pid) for proc in procs[1:])
        wall = time.monotonic() - t0

        print(f"control plane: {args.agents} Agents (fake driver, {per} per process), {total} virtual "
              f"nodes in {args.services} services (Master: {workers} gRPC workers)")
        print(f"  agents registered           {register_s:8.2f} s")
        print(f"  create calls (all)          {t_created:8.2f} s   median {statistics.median(create_latencies)*1000:.1f} ms"
              f"  max {max(create_latencies)*1000:.1f} ms per {per_service}-node service")
        print(f"  50% RUNNING                 {milestones[0.5]:8.2f} s")
        print(f"  90% RUNNING                 {milestones[0.9]:8.2f} s")
        print(f"  100% RUNNING                {t_all:8.2f} s")
        print(f"  virtual nodes RUNNING / s   {total / t_all:8.1f}")
        print(f"  delete all (to gone)        {delete_s:8.2f} s   ({total / delete_s:.1f} vnodes/s; the delete "
              f"calls {delete_calls_s:.2f} s)")
        print(f"  CPU used over {wall:.1f} s      Master {master_cpu:.1f} s, all Agents {agents_cpu:.1f} s "
              f"(this machine has {os.cpu_count()} cores)")
        print(f"  Master peak RSS             {rss_peak:8.1f} MiB (idle with {args.agents} agents: {rss_idle:.1f} MiB)")
        if args.json:
            print(json.dumps({
                "agents": args.agents, "vnodes": total, "services": args.services,
                "register_s": round(register_s, 3), "create_calls_s": round(t_created, 3),
                "create_median_ms": round(statistics.median(create_latencies) * 1000, 1),
                "running_50_s": round(milestones[0.5], 3), "running_90_s": round(milestones[0.9], 3),
                "running_100_s": round(t_all, 3), "running_per_s": round(total / t_all, 1),
                "vnodes_running_per_s": round(total / t_all, 1),
                "create_max_ms": round(max(create_latencies) * 1000, 1),
                "agents_per_process": per, "master_workers": workers, "wall_s": round(wall, 2),
                "delete_s": round(delete_s, 3), "delete_calls_s": round(delete_calls_s, 3),
                "master_cpu_s": round(master_cpu, 2),
                "agents_cpu_s": round(agents_cpu, 2), "master_peak_rss_mib": round(rss_peak, 1),
                "master_idle_rss_mib": round(rss_idle, 1)}))
        client.close()
        return 0
    except BaseException:
        # What the processes said is the first thing to read after a failed
        # run, and the run's directory goes away below.
        for log in logs:
            log.flush()
            with open(log.name, "rb") as f:
                tail = f.read()[-3000:].decode(errors="replace").strip()
            if tail:
                print(f"--- end of {os.path.basename(log.name)}:\n{tail}", file=sys.stderr)
        raise
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(agent_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
