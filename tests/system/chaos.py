"""Chaos and soak runs against a whole local cluster (soda.devcluster) with
real User-Mode Linux guests, shared by tests/system/test_chaos.py (short,
asserting) and bench/chaos.py (long, printing figures).

The run: two services that are never touched (`steady-a` through the
Switch's userspace proxy, `steady-b` through its kernel path, nftables
DNAT), each under a client loop of HTTP GETs through the Switch on
127.0.0.1; and a third, `churnN` (a new name and port each round, so that
what one round leaks is not reused by the next), created, resized and
deleted in every round. In each round one part (Master, Agent, Daemon or
Switch) is killed with SIGKILL, by the identity the launcher recorded, at a
random moment of the churn; the launcher's supervision starts it again as
the units in etc/systemd would (Restart=on-failure, RestartSec=2). Then the
cluster must settle to what the Master says it should run, checked from
outside the code under test:

- every virtual node of the Master's `sodactl -o json service list` is
  RUNNING and runs as exactly one guest: one UML session leader whose
  command line names it, inside its own cgroups, matching the Agent
  driver's record (pid and start time); no other guest process exists;
- nothing is left of what went away: cgroups below the cluster's parent,
  links (TAPs, IFBs) and permanent neighbour entries in the node
  namespace and on the uplink, guest dirs and COW files, lock files, the
  Switch's listeners and nft table contents, network namespaces, stray
  SODA processes;
- the untouched services' guests are the same processes as at the start
  (same pid and start time), and a guest watcher sampling /proc saw no
  virtual node with two guests at once.

A problem still there when a round's settle time is up is reported once,
in that round; later rounds wait only for problems of their own.

What a kill may legitimately affect (decided here, asserted by the test):
killing the Switch cuts client traffic (there is one Switch): requests
that overlap the window from the kill until the restarted Switch listens
on every untouched service again (and, for the kernel path, owns the nft
table and maps every node) are counted apart, as "failed while the Switch
was down". A Master, Agent or Daemon kill must not touch the data path:
every failed request outside those windows is a failure to an untouched
virtual node. Churn operations interrupted by a Master kill are retried,
the way a script would (create and delete are idempotent in effect).

The soak creates and deletes a 3-node service N times (a new name and port
each cycle, so per-name state that is never freed shows as growth) and
samples the Master's and the Agent's VmRSS and open descriptors.

Everything the run makes has names of its own (namespace, cgroup parent,
nft table, ports, cluster range) and goes in `close()` (LocalCluster.down,
then a last sweep of what down missed), also on failure. Only processes
the launcher or the Agent recorded are ever signalled.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable

from soda.devcluster import ClusterConfig, ClusterError, LocalCluster, RestartPolicy
from soda.devcluster.cluster import CGROUP_ROOT
from soda.devcluster.credentials import sodactl_env
from soda.hypervisors.recorded import LAUNCHER
from tests.support import free_port, traversable
from tests.system.cgroupfs import VnodeCgroups

PARTS = ("master", "agent", "daemon", "switch")
STEADY = {"steady-a": "proxy", "steady-b": "l4"}    # service -> the Switch's data path
CHURN = "churn"                 # + the round: a new service (and port) each round
NODE = "chaos-node"
# Restart as the units in etc/systemd do: Restart=on-failure, RestartSec=2
# (no RestartSteps: the delay stays 2 s), and systemd's start limit for a
# unit that sets none: 5 starts within 10 s, then the unit is given up.
UNIT_LIKE = RestartPolicy(first_delay=2.0, factor=1.0, max_delay=2.0, burst=5, interval=10.0)
CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")
ANSWER = re.compile(rb"SODA virtual node (\S+) of service (\S+)")


def now() -> float:
    return time.monotonic()


# ---- reading the machine (never the code under test) ---------------------------

@dataclasses.dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    state: str
    starttime: int
    argv: tuple[str, ...]


def read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = tuple(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return Proc(pid=pid, ppid=int(fields[1]), sid=int(fields[3]), state=fields[0],
                starttime=int(fields[19]), argv=argv)


def processes(pred: Callable[[tuple[str, ...]], bool]) -> list[Proc]:
    """Live (not zombie) processes whose command line satisfies `pred`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                raw = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        argv = tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)
        if argv and pred(argv):
            proc = read_proc(int(entry))
            if proc is not None and proc.state != "Z":
                found.append(proc)
    return found


def argv_value(argv: tuple[str, ...], key: str) -> str:
    for arg in argv:
        if arg.startswith(key + "="):
            return arg.split("=", 1)[1]
    return ""


def proc_cgroup(pid: int, controller: str) -> str | None:
    """The process's cgroup in `controller`'s v1 hierarchy, or its one v2 cgroup."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
                if controller in controllers.split(",") or (hierarchy == "0" and controllers == ""):
                    return path
    except FileNotFoundError:
        return None
    return None


def cgroup_children(controller: str, parent: str) -> set[str]:
    return set(VnodeCgroups(parent, CGROUP_ROOT).names(controller))


def cgroup_pids(controller: str, parent: str, vnode: str) -> set[int]:
    try:
        return VnodeCgroups(parent, CGROUP_ROOT).procs(vnode, controller)
    except FileNotFoundError:
        return set()


def listening_ports() -> set[int]:
    """TCP ports with a listener on 127.0.0.1 or any address (this namespace)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def run_json(argv: list[str]):
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout or "[]")


def links(netns: str | None) -> list[dict]:
    argv = ["ip", "-j", "-d", *(["-n", netns] if netns else []), "link", "show"]
    return run_json(argv) or []


def permanent_neighbours(netns: str | None, dev: str) -> set[str]:
    argv = ["ip", "-j", *(["-n", netns] if netns else []), "neigh", "show", "dev", dev, "nud", "permanent"]
    return {n["dst"] for n in run_json(argv) or []}


