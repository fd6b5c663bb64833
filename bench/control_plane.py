#!/usr/bin/env python3
"""Control-plane throughput: how fast the Master drives virtual nodes to RUNNING.

Starts a Master and N Agents (fake hypervisor driver) as separate processes
on this machine, creates services totalling V virtual nodes, and prints the
rate at which virtual nodes reach RUNNING (as the Master reports them), the
create latency, the time until all are deleted again, and the Master's peak
RSS (VmHWM). Everything is torn down at the end, also on failure.

    python bench/control_plane.py [--agents 50] [--vnodes 1000] [--services 20]
                                  [--agents-per-process 10]

Agents are real soda-agent code talking gRPC to the Master process; several
share one Python process (`--agents-per-process`) so that 50 interpreters do
not starve the Master of this machine's CPU. With 1 every Agent is its own
process, as in production.
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


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def count_phase(client: MasterClient, phase: model.Phase) -> int:
    return sum(1 for s in client.list_services() for v in s.vnodes if v.phase == phase)


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
    p.add_argument("--agents", type=int, default=50)
    p.add_argument("--vnodes", type=int, default=1000)
    p.add_argument("--services", type=int, default=20)
    p.add_argument("--agents-per-process", type=int, default=10)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", action="store_true",
                   help="print the figures as one JSON object on the last line")
    args = p.parse_args()
    per_service = args.vnodes // args.services

    root = tempfile.mkdtemp(prefix="soda-bench-cp-")
    procs: list[subprocess.Popen] = []
    logs = []
    addr = f"127.0.0.1:{free_port()}"

    def spawn(name, argv):
        log = open(os.path.join(root, f"{name}.log"), "wb")
        logs.append(log)
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        return procs[-1]

    try:
        master = spawn("master", [sys.executable, "-m", "soda.master.main", "--listen", addr,
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
                        "--state-dir", os.path.join(root, group[0]), "--hypervisor", "fake",
                        "--config", config, "--log-level", "WARNING"]
            else:
                argv = [sys.executable, os.path.abspath(__file__), "--agent-host", addr, root, config, *group]
            spawn(f"agents-{first}", argv)
        wait_for(lambda: sum(n.state == "READY" for n in client.list_nodes()) == args.agents, 120,
                 "the Agents to register")
        register_s = time.monotonic() - t0
        client.push_image(make_ext4_image(os.path.join(root, "img")), name="bench")
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
            running = count_phase(client, model.Phase.RUNNING)
            now = time.monotonic() - t_start
            for frac in (0.5, 0.9, 1.0):
                if running >= frac * total and frac not in milestones:
                    milestones[frac] = now
            if running >= total:
                break
            if now > args.timeout:
                raise SystemExit(f"only {running}/{total} RUNNING after {args.timeout:.0f} s")
            time.sleep(0.1)
        t_all = milestones[1.0]
        t_del = time.monotonic()
        for s in range(args.services):
            client.delete_service(f"svc-{s}")
        wait_for(lambda: not client.list_services(), args.timeout, "the services to be deleted")
        delete_s = time.monotonic() - t_del
        rss_peak = peak_rss_mib(master.pid)
        master_cpu = cpu_seconds(master.pid)
        agents_cpu = sum(cpu_seconds(proc.pid) for proc in procs[1:])
        wall = time.monotonic() - t0

        print(f"control plane: {args.agents} Agents (fake driver, {per} per process), {total} virtual "
              f"nodes in {args.services} services")
        print(f"  agents registered           {register_s:8.2f} s")
        print(f"  create calls (all)          {t_created:8.2f} s   median {statistics.median(create_latencies)*1000:.1f} ms"
              f"  max {max(create_latencies)*1000:.1f} ms per {per_service}-node service")
        print(f"  50% RUNNING                 {milestones[0.5]:8.2f} s")
        print(f"  90% RUNNING                 {milestones[0.9]:8.2f} s")
        print(f"  100% RUNNING                {t_all:8.2f} s")
        print(f"  virtual nodes RUNNING / s   {total / t_all:8.1f}")
        print(f"  delete all (to gone)        {delete_s:8.2f} s   ({total / delete_s:.1f} vnodes/s)")
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
                "delete_s": round(delete_s, 3), "master_cpu_s": round(master_cpu, 2),
                "agents_cpu_s": round(agents_cpu, 2), "master_peak_rss_mib": round(rss_peak, 1),
                "master_idle_rss_mib": round(rss_idle, 1)}))
        client.close()
        return 0
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


if __name__ == "__main__":
    sys.exit(main())
