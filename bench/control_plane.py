#!/usr/bin/env python3
"""Control-plane throughput: how fast the Master drives virtual nodes to RUNNING.

Starts a Master and N Agents (fake hypervisor driver) as separate processes
on this machine, creates services totalling V virtual nodes, and prints the
rate at which virtual nodes reach RUNNING (as the Master reports them), the
create latency, the time until all are deleted again, and the Master's CPU
time and peak RSS (VmHWM). Everything is torn down at the end, also on
failure.

    python bench/control_plane.py [--agents 50] [--vnodes 1000] [--services V/50]
                                  [--agents-per-process max(10, N/10)]
                                  [--transport both] [--repeats 1] [--json]

Two shapes are the documented runs (`--shape` names them):

    --shape default      50 Agents, 1,000 virtual nodes in 20 services
                         (10 Agents per process)
    --shape many-nodes   500 Agents, 5,000 virtual nodes in 100 services
                         (50 Agents per process), the "many nodes" run; the
                         same as  --agents 500 --vnodes 5000
    --shape fleet        500 Agents, 10,000 virtual nodes in 200 services
                         (50 Agents per process): the scale goal's run, with
                         --fleet-restart to restart every Agent at once

A flag given with --shape overrides that figure of the shape. Services hold
50 virtual nodes each unless --services says otherwise.

`--transport` says what the parties talk:

    tls        mutual TLS, as in production: a CA made for the run (in its
               temporary directory), a master certificate for 127.0.0.1,
               an agent certificate for every Agent (its node name), and an
               operator certificate for the bench's own client
    insecure   the Master started with --insecure, every client plaintext
    both       (the default) the whole measurement once per transport, each
               with a fresh Master, Agents and state, insecure first, then a
               table of the two side by side and the ratio tls/insecure of
               virtual nodes RUNNING per second (what mutual TLS costs)

`--fleet-restart`: once all are RUNNING, every Agent process is stopped
(SIGTERM: an Agent leaves its guests running) and started again at once;
`fleet_restart_s` is the time until the Master has taken a heartbeat (a
whole inventory) from every new Agent process, every node is READY and
every virtual node RUNNING, `fleet_restart_guests_started` the
guests the fake driver started meanwhile (its own count on disk; 0 means
every guest was adopted).

`--profile [TOP]` samples the Master with py-spy (bench/profile.py) from
the first create call to the last deletion and prints its TOP functions
(default 5) by own time and by total time; with --json they are in
`master_profile`.

`--repeats N` makes that N measurements per transport; with both they run
in insecure/tls pairs (ABAB), and every figure is the median of its runs,
the ratio the median of the pairs' ratios.

Agents are real soda-agent code talking gRPC to the Master process; several
share one Python process (`--agents-per-process`, by default enough for at
most 10 processes) so that hundreds of interpreters do not starve the Master
of this machine's CPU. With 1 every Agent is its own process, as in
production. The Agents' processes run at nice 10 (`--agent-nice`): they
stand for other machines. Every Agent heartbeats every 2 s and holds two
streams (WatchAssignments, WatchLogOrders), each of which takes one of the
Master's gRPC worker threads: the Master gets two workers per Agent plus
256 (its own limit keeps an eighth for single calls), and a cluster range
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
`master_peak_rss_mib`, `master_cpu_s`, `create_median_ms`, `create_max_ms`,
`delete_s`, `delete_calls_s`, `wall_s` and more, and `transport` ("tls",
"insecure" or "both") and `repeats`. With both, those figures are the TLS
run's (the production default); `insecure` holds the same keys for the
plaintext run, and `tls_vs_insecure_vnodes_per_s` is the ratio of
`vnodes_running_per_s` tls/insecure. With --repeats above 1 every figure is
a median, `vnodes_running_per_s_runs` (at top level and in `insecure`) lists
the runs' rates and `tls_vs_insecure_pairs` the pairs' ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soda import model, pki  # noqa: E402
from soda.config import TlsConfig  # noqa: E402
from soda.errors import SodaError  # noqa: E402
from soda.rpc import tls as soda_tls  # noqa: E402
from soda.rpc.client import MasterClient  # noqa: E402
from bench.profile import Profile, print_top  # noqa: E402
from tests.support import free_port, make_ext4_image, peak_rss_mib  # noqa: E402

AGENT_CONFIG = """\
log_level: WARNING
capacity: {cpu: 64, memory: 65536, bandwidth: 100000, disk: 10000000}
drivers: {fake: {boot_seconds: 0.2, stop_seconds: 0.01}}
max_parallel_boots: 8
"""

TRANSPORTS = {"tls": ("tls",), "insecure": ("insecure",), "both": ("insecure", "tls")}


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
    "fleet": {"agents": 500, "vnodes": 10000},
}


def master_config_text(agents: int, workers: int) -> str:
    """The Master's config for `agents` Agents. Each holds two streams
    (assignments, log orders), each of which takes one of the Master's gRPC
    worker threads for as long as it is open; the Master admits streams only
    up to seven eighths of its workers (soda.rpc.streams), and a refused
    watch would stall its Agent. Each node also takes a /24 of the cluster
    range: the default /16 has 256."""
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


# ---- TLS ------------------------------------------------------------------

class Pki:
    """The run's CA (in its temporary directory) and the certificates of
    its parties: the Master (for 127.0.0.1, the address everyone dials),
    the bench's client (an operator) and every Agent (its node name: an
    Agent may register and heartbeat only as the name it is certified
    for)."""

    def __init__(self, path: str, agent_names: list[str]):
        self.ca = pki.CertificateAuthority(path)
        self.ca.init("bench")
        self.master = self.issue("master", "bench", hosts=["127.0.0.1"])
        self.operator = self.issue("operator", "bench")
        self.agents = {name: self.issue("agent", name) for name in agent_names}

    def issue(self, role: str, name: str, hosts: list[str] = ()) -> TlsConfig:
        self.ca.issue(role, name, hosts=hosts)
        return self.ca.tls(role, name)


# In each Agent's state dir, once the Master has accepted a heartbeat of
# this Agent process (its whole inventory): the time, for --fleet-restart.
HEARD = "bench-first-heartbeat"


class _CountedHeartbeats(MasterClient):
    """An Agent's client that notes its first heartbeat the Master took."""

    def __init__(self, *args, marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self._marker = marker
        self._noted = False

    def heartbeat(self, node, statuses, **kwargs):
        answer = super().heartbeat(node, statuses, **kwargs)
        if not self._noted:
            self._noted = True
            with open(self._marker, "w") as f:
                f.write(repr(time.time()))
        return answer


def agent_host(master: str, root: str, config_path: str, ca_dir: str, names: list[str]) -> int:
    """Run several Agents in this process until SIGTERM; with `ca_dir` ("" for
    plaintext) each talks mutual TLS with the agent certificate issued
    there for its name."""
    import dataclasses
    import threading

    from soda import config as soda_config
    from soda.agent.main import build_agent
    from soda.service import stop_event_on_signals

    stop = stop_event_on_signals()
    base = soda_config.load(soda_config.AgentConfig, config_path)
    certified = {}
    if ca_dir:
        ca = pki.CertificateAuthority(ca_dir)
        certified = {e.name: ca.tls("agent", e.name) for e in ca.list() if e.role == "agent"}
    agents = []
    for name in names:
        if ca_dir and name not in certified:
            raise SystemExit(f"{ca_dir} issued no agent certificate for {name}")
        cfg = dataclasses.replace(base, master=master, name=name, state_dir=os.path.join(root, name),
                                  hypervisors=("fake",), address=agent_address(name),
                                  tls=certified[name] if ca_dir else base.tls)
        agent = build_agent(cfg, _CountedHeartbeats(master, tls=cfg.tls, marker=os.path.join(root, name, HEARD)),
                            threading.Event())
        agent.start()
        agents.append(agent)
    stop.wait()
    for agent in agents:
        agent.stop()
    return 0


# ---- one measurement --------------------------------------------------------

class Processes:
    """The processes one measurement starts, each logging to a file in the
    run's directory. stop() ends every one of them by its pid."""

    def __init__(self, root: str):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.logs = []

    def spawn(self, name: str, argv: list[str], nice: int = 0) -> subprocess.Popen:
        log = open(os.path.join(self.root, f"{name}.log"), "wb")
        self.logs.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        if nice:
            # Not in a preexec_fn: a fork of this process, whose gRPC
            # threads run, hung in gRPC's fork handler now and then, before
            # exec (one Agent process in ten never started). A few ms at
            # nice 0 before this call are nothing.
            os.setpriority(os.PRIO_PROCESS, proc.pid, nice)
        return proc

    def print_log_tails(self) -> None:
        # What the processes said is the first thing to read after a failed
        # run, and the run's directory goes away after it.
        for log in self.logs:
            log.flush()
            with open(log.name, "rb") as f:
                tail = f.read()[-3000:].decode(errors="replace").strip()
            if tail:
                print(f"--- end of {os.path.basename(log.name)}:\n{tail}", file=sys.stderr)

    @staticmethod
    def end(procs: list[subprocess.Popen]) -> None:
        """SIGTERM all of `procs` at once (an Agent leaves its guests
        running), then wait for each; SIGKILL one that takes over 15 s."""
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        self.end(self.procs)
        for log in self.logs:
            log.close()


def measure(args, transport: str) -> dict:
    """One whole measurement over `transport` ("tls" or "insecure"): a fresh
    Master, Agents and state, all gone again when it returns or fails.
    Prints its figures and returns them (the JSON keys)."""
    root = tempfile.mkdtemp(prefix="soda-bench-cp-")
    # The Agents' state dirs (the fake driver's guest records, pulled
    # images) on tmpfs: thousands of small atomic file replacements on this
    # machine's disk stalled whole Agent processes in writeback for seconds,
    # long enough for their nodes to be taken for LOST; on other machines
    # they would not be the Master's disk. The Master's state stays on disk.
    agent_root = (tempfile.mkdtemp(prefix="soda-bench-cp-agents-", dir="/dev/shm")
                  if args.agents_on_tmpfs and os.path.isdir("/dev/shm") else os.path.join(root, "agents"))
    procs = Processes(root)
    try:
        names = [f"bench-{i}" for i in range(args.agents)]
        # Certificates before any clock starts: issuing is the operator's
        # work before a cluster exists, not the control plane's.
        certs = Pki(os.path.join(root, "ca"), names) if transport == "tls" else None
        addr = f"127.0.0.1:{free_port()}"
        master = start_master(args, procs, addr, certs)
        with MasterClient(addr, timeout=60, tls=certs.operator if certs else None) as client:
            wait_for(lambda: master_up(master, client), 30, "the Master")
            t0 = time.monotonic()
            agent_procs = start_agents(args, procs, agent_root, addr, certs, names)
            ready = [0]

            def all_registered() -> bool:
                ready[0] = sum(n.state == "READY" for n in client.list_nodes())
                return ready[0] == args.agents
            wait_for(all_registered, max(120, args.agents * 0.5),
                     lambda: f"the Agents to register ({ready[0]}/{args.agents} READY)")
            # From the first create to the last deletion: what the bench
            # measures, not the Agents' registration.
            with Profile(master.pid, root) if args.profile else contextlib.nullcontext() as profile:
                def restart_agents() -> list[subprocess.Popen]:
                    procs.end(agent_procs)
                    return start_agents(args, procs, agent_root, addr, certs, names)
                figures = load(args, client, master, agent_procs, root, t0,
                               restart_agents if args.fleet_restart else None, agent_root)
        figures = {"transport": transport, **figures}
        print_run(figures)
        if args.profile:
            figures["master_profile"] = profile.summary(args.profile)
            if args.profile_keep and os.path.exists(profile.path):
                shutil.copyfile(profile.path, f"{args.profile_keep}.{transport}.txt")
            print_top(figures["master_profile"], "Master profile (create to all deleted)")
        return figures
    except BaseException:
        procs.print_log_tails()
        raise
    finally:
        procs.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(agent_root, ignore_errors=True)


def start_master(args, procs: Processes, addr: str, certs: Pki | None) -> subprocess.Popen:
    master_config = os.path.join(procs.root, "master.yaml")
    with open(master_config, "w") as f:
        f.write(master_config_text(args.agents, args.master_workers))
        if args.node_lost_seconds:
            f.write(f"node_lost_seconds: {args.node_lost_seconds}\n")
    return procs.spawn("master", [sys.executable, "-m", "soda.master.main", "--listen", addr,
                                  "--config", master_config, "--state-dir", os.path.join(procs.root, "master"),
                                  "--log-level", "WARNING",
                                  *(soda_tls.flags(certs.master) if certs else ["--insecure"])])


def master_up(master: subprocess.Popen, client: MasterClient) -> bool:
    if master.poll() is not None:
        # A Master that refused to start (a flag, a certificate) says why in
        # its log, printed on the way out: no point in waiting for it.
        raise SystemExit(f"the Master exited with {master.returncode}")
    try:
        client.list_nodes()
        return True
    except SodaError:
        return False


def start_agents(args, procs: Processes, agent_root: str, addr: str, certs: Pki | None,
                 names: list[str]) -> list[subprocess.Popen]:
    """The Agents' processes: each Agent its own soda-agent with
    --agents-per-process 1, else groups of them in this script's
    --agent-host, which finds their certificates in the CA's directory."""
    config = os.path.join(procs.root, "agent.yaml")
    with open(config, "w") as f:
        f.write(AGENT_CONFIG)
    per = args.agents_per_process
    started = []
    for first in range(0, args.agents, per):
        group = names[first:first + per]
        if per == 1:
            argv = [sys.executable, "-m", "soda.agent.main", "--master", addr, "--name", group[0],
                    "--address", agent_address(group[0]),
                    "--state-dir", os.path.join(agent_root, group[0]), "--hypervisor", "fake",
                    "--config", config, "--log-level", "WARNING", "--no-routes",
                    *soda_tls.flags(certs.agents[group[0]] if certs else None)]
        else:
            argv = [sys.executable, os.path.abspath(__file__), "--agent-host", addr, agent_root, config,
                    certs.ca.path if certs else "", *group]
        started.append(procs.spawn(f"agents-{first}", argv, nice=args.agent_nice))
    return started


def fake_starts(agent_root: str) -> int:
    """Guest starts of every Agent's fake driver, as the driver itself
    counts them on disk (soda.hypervisors.fake, `_starts.json`)."""
    total = 0
    for top, _, files in os.walk(agent_root):
        if "_starts.json" in files:
            with open(os.path.join(top, "_starts.json")) as f:
                total += sum(json.load(f).get("starts", {}).values())
    return total


def fleet_restart(args, client: MasterClient, restart, agent_root: str, total: int) -> dict:
    """Every Agent stopped and started again at once while its guests run:
    the time until every new Agent process has had a heartbeat taken, every
    node is READY and every virtual node RUNNING, and how many guests were started meanwhile (0: all
    adopted)."""
    starts = fake_starts(agent_root)
    markers = [os.path.join(agent_root, f"bench-{i}", HEARD) for i in range(args.agents)]
    for marker in markers:
        if os.path.exists(marker):
            os.unlink(marker)
    began = time.monotonic()
    agent_procs = restart()
    waiting = [args.agents, total]

    def converged() -> bool:
        # Every new Agent process has had a heartbeat (its whole inventory)
        # taken by the Master, every node is READY, every virtual node RUNNING.
        waiting[0] = sum(1 for m in markers if not os.path.exists(m))
        if not waiting[0]:
            waiting[0] = sum(1 for n in client.list_nodes() if n.state != "READY")
        waiting[1] = total - count_phase(client, model.Phase.RUNNING)
        return waiting == [0, 0]
    wait_for(converged, args.timeout, lambda: f"the fleet to converge ({waiting[0]} nodes without a "
                                              f"heartbeat taken or not READY, {waiting[1]} virtual nodes "
                                              f"not RUNNING)")
    return {"fleet_restart_s": round(time.monotonic() - began, 3),
            "fleet_restart_guests_started": fake_starts(agent_root) - starts,
            "agent_procs": agent_procs}


def load(args, client: MasterClient, master: subprocess.Popen, agent_procs: list[subprocess.Popen],
         root: str, t0: float, restart=None, agent_root: str = "") -> dict:
    """With every Agent READY (`t0` when their processes were started):
    push the image, create the services, wait for every virtual node to
    run, (with `restart`, restart every Agent at once and wait until all
    is RUNNING again,) delete them all; the figures."""
    register_s = time.monotonic() - t0
    client.push_image(make_ext4_image(os.path.join(root, "img"), size=args.image_kib << 10), name="bench")
    rss_idle = peak_rss_mib(master.pid)

    per_service = args.vnodes // args.services
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
    fleet = {}
    if restart is not None:
        fleet = fleet_restart(args, client, restart, agent_root, total)
        agent_procs = fleet.pop("agent_procs")
    t_del = time.monotonic()
    for s in range(args.services):
        client.delete_service(f"svc-{s}")
    delete_calls_s = time.monotonic() - t_del
    wait_for(lambda: not client.list_services(), args.timeout, "the services to be deleted")
    delete_s = time.monotonic() - t_del
    rss_peak = peak_rss_mib(master.pid)
    master_cpu = cpu_seconds(master.pid)
    agents_cpu = sum(cpu_seconds(proc.pid) for proc in agent_procs)
    wall = time.monotonic() - t0
    return {
        "agents": args.agents, "vnodes": total, "services": args.services,
        "register_s": round(register_s, 3), "create_calls_s": round(t_created, 3),
        "create_median_ms": round(statistics.median(create_latencies) * 1000, 1),
        "running_50_s": round(milestones[0.5], 3), "running_90_s": round(milestones[0.9], 3),
        "running_100_s": round(t_all, 3), "running_per_s": round(total / t_all, 1),
        "vnodes_running_per_s": round(total / t_all, 1),
        "create_max_ms": round(max(create_latencies) * 1000, 1),
        "agents_per_process": args.agents_per_process, "master_workers": args.master_workers,
        "wall_s": round(wall, 2), "delete_s": round(delete_s, 3), "delete_calls_s": round(delete_calls_s, 3),
        "delete_per_s": round(total / delete_s, 1),
        "master_cpu_s": round(master_cpu, 2),
        "agents_cpu_s": round(agents_cpu, 2), "master_peak_rss_mib": round(rss_peak, 1),
        "master_idle_rss_mib": round(rss_idle, 1), "per_service": per_service, **fleet}


def print_run(f: dict) -> None:
    print(f"control plane over {f['transport']}: {f['agents']} Agents (fake driver, {f['agents_per_process']} "
          f"per process), {f['vnodes']} virtual nodes in {f['services']} services (Master: "
          f"{f['master_workers']} gRPC workers)")
    print(f"  agents registered           {f['register_s']:8.2f} s")
    print(f"  create calls (all)          {f['create_calls_s']:8.2f} s   median {f['create_median_ms']:.1f} ms"
          f"  max {f['create_max_ms']:.1f} ms per {f['per_service']}-node service")
    print(f"  50% RUNNING                 {f['running_50_s']:8.2f} s")
    print(f"  90% RUNNING                 {f['running_90_s']:8.2f} s")
    print(f"  100% RUNNING                {f['running_100_s']:8.2f} s")
    print(f"  virtual nodes RUNNING / s   {f['vnodes_running_per_s']:8.1f}")
    if "fleet_restart_s" in f:
        print(f"  fleet restart to converged  {f['fleet_restart_s']:8.2f} s   ({f['fleet_restart_guests_started']} "
              f"guests started meanwhile)")
    print(f"  delete all (to gone)        {f['delete_s']:8.2f} s   ({f['delete_per_s']:.1f} vnodes/s; the delete "
          f"calls {f['delete_calls_s']:.2f} s)")
    print(f"  CPU used over {f['wall_s']:.1f} s      Master {f['master_cpu_s']:.1f} s, all Agents "
          f"{f['agents_cpu_s']:.1f} s (this machine has {os.cpu_count()} cores)")
    print(f"  Master peak RSS             {f['master_peak_rss_mib']:8.1f} MiB (idle with {f['agents']} agents: "
          f"{f['master_idle_rss_mib']:.1f} MiB)", flush=True)


# ---- several measurements ---------------------------------------------------

def median_figures(runs: list[dict]) -> dict:
    """One figures dict for the runs of one transport: each figure the
    median of the runs' (the shape's figures are the same in all)."""
    if len(runs) == 1:
        return dict(runs[0])
    out = {}
    for key, first in runs[0].items():
        values = [run[key] for run in runs]
        if isinstance(first, (dict, list)):
            out[key] = first        # a profile: the first run's
        else:
            out[key] = first if all(v == first for v in values) else round(statistics.median(values), 3)
    out["vnodes_running_per_s_runs"] = [run["vnodes_running_per_s"] for run in runs]
    return out


# The side-by-side table: label, key, format.
TABLE = [
    ("agents registered (s)", "register_s", "{:.2f}"),
    ("create median (ms)", "create_median_ms", "{:.1f}"),
    ("create max (ms)", "create_max_ms", "{:.1f}"),
    ("100% RUNNING (s)", "running_100_s", "{:.2f}"),
    ("virtual nodes RUNNING / s", "vnodes_running_per_s", "{:.1f}"),
    ("delete all (s)", "delete_s", "{:.2f}"),
    ("Master CPU (s)", "master_cpu_s", "{:.1f}"),
    ("all Agents CPU (s)", "agents_cpu_s", "{:.1f}"),
    ("Master peak RSS (MiB)", "master_peak_rss_mib", "{:.1f}"),
]


def print_side_by_side(figures: dict[str, dict], ratios: list[float], repeats: int) -> None:
    order = list(figures)
    print(f"\nside by side ({'median of ' + str(repeats) + ' runs each' if repeats > 1 else 'one run each'}):")
    print(f"  {'':28}" + "".join(f"{t:>12}" for t in order))
    for label, key, fmt in TABLE:
        print(f"  {label:28}" + "".join(f"{fmt.format(figures[t][key]):>12}" for t in order))
    print(f"  tls/insecure vnodes RUNNING/s {statistics.median(ratios):10.3f}")
    if repeats > 1:
        for t in order:
            print(f"  {t} runs, vnodes/s: " + " ".join(f"{v:.1f}" for v in figures[t]["vnodes_running_per_s_runs"]))
        print("  pairs' ratios: " + " ".join(f"{r:.3f}" for r in ratios)
              + f" (min {min(ratios):.3f}, max {max(ratios):.3f})")


def main() -> int:
    if sys.argv[1:2] == ["--agent-host"]:
        master, root, config_path, ca_dir, *names = sys.argv[2:]
        return agent_host(master, root, config_path, ca_dir, names)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="default",
                   help="a documented run: default (50 Agents, 1,000 virtual nodes), many-nodes "
                        "(500 Agents, 5,000 virtual nodes) or fleet (500 Agents, 10,000 virtual nodes); "
                        "other flags override its figures")
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
                   help="the Master's gRPC worker threads (default: two per Agent plus 256)")
    p.add_argument("--transport", choices=sorted(TRANSPORTS), default="both",
                   help="mutual TLS (as in production), plaintext (the Master with --insecure), "
                        "or both, one after the other, side by side (default)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measurements per transport (default 1); with both in insecure/tls pairs, "
                        "figures the medians")
    p.add_argument("--fleet-restart", action="store_true",
                   help="once all are RUNNING, stop every Agent and start them again at once: the time "
                        "until each new Agent has had a heartbeat taken and all are READY and RUNNING "
                        "(fleet_restart_s), "
                        "and the guests started meanwhile (fleet_restart_guests_started; 0 = all adopted)")
    p.add_argument("--profile", type=int, nargs="?", const=5, default=0, metavar="TOP",
                   help="sample the Master with py-spy from the first create to the last deletion "
                        "and print its TOP functions (default 5) by own and by total time; in the JSON "
                        "as master_profile")
    p.add_argument("--profile-keep", metavar="PREFIX",
                   help="with --profile, keep the raw profile as PREFIX.TRANSPORT.txt (collapsed "
                        "stacks; python bench/profile.py reads it)")
    p.add_argument("--json", action="store_true",
                   help="print the figures as one JSON object on the last line")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.fleet_restart and args.agents_per_process == 1:
        p.error("--fleet-restart needs Agents in the bench's own processes (--agents-per-process above 1): "
                "it notes their heartbeats")
    shape = SHAPES[args.shape]
    args.agents = args.agents or shape["agents"]
    args.vnodes = args.vnodes or shape["vnodes"]
    args.services = args.services or max(1, args.vnodes // 50)
    args.agents_per_process = max(1, args.agents_per_process or max(10, -(-args.agents // 10)))
    args.master_workers = args.master_workers or 2 * args.agents + 256

    transports = TRANSPORTS[args.transport]
    runs: dict[str, list[dict]] = {t: [] for t in transports}
    # Pairs back to back (ABAB): a drift of the machine over the minutes
    # of a run (page cache, another tenant) falls on both transports alike.
    for _ in range(args.repeats):
        for transport in transports:
            runs[transport].append(measure(args, transport))
    figures = {t: median_figures(runs[t]) for t in transports}

    # The TLS figures at top level when TLS ran: that is what production runs.
    out = dict(figures["tls" if "tls" in figures else "insecure"])
    out["transport"] = args.transport
    out["repeats"] = args.repeats
    if args.transport == "both":
        ratios = [tls["vnodes_running_per_s"] / insecure["vnodes_running_per_s"]
                  for tls, insecure in zip(runs["tls"], runs["insecure"])]
        print_side_by_side(figures, ratios, args.repeats)
        out["insecure"] = figures["insecure"]
        out["tls_vs_insecure_vnodes_per_s"] = round(statistics.median(ratios), 3)
        if args.repeats > 1:
            out["tls_vs_insecure_pairs"] = [round(r, 3) for r in ratios]
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