def nft_tables() -> list[tuple[str, str]]:
    data = run_json(["nft", "-j", "list", "tables"]) or {}
    return [(t["table"]["family"], t["table"]["name"]) for t in data.get("nftables", []) if "table" in t]


def nft_table_text(family: str, name: str) -> str:
    out = subprocess.run(["nft", "list", "table", family, name], capture_output=True, text=True, timeout=30)
    return out.stdout if out.returncode == 0 else ""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"process {pid} has no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def free_cluster_range() -> str:
    """A 10.X.0.0/16 no host route leads into: two clusters routing the same
    node /24 through their uplinks would take each other's guest traffic."""
    candidates = list(range(100, 200))
    random.shuffle(candidates)
    for x in candidates:
        net = f"10.{x}.0.0/16"
        if not run_json(["ip", "-j", "route", "show", "root", net]):
            return net
    raise RuntimeError("no free 10.X.0.0/16 for the cluster range")


# ---- the cluster under chaos --------------------------------------------------------

class ChaosCluster:
    """A LocalCluster with names of its own, sodactl, and the readers that
    check it from outside."""

    def __init__(self, work_dir: str, image: str, *, memory: int = 32, log: Callable[[str], None] = print):
        self.work_dir = work_dir
        self.image = image
        self.memory = memory
        self.log = log
        self.tag = uuid.uuid4().hex[:6]
        self.netns = f"sodak-{self.tag}"
        self.cgroup_parent = f"soda-chaos-{self.tag}"
        self.nft_table = f"soda_chaos_{self.tag}"
        switch_config = os.path.join(work_dir, "switch.yaml")
        with open(switch_config, "w") as f:
            # One table per Switch on a host: ours must not meet another run's.
            f.write(f"nft_table: {self.nft_table}\n")
        self.config = ClusterConfig(
            state_dir=traversable(os.path.join(work_dir, "cluster")),
            master_addr=f"127.0.0.1:{free_port()}",
            node=NODE, netns=self.netns, cgroup_parent=self.cgroup_parent,
            cluster_cidr=free_cluster_range(), switch_metrics=f"127.0.0.1:{free_port()}",
            switch_args=("--config", switch_config), restart=UNIT_LIKE)
        self.cluster = LocalCluster(self.config)
        self.agent_dir = self.cluster.agent_dir
        self.uml_dir = os.path.join(self.agent_dir, "uml")
        self.ports: dict[str, int] = {}                        # service -> its Switch port
        self.infra_links: set[str] = set()
        self.uplink = ""
        self.guest_pids_seen: set[tuple[int, int]] = set()     # (pid, start time) of every guest seen
        self.short_uml_dirs: set[str] = set()                   # UML dirs recorded outside the state dir
        self.part_pids_seen: set[tuple[int, int]] = set()
        self._ctl_lock = threading.Lock()
        self._ctl_procs: set[subprocess.Popen] = set()
        self._closing = False

    # ---- lifecycle ----------------------------------------------------------
    def up(self) -> None:
        os.makedirs(self.config.state_dir, exist_ok=True)
        self.cluster.up()
        self.infra_links = {link["ifname"] for link in links(self.netns)}
        self._record_parts()
        self.ctl_ok("image", "push", self.image, "--name", "busybox-httpd")

    def close(self) -> list[str]:
        """LocalCluster.down, then whatever it left (by recorded identity
        only); returns what was left after down, read from the kernel."""
        with self._ctl_lock:
            self._closing = True
            for proc in self._ctl_procs:
                proc.kill()
        self._record_guests()
        try:
            self.cluster.down()
        except Exception as exc:  # noqa: BLE001 - the sweep below runs whatever happened
            self.log(f"down failed: {exc!r}")
        left = self.leftovers()
        if left:
            self.log("left after down: " + "; ".join(left))
            self._last_resort()
        return left

    def leftovers(self) -> list[str]:
        """What the cluster made and still exists, after down."""
        left = []
        if os.path.exists(os.path.join("/run/netns", self.netns)):
            left.append(f"namespace {self.netns}")
        left += [f"host link {link['ifname']}" for link in links(None)
                 if link["ifname"] == self.uplink or self.cgroup_parent in link.get("ifalias", "")]
        left += [f"cgroup {d}" for d in VnodeCgroups(self.cgroup_parent, CGROUP_ROOT).leftovers()]
        left += [f"nft table {fam} {name}" for fam, name in nft_tables() if self.tag in name]
        left += [f"process {p.pid} ({' '.join(p.argv[:4])})" for p in self.own_processes()]
        left += [f"UML dir {d}" for d in sorted(self.short_uml_dirs) if os.path.exists(d)]
        return left

    def own_processes(self) -> list[Proc]:
        """Every live process whose command line names this run's state dir
        or Master address: parts, launchers, guests."""
        marks = (self.config.state_dir, self.config.master_addr)
        return [p for p in processes(lambda argv: any(m in a for a in argv for m in marks))
                if p.pid != os.getpid()]

    def _last_resort(self) -> None:
        seen = self.guest_pids_seen | self.part_pids_seen
        for proc in self.own_processes():
            if (proc.pid, proc.starttime) in seen:
                os.kill(proc.pid, signal.SIGKILL)
        for top in VnodeCgroups(self.cgroup_parent, CGROUP_ROOT).leftovers():
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
                # Only this run's Daemon put processes below its own parent.
                try:
                    with open(os.path.join(dirpath, "cgroup.procs")) as f:
                        pids = [int(p) for p in f.read().split()]
                except FileNotFoundError:
                    pids = []
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                deadline = now() + 5
                while now() < deadline:
                    try:
                        os.rmdir(dirpath)
                        break
                    except OSError:
                        time.sleep(0.05)
        for fam, name in nft_tables():
            if self.tag in name:
                subprocess.run(["nft", "delete", "table", fam, name], capture_output=True)
        if self.uplink:
            subprocess.run(["ip", "link", "del", self.uplink], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)

    def _record_parts(self) -> None:
        for name in PARTS:
            pid = self.cluster.process(name)
            if pid is not None:
                self.part_pids_seen.add((pid.pid, pid.starttime))

    def _record_guests(self) -> None:
        for record in self.records().values():
            self.guest_pids_seen.add((record["pid"], record.get("starttime")))

    # ---- sodactl --------------------------------------------------------------
    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """sodactl; `close` kills whatever sodactl still runs (a churn
        thread's, when the run ends early)."""
        argv = [sys.executable, "-m", "soda.cli.sodactl", "--master", self.config.master_addr, *args]
        with self._ctl_lock:
            if self._closing:
                raise RuntimeError("the cluster is being taken down")
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=sodactl_env(self.config.state_dir))
            self._ctl_procs.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        finally:
            with self._ctl_lock:
                self._ctl_procs.discard(proc)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def ctl_ok(self, *args: str, timeout: float = 120) -> str:
        result = self.ctl(*args, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"sodactl {' '.join(args)} exited {result.returncode}: "
                               f"{result.stdout}{result.stderr}")
        return result.stdout

    def services(self, timeout: float = 30.0) -> dict[str, dict] | None:
        """`sodactl -o json service list` by name; None if the Master did not
        answer within `timeout` (it may be restarting)."""
        deadline = now() + timeout
        while True:
            result = self.ctl("-o", "json", "service", "list", timeout=30)
            if result.returncode == 0:
                return {s["name"]: s for s in json.loads(result.stdout)}
            if now() > deadline:
                return None
            time.sleep(0.3)

    def spec_file(self, name: str, nodes: int, port: int, mode: str = "proxy", cpu: float = 0.2,
                  drain: float = 1.0) -> str:
        path = os.path.join(self.work_dir, f"{name}.json")
        with open(path, "w") as f:
            json.dump({"name": name, "image": "busybox-httpd", "hypervisor": "uml", "nodes": nodes, "port": 80,
                       "resources": {"cpu": cpu, "memory": self.memory},
                       "switch": {"listen": f"127.0.0.1:{port}", "mode": mode, "drain_seconds": drain,
                                  "health": {"kind": "tcp", "interval": 1.0, "timeout": 1.0}}}, f)
        return path

    def create_steady(self) -> None:
        for name, mode in STEADY.items():
            self.ports[name] = free_port()
            self.ctl_ok("service", "create", "-f", self.spec_file(name, 2, self.ports[name], mode),
                        "--wait", "--timeout", "120")
        self.uplink = next((link["ifname"] for link in links(None)
                            if link["ifname"].startswith("su") and
                            self._uplink_routes(link["ifname"])), "")
        self._record_guests()

    def _uplink_routes(self, dev: str) -> bool:
        cidr = ipaddress.ip_network(self.config.cluster_cidr)
        for route in run_json(["ip", "-j", "route", "show", "dev", dev]) or []:
            try:
                if ipaddress.ip_network(route["dst"]).subnet_of(cidr):
                    return True
            except (ValueError, KeyError, TypeError):
                continue
        return False

    # ---- guests as the kernel shows them ----------------------------------------
    def guest_processes(self) -> dict[str, list[Proc]]:
        """UML processes of this run (their disk, `ubd0=`, is a COW file in
        the Agent's state dir), by the virtual node their `umid=` names;
        launchers not yet exec'd included."""
        mark = f"ubd0={self.uml_dir}/"
        found: dict[str, list[Proc]] = {}
        for proc in processes(lambda argv: any(a.startswith(mark) for a in argv)):
            found.setdefault(argv_value(proc.argv, "umid"), []).append(proc)
        return found

    def records(self) -> dict[str, dict]:
        """The UML driver's records (guest.json) under the Agent's state dir."""
        found = {}
        try:
            entries = os.listdir(self.uml_dir)
        except FileNotFoundError:
            return found
        for entry in entries:
            path = os.path.join(self.uml_dir, entry, "guest.json")
            try:
                with open(path) as f:
                    found[entry] = json.load(f)
            except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
                continue
        return found

    def leaders(self) -> dict[str, list[Proc]]:
        """Per virtual node, its guest session leaders (the UML main process,
        started in a session of its own); more than one is a doubled node."""
        return {vnode: [p for p in procs if p.pid == p.sid]
                for vnode, procs in self.guest_processes().items()}


# ---- the checks ---------------------------------------------------------------------

@dataclasses.dataclass
class Problem:
    kind: str          # lost | doubled | leak | state | restarted
    what: str          # the same thing wrong gives the same words: problems are told apart by them
    detail: str = ""   # what may change while it stays wrong (a reason, a retry delay)

    def __str__(self) -> str:
        return f"{self.kind}: {self.what}" + (f" ({self.detail})" if self.detail else "")

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.what


def check(c: ChaosCluster, steady_identity: dict[str, tuple[int, int]]) -> list[Problem]:
    """What is wrong now, comparing the Master's desired state with what
    runs, and what runs with what should be left."""
    problems: list[Problem] = []
    services = c.services()
    if services is None:
        return [Problem("state", "the Master does not answer sodactl")]
    wanted: dict[str, dict] = {}
    for name, svc in services.items():
        if name not in STEADY:
            problems.append(Problem("state", f"service {name} still listed",
                                    f"{svc['state']}, deleting={svc['deleting']}"))
        if svc["nodes"] != len([v for v in svc["vnodes"] if not v["deleting"]]):
            problems.append(Problem("state", f"service {name}: {svc['nodes']} nodes wanted, "
                                    f"{len(svc['vnodes'])} listed"))
        for v in svc["vnodes"]:
            wanted[v["name"]] = v
            if v["phase"] != "RUNNING" or v["deleting"]:
                problems.append(Problem("lost", f"{v['name']} is {v['phase']}"
                                        f"{' and deleting' if v['deleting'] else ''}",
                                        v["reason"] or "no reason given"))
    for name in STEADY:
        if name not in services:
            problems.append(Problem("lost", f"service {name} is gone from the Master"))

    # Guest processes: exactly one session leader per wanted virtual node, in
    # its own cgroups, the one the driver recorded; nothing else.
    groups = c.guest_processes()
    records = c.records()
    for vnode, procs in groups.items():
        leaders = [p for p in procs if p.pid == p.sid]
        for p in procs:
            c.guest_pids_seen.add((p.pid, p.starttime))
        if vnode not in wanted:
            problems += [Problem("leak", f"guest process {p.pid} of {vnode}, which the Master does not want")
                         for p in procs]
            continue
        if len(leaders) > 1:
            problems.append(Problem("doubled", f"{vnode} runs as {len(leaders)} guests: "
                                    f"{sorted(p.pid for p in leaders)}"))
        orphans = [p.pid for p in procs if p.sid not in {leader.pid for leader in leaders}]
        if orphans:
            problems += [Problem("leak", f"UML helper process {pid} of {vnode} outlived its guest")
                         for pid in orphans]
        for leader in leaders:
            for controller in ("cpu", "memory", "pids"):
                path = proc_cgroup(leader.pid, controller)
                if path != f"/{c.cgroup_parent}/{vnode}":
                    problems.append(Problem("state", f"{vnode}: guest {leader.pid} is in {controller} "
                                            f"cgroup {path}"))
        record = records.get(vnode)
        if record is None:
            problems.append(Problem("state", f"{vnode}: guest runs ({[p.pid for p in leaders]}) without "
                                    f"a driver record"))
        elif leaders and (record["pid"], record.get("starttime")) not in {(p.pid, p.starttime) for p in leaders}:
            problems.append(Problem("state", f"{vnode}: the driver recorded pid {record['pid']}, "
                                    f"the guest is {[p.pid for p in leaders]}"))
    for vnode in wanted:
        if not [p for p in groups.get(vnode, []) if p.pid == p.sid]:
            problems.append(Problem("lost", f"{vnode}: no guest process"))
    for vnode, record in records.items():
        if record.get("uml_dir", "").startswith("/run/"):
            c.short_uml_dirs.add(record["uml_dir"])
        if vnode not in wanted:
            problems.append(Problem("leak", f"driver record of {vnode}, which the Master does not want"))

    # Untouched services: the same guests as at the start.
    for vnode, ident in steady_identity.items():
        leaders = [p for p in groups.get(vnode, []) if p.pid == p.sid]
        if leaders and (leaders[0].pid, leaders[0].starttime) != ident:
            problems.append(Problem("restarted", f"{vnode} was started again: pid {ident[0]} -> "
                                    f"{leaders[0].pid}"))

    # Guest dirs, COW layers and lock files.
    try:
        entries = os.listdir(c.uml_dir)
    except FileNotFoundError:
        entries = []
    for entry in entries:
        base = entry[:-len(".lock")] if entry.endswith(".lock") else entry
        if base not in wanted:
            problems.append(Problem("leak", f"{os.path.join(c.uml_dir, entry)} of a virtual node that is gone"))

    # cgroups below the cluster's parent, in every hierarchy.
    for controller in CONTROLLERS:
        extra = cgroup_children(controller, c.cgroup_parent) - set(wanted)
        missing = set(wanted) - cgroup_children(controller, c.cgroup_parent)
        problems += [Problem("leak", f"{controller} cgroup {c.cgroup_parent}/{vnode} of a gone virtual node")
                     for vnode in sorted(extra)]
        problems += [Problem("state", f"{vnode} has no {controller} cgroup") for vnode in sorted(missing)]
        for vnode in set(wanted) & cgroup_children(controller, c.cgroup_parent):
            members = cgroup_pids(controller, c.cgroup_parent, vnode)
            # A guest makes a host process for each of its own (httpd forks one
            # per request): one newer than `groups` is looked at again.
            foreign = [pid for pid in members - {p.pid for p in groups.get(vnode, [])}
                       if (proc := read_proc(pid)) is not None and argv_value(proc.argv, "umid") != vnode]
            problems += [Problem("leak", f"{controller} cgroup of {vnode} holds process {pid}, not its guest's")
                         for pid in sorted(foreign)]

    # Links and neighbour entries in the node's namespace and on the uplink.
    taps: dict[str, list[str]] = {}
    ifbs: dict[str, list[str]] = {}
    for link in links(c.netns):
        name, alias = link["ifname"], link.get("ifalias", "")
        fields = dict(w.split("=", 1) for w in alias.split() if "=" in w)
        if alias.startswith("soda-tap"):
            taps.setdefault(fields.get("vnode", "?"), []).append(name)
        elif alias.startswith("soda-daemon"):
            ifbs.setdefault(fields.get("vnode", "?"), []).append(name)
        elif name not in c.infra_links:
            problems.append(Problem("leak", f"link {name} in {c.netns} ({alias or 'no alias'})"))
    for kind, found in (("TAP", taps), ("IFB", ifbs)):
        for vnode, names in found.items():
            if vnode not in wanted:
                problems += [Problem("leak", f"{kind} {name} of gone virtual node {vnode}") for name in names]
            elif len(names) > 1:
                problems.append(Problem("leak", f"{vnode} has {len(names)} {kind}s: {names}"))
        for vnode in set(wanted) - set(found):
            problems.append(Problem("state", f"{vnode} has no {kind}"))
    for vnode, record in records.items():
        tap = record.get("spec", {}).get("tap")
        if vnode in wanted and tap and tap not in taps.get(vnode, []):
            problems.append(Problem("state", f"{vnode}: recorded TAP {tap} is not its TAP {taps.get(vnode)}"))
    addresses = {v["address"] for v in wanted.values() if v["address"]}
    for where, neigh in (("bridge soda0", permanent_neighbours(c.netns, "soda0")),
                         (f"uplink {c.uplink}", permanent_neighbours(None, c.uplink) if c.uplink else set())):
        problems += [Problem("leak", f"permanent neighbour entry for {address} on {where}, no guest has it")
                     for address in sorted(neigh - addresses)]

    # Namespaces, the Switch's listeners and its nft table.
    namespaces = [n.split()[0] for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                        text=True).stdout.splitlines() if n.strip()]
    extra_ns = [n for n in namespaces if c.tag in n and n != c.netns]
    problems += [Problem("leak", f"network namespace {name}") for name in extra_ns]
    ports = listening_ports()
    for name in STEADY:
        if c.ports.get(name) not in ports:
            problems.append(Problem("state", f"the Switch does not listen for {name} on {c.ports.get(name)}"))
    for name, port in c.ports.items():
        if name not in STEADY and name not in services and port in ports:
            problems.append(Problem("leak", f"something still listens on deleted {name}'s port {port}"))
    tables = [(fam, name) for fam, name in nft_tables() if c.tag in name]
    if tables != [("ip", c.nft_table)]:
        problems.append(Problem("leak" if len(tables) > 1 else "state", f"nft tables of this run: {tables}"))
    else:
        mapped = set(re.findall(r"(\d+\.\d+\.\d+\.\d+) \. \d+", nft_table_text("ip", c.nft_table)))
        l4 = {v["address"] for name, svc in services.items() if STEADY.get(name) == "l4" for v in svc["vnodes"]}
        if mapped != l4:
            problems.append(Problem("leak" if mapped - l4 else "state",
                                    f"nft maps {sorted(mapped)}, the l4 service's nodes are {sorted(l4)}"))

    # SODA processes: one of each part, the one the launcher recorded.
    own = c.own_processes()
    for part, module in (("master", "soda.master.main"), ("agent", "soda.agent.main"),
                         ("daemon", "soda.daemon.main"), ("switch", "soda.switch.main")):
        pids = sorted(p.pid for p in own if module in p.argv)
        recorded = c.cluster.process(part)
        if pids != ([recorded.pid] if recorded is not None else []):
            problems.append(Problem("leak" if len(pids) > 1 else "state",
                                    f"{part} processes {pids}, the launcher recorded "
                                    f"{recorded.pid if recorded else None}"))
    problems += [Problem("leak", f"guest launcher {p.pid} never exec'd ({argv_value(p.argv, 'umid')})")
                 for p in own if LAUNCHER in p.argv]
    return problems


# ---- traffic ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Request:
    service: str
    start: float
    end: float
    vnode: str          # who answered; "" if it failed
    error: str          # "" if it succeeded


class ClientLoop(threading.Thread):
    """HTTP GETs to one service through the Switch, one every `gap`
    seconds, until stopped, `max_requests` or `deadline`."""

    def __init__(self, service: str, port: int, *, gap: tuple[float, float], timeout: float,
                 max_requests: int, deadline: float, seed: int):
        super().__init__(name=f"client-{service}", daemon=True)
        self.service, self.port = service, port
        self.gap, self.timeout = gap, timeout
        self.max_requests, self.deadline = max_requests, deadline
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.requests: list[Request] = []

    def run(self) -> None:
        while not self.stop.is_set() and len(self.requests) < self.max_requests and now() < self.deadline:
            self.requests.append(self.one())
            self.stop.wait(self.rng.uniform(*self.gap))

    def one(self) -> Request:
        started = now()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout) as s:
                s.settimeout(self.timeout)
                s.sendall(b"GET / HTTP/1.0\r\nHost: chaos\r\n\r\n")
                data = b""
                while len(data) < 65536 and now() - started < self.timeout:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError as exc:
            return Request(self.service, started, now(), "", f"{type(exc).__name__}: {exc}")
        m = ANSWER.search(data)
        if not data.startswith(b"HTTP/1.") or b" 200 " not in data.split(b"\r\n", 1)[0] or m is None \
                or m.group(2).decode() != self.service:
            return Request(self.service, started, now(), "", f"unexpected answer {data[:60]!r}")
        return Request(self.service, started, now(), m.group(1).decode(), "")


class GuestWatcher(threading.Thread):
    """Samples the guest processes every `period` seconds: a virtual node
    seen with two guest sessions at once is doubled."""

    def __init__(self, c: ChaosCluster, period: float = 0.25):
        super().__init__(name="guest-watcher", daemon=True)
        self.c, self.period = c, period
        self.stop = threading.Event()
        self.doubled: dict[str, set[int]] = {}
        self.samples = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for vnode, leaders in self.c.leaders().items():
                for p in leaders:
                    self.c.guest_pids_seen.add((p.pid, p.starttime))
                if len(leaders) > 1:
                    self.doubled.setdefault(vnode, set()).update(p.pid for p in leaders)
            self.samples += 1
            self.stop.wait(self.period)


# ---- the churn ----------------------------------------------------------------------

class Churn(threading.Thread):
    """create → running → resize → running as resized → delete → gone, for
    the service `churn`; each step retried through a Master restart."""

    def __init__(self, c: ChaosCluster, name: str, rng: random.Random, step_timeout: float):
        super().__init__(name=name, daemon=True)
        self.c, self.service, self.step_timeout = c, name, step_timeout
        c.ports[name] = free_port()
        self.nodes = rng.choice((1, 2))
        self.resize_to = rng.choice([(n, cpu) for n in (1, 2, 3) for cpu in (0.2, 0.3)
                                     if (n, cpu) != (self.nodes, 0.2)])
        self.step = "starting"
        self.retries = 0
        self.retry_reasons: list[str] = []          # what sodactl said when a step had to be retried
        self.failures: list[str] = []
        self.finished_at: float | None = None

    def run(self) -> None:
        c = self.c
        try:
            nodes, cpu = self.resize_to
            name = self.service
            self._do("create", ["service", "create", "-f", c.spec_file(name, self.nodes, c.ports[name])],
                     done=lambda s: self._running(s, self.nodes, 0.2), begun=lambda s: s is not None)
            self._do("resize", ["service", "resize", name, "--nodes", str(nodes), "--cpu", str(cpu)],
                     done=lambda s: self._running(s, nodes, cpu),
                     begun=lambda s: s is not None and s["nodes"] == nodes and
                     all(v["resources"]["cpu"] == cpu for v in s["vnodes"] if not v["deleting"]))
            self._do("delete", ["service", "delete", name], done=lambda s: s is None,
                     begun=lambda s: s is None or s["deleting"])
            self.step = "done"
        except Exception as exc:  # noqa: BLE001 - reported as a churn failure
            self.failures.append(f"{self.step}: {exc!r}")
            self.step = "failed"
        finally:
            self.finished_at = now()

    @staticmethod
    def _running(svc: dict | None, nodes: int, cpu: float) -> bool:
        return svc is not None and not svc["deleting"] and len(svc["vnodes"]) == nodes and \
            all(v["phase"] == "RUNNING" and v["resources"]["cpu"] == cpu for v in svc["vnodes"])

    def _do(self, step: str, args: list[str], done, begun) -> None:
        """Run `sodactl args --wait`; if it fails (a Master killed under it),
        look at the service: once the change is committed, wait for `done`;
        else issue it again."""
        self.step = step
        deadline = now() + self.step_timeout
        last = ""
        while now() < deadline:
            result = self.c.ctl(*args, "--wait", "--timeout", f"{max(1.0, deadline - now()):.0f}",
                                timeout=self.step_timeout + 30)
            if result.returncode == 0:
                return
            last = ((result.stderr or result.stdout).strip().splitlines() or [f"exit {result.returncode}"])[-1]
            self.retries += 1
            self.retry_reasons.append(f"{step}: {last}")
            while now() < deadline:
                services = self.c.services(timeout=deadline - now())
                if services is None:
                    break
                svc = services.get(self.service)
                if done(svc):
                    return
                if not begun(svc):
                    break           # not committed: issue it again
                time.sleep(0.3)
            time.sleep(0.2)
        raise TimeoutError(f"churn {step} not done within {self.step_timeout:g} s (last sodactl: {last})")


# ---- the run ------------------------------------------------------------------------

@dataclasses.dataclass
class Settings:
    rounds: int = 50
    seed: int = 0
    memory: int = 32
    gap: tuple[float, float] = (0.02, 0.05)     # between requests, per service
    request_timeout: float = 3.0
    kill_within: float = 4.5        # the kill comes this long at most after the churn starts
    settle_timeout: float = 60.0
    step_timeout: float = 90.0
    restart_timeout: float = 30.0
    soak_cycles: int = 0
    soak_sample_at: int = 50
    soak_nodes: int = 3
    max_seconds: float = 3600.0     # bounds the client loops


@dataclasses.dataclass
class Kill:
    round: int
    part: str
    at: float
    churn_step: str
    restarted_after: float = float("nan")
    serving_at: float | None = None     # when it served again (the Switch: every untouched service)


@dataclasses.dataclass
class RoundResult:
    kill: Kill
    settle_seconds: float
    problems: list[Problem]         # new in this round, still there when it ended
    churn_retries: int = 0


@dataclasses.dataclass
class ChaosResult:
    rounds: list[RoundResult] = dataclasses.field(default_factory=list)
    requests: list[Request] = dataclasses.field(default_factory=list)
    doubled: dict[str, set[int]] = dataclasses.field(default_factory=dict)
    soak: dict = dataclasses.field(default_factory=dict)
    left_after_down: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    # ---- classification ---------------------------------------------------
    def switch_windows(self) -> list[tuple[float, float]]:
        return [(r.kill.at, r.kill.serving_at or float("inf")) for r in self.rounds if r.kill.part == "switch"]

    def failed(self) -> list[Request]:
        return [q for q in self.requests if q.error]

    def failed_switch_down(self) -> list[Request]:
        windows = self.switch_windows()
        return [q for q in self.failed() if any(q.start <= end and q.end >= begin for begin, end in windows)]

    def switch_down_offsets(self, service: str) -> list[float]:
        """When, after its Switch kill, each request of `service` that failed
        while the Switch was down began (s): the kernel path keeps
        forwarding until the restarted Switch takes its table over."""
        out = []
        for q in self.failed_switch_down():
            r = self.round_of(q.end)
            if q.service == service and r is not None:
                out.append(round(q.start - r.kill.at, 2))
        return out

    def failed_untouched(self) -> list[Request]:
        down = set(map(id, self.failed_switch_down()))
        return [q for q in self.failed() if id(q) not in down]

    def problems(self, kind: str | None = None) -> list[Problem]:
        """Each thing found wrong once, in the round it first stayed wrong."""
        return [p for r in self.rounds for p in r.problems if kind is None or p.kind == kind]

    def round_of(self, t: float) -> RoundResult | None:
        before = [r for r in self.rounds if r.kill.at <= t]
        return before[-1] if before else None

    def figures(self) -> dict:
        kills = {part: sum(1 for r in self.rounds if r.kill.part == part) for part in PARTS}
        restart = {part: _median([r.kill.restarted_after for r in self.rounds if r.kill.part == part])
                   for part in PARTS}
        serving = {part: _median([r.kill.serving_at - r.kill.at for r in self.rounds
                                  if r.kill.part == part and r.kill.serving_at is not None])
                   for part in PARTS}
        windows = [end - begin for begin, end in self.switch_windows() if end != float("inf")]
        per_service = {}
        for name in STEADY:
            qs = [q for q in self.requests if q.service == name]
            per_service[name] = {
                "total": len(qs), "failed": sum(1 for q in qs if q.error),
                "failed_switch_down": sum(1 for q in self.failed_switch_down() if q.service == name),
                "answered_by": dict(sorted(_count(q.vnode for q in qs if q.vnode).items()))}
        return {
            "rounds": len(self.rounds),
            "kills": kills,
            "restart_seconds_median": restart,
            "serving_again_seconds_median": serving,
            "requests": {"total": len(self.requests), "failed": len(self.failed()),
                         "failed_untouched": len(self.failed_untouched()),
                         "failed_switch_down": len(self.failed_switch_down()),
                         "per_service": per_service},
            "switch_down_seconds": {"median": _median(windows), "max": round(max(windows), 3) if windows else None},
            "lost_vnodes": len({p.what.split()[0] for p in self.problems("lost")}),
            "doubled_vnodes": len(self.doubled) + len(self.problems("doubled")),
            "restarted_untouched_vnodes": len(self.problems("restarted")),
            "leaks": len(self.problems("leak")),
            "state_mismatches": len(self.problems("state")),
            "rounds_not_settled": sum(1 for r in self.rounds if r.problems),
            "settle_seconds_median": _median([r.settle_seconds for r in self.rounds]),
            "churn_retries": sum(r.churn_retries for r in self.rounds),
            "left_after_down": len(self.left_after_down),
            "soak": self.soak,
            "seconds": round(self.seconds, 1),
        }


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v == v]
    return round(statistics.median(values), 3) if values else None


def _count(items) -> dict:
    out: dict = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def steady_identity(c: ChaosCluster) -> dict[str, tuple[int, int]]:
    out = {}
    for vnode, leaders in c.leaders().items():
        if vnode.rsplit("-", 1)[0] in STEADY and len(leaders) == 1:
            out[vnode] = (leaders[0].pid, leaders[0].starttime)
    return out


def settle(c: ChaosCluster, identity: dict[str, tuple[int, int]], timeout: float,
           known: set[tuple[str, str]] = frozenset(),
           waited_for: list[str] | None = None) -> tuple[float, list[Problem]]:
    """Wait until `check` finds nothing but the `known` problems (found in
    earlier rounds and still there); (seconds it took, the new problems still
    there at the deadline). `waited_for` gets each problem seen meanwhile."""
    began = now()
    while True:
        problems = [p for p in check(c, identity) if p.key not in known]
        if waited_for is not None:
            waited_for += [str(p) for p in problems if str(p) not in waited_for]
        # A restart of an untouched guest will not undo itself: no use waiting.
        if not problems or now() - began > timeout or \
                all(p.kind in ("restarted", "doubled") for p in problems):
            return now() - began, problems
        time.sleep(1.0)


def wait_serving(c: ChaosCluster, switch_pid: int, timeout: float) -> float | None:
    """When the restarted Switch listens for every untouched service again
    and owns the nft table, mapping every node of the l4 service."""
    deadline = now() + timeout
    services = c.services() or {}
    l4 = {v["address"] for name, svc in services.items() if STEADY.get(name) == "l4" for v in svc["vnodes"]}
    while now() < deadline:
        ports = listening_ports()
        text = nft_table_text("ip", c.nft_table)
        if all(c.ports[s] in ports for s in STEADY) and f"soda-switch pid {switch_pid} " in text and \
                set(re.findall(r"(\d+\.\d+\.\d+\.\d+) \. \d+", text)) == l4:
            return now()
        time.sleep(0.02)
    return None


def daemon_socket_inode(c: ChaosCluster) -> tuple[int, int] | None:
    """The Daemon socket's identity: inode and change time (a new socket
    may get the inode number its predecessor freed)."""
    try:
        st = os.stat(c.cluster.daemon_socket)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


def wait_back(c: ChaosCluster, part: str, new_pid: int, old_socket: tuple[int, int] | None,
              timeout: float) -> float | None:
    """When the restarted part serves again, seen from outside: the Master
    answers sodactl; the Daemon listens on a socket of its own (not the one
    its predecessor left); the Agent has taken its desired set from the
    Master (its log); the Switch as `wait_serving` says. None: not within
    `timeout`."""
    if part == "switch":
        return wait_serving(c, new_pid, timeout)
    deadline = now() + timeout
    while now() < deadline:
        if part == "master" and c.services(timeout=0) is not None:
            return now()
        if part == "daemon" and daemon_socket_inode(c) not in (None, old_socket):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(c.cluster.daemon_socket)
                    return now()
                except OSError:
                    pass
        if part == "agent":
            with open(c.cluster.log_path("agent"), errors="replace") as f:
                if "desired set from the Master" in f.read().rsplit("starting agent\n", 1)[-1]:
                    return now()
        time.sleep(0.05)
    return None


def parts_order(rounds: int, rng: random.Random, each_once: bool) -> list[str]:
    order: list[str] = []
    if each_once:
        order = list(PARTS)
        rng.shuffle(order)
    while len(order) < rounds:
        order.append(rng.choice(PARTS))
    return order[:rounds]


def run_chaos(c: ChaosCluster, settings: Settings, *, each_part_once: bool = False,
              log: Callable[[str], None] = print) -> ChaosResult:
    """The chaos rounds (and the soak, if asked) on a cluster that is up."""
    rng = random.Random(settings.seed)
    result = ChaosResult()
    began = now()
    c.create_steady()
    watcher = GuestWatcher(c)
    watcher.start()
    clients = [ClientLoop(name, c.ports[name], gap=settings.gap, timeout=settings.request_timeout,
                          max_requests=int(settings.max_seconds / settings.gap[0]),
                          deadline=began + settings.max_seconds, seed=rng.randrange(1 << 30))
               for name in STEADY]
    for client in clients:
        client.start()
    try:
        _, problems = settle(c, {}, settings.settle_timeout)
        if problems:
            raise RuntimeError("the cluster did not settle before the first kill: " +
                               "; ".join(map(str, problems)))
        identity = steady_identity(c)
        log(f"steady guests: {', '.join(f'{v}={p}' for v, (p, _) in sorted(identity.items()))}")
        known: set[tuple[str, str]] = set()
        for i, part in enumerate(parts_order(settings.rounds, rng, each_part_once), 1):
            round_result = one_round(c, i, part, rng, settings, identity, known, log)
            known.update(p.key for p in round_result.problems)
            result.rounds.append(round_result)
            c._record_parts()
    finally:
        for client in clients:
            client.stop.set()
        for client in clients:
            client.join(timeout=settings.request_timeout + 5)
        watcher.stop.set()
        watcher.join(timeout=10)
        result.requests = sorted((q for client in clients for q in client.requests), key=lambda q: q.start)
        result.doubled = watcher.doubled
    if settings.soak_cycles:
        result.soak = soak(c, settings.soak_cycles, settings.soak_sample_at, settings.soak_nodes, log)
        _, problems = settle(c, identity, settings.settle_timeout, known)
        result.soak["problems"] = [str(p) for p in problems]
        for p in problems:
            log(f"after the soak: {p}")
    result.seconds = now() - began
    return result


def one_round(c: ChaosCluster, index: int, part: str, rng: random.Random, settings: Settings,
              identity: dict[str, tuple[int, int]], known: set[tuple[str, str]],
              log: Callable[[str], None]) -> RoundResult:
    for name in PARTS:
        state = c.cluster.part(name).state
        if state != "running":
            raise ClusterError(f"round {index}: {name} is {state} before the kill")
    churn = Churn(c, f"{CHURN}{index}", rng, settings.step_timeout)
    churn.start()
    delay = rng.uniform(0.05, settings.kill_within)
    churn.join(timeout=delay)
    old_socket = daemon_socket_inode(c)
    old = c.cluster.kill(part)
    kill = Kill(round=index, part=part, at=now(), churn_step=churn.step)
    new = c.cluster.wait_restarted(part, old, timeout=settings.restart_timeout)
    kill.restarted_after = now() - kill.at
    c.part_pids_seen.add((new.pid, new.starttime))
    # The next round must not kill into a restart that is still going on.
    kill.serving_at = wait_back(c, part, new.pid, old_socket, settings.settle_timeout)
    churn.join(timeout=3 * settings.step_timeout)
    if churn.is_alive():
        churn.failures.append("the churn did not finish")
    waited_for: list[str] = []
    settled, problems = settle(c, identity, settings.settle_timeout, known, waited_for)
    problems += [Problem("state", f"churn {f}") for f in churn.failures]
    if kill.serving_at is None:
        problems.append(Problem("state", f"{part} restarted but not serving within {settings.settle_timeout:g} s"))
    log(f"round {index:3d}: killed {part:<6} {delay:4.2f} s into the churn (during {kill.churn_step}); "
        f"back after {kill.restarted_after:.2f} s"
        + (f", serving after {kill.serving_at - kill.at:.2f} s" if kill.serving_at else ", NOT serving again")
        + f"; settled in {settled:.1f} s; churn {churn.nodes}->{churn.resize_to[0]} nodes, "
        f"{churn.retries} retries" + (f" ({'; '.join(churn.retry_reasons)})" if churn.retry_reasons else "")
        + (f"; waited for: {'; '.join(waited_for)}" if settled > 10 and not problems else "")
        + ("" if not problems else "; PROBLEMS: " + "; ".join(map(str, problems))))
    return RoundResult(kill, settled, problems, churn.retries)


def soak(c: ChaosCluster, cycles: int, sample_at: int, nodes: int, log: Callable[[str], None]) -> dict:
    """`cycles` create/delete cycles of a `nodes`-node service; the Master's
    and the Agent's VmRSS and open descriptors after cycle `sample_at` and
    after the last."""
    samples: dict[int, dict] = {}
    began = now()
    for i in range(1, cycles + 1):
        name = f"soak-{i}"
        spec = c.spec_file(name, nodes, free_port(), drain=0.0)
        c.ctl_ok("service", "create", "-f", spec, "--wait", "--timeout", "120", timeout=180)
        c.ctl_ok("service", "delete", name, "--wait", "--timeout", "120", timeout=180)
        os.unlink(spec)
        if i in (sample_at, cycles) or i % 50 == 0:
            time.sleep(0.5)
            samples[i] = {part: {"rss_kib": rss_kib(c.cluster.process(part).pid),
                                 "fds": open_fds(c.cluster.process(part).pid)}
                          for part in ("master", "agent")}
            log(f"soak cycle {i:4d}: " + ", ".join(f"{part} RSS {s['rss_kib'] / 1024:.1f} MiB, {s['fds']} fds"
                                                    for part, s in samples[i].items())
                + f" ({(now() - began) / i:.2f} s a cycle)")
    first, last = samples[min(sample_at, cycles)], samples[cycles]
    out: dict = {"cycles": cycles, "sample_at": min(sample_at, cycles),
                 "seconds_per_cycle": round((now() - began) / cycles, 2)}
    for part in ("master", "agent"):
        a, b = first[part], last[part]
        out[part] = {"rss_kib": [a["rss_kib"], b["rss_kib"]],
                     "rss_drift_pct": round(100.0 * (b["rss_kib"] - a["rss_kib"]) / a["rss_kib"], 2),
                     "fds": [a["fds"], b["fds"]],
                     "fds_drift_pct": round(100.0 * (b["fds"] - a["fds"]) / a["fds"], 2)}
    out["series"] = {str(i): {p: [s[p]["rss_kib"], s[p]["fds"]] for p in s} for i, s in sorted(samples.items())}
    return out


def failure_report(result: ChaosResult, limit: int = 20) -> list[str]:
    """Failed requests outside the Switch windows, with the round they fell in."""
    lines = []
    for q in result.failed_untouched()[:limit]:
        r = result.round_of(q.start)
        where = f"round {r.kill.round} ({r.kill.part} killed {q.start - r.kill.at:+.2f} s before)" if r \
            else "before the first kill"
        lines.append(f"{q.service}: {q.error} after {q.end - q.start:.2f} s, {where}")
    return lines


def make_work_dir(prefix: str = "soda-chaos-") -> str:
    return tempfile.mkdtemp(prefix=prefix)
