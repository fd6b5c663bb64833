#!/usr/bin/env python3
"""Service Switch throughput: one wrk load, four paths to the same backends,
and what the node's guest policy costs.

In one run, against the same nginx backends (in a network namespace this
benchmark makes, reached over a veth as a node's guests are):

    direct     wrk -> a backend's address
    userspace  wrk -> soda-switch's asyncio proxy (a service in mode proxy) -> backends
    kernel     wrk -> soda-switch's nftables DNAT (a service in mode l4) -> backends
    haproxy    wrk -> HAProxy, TCP mode, round robin over the same backends

and, in the same rounds, to one guest on each of two physical nodes made
as the Agent makes them (soda.agent.network.NodeNetwork: a namespace with
the guests' bridge, the uplink into the Switch's host, forwarding), alike
but for the policy:

    node-open     wrk -> a guest behind a node with `policy: false`
    node-guarded  wrk -> a guest behind a node with the policy on: the
                  anti-spoofing guard on its port and the service policy
                  (br_netfilter, conntrack, SODA's inet table), as for a
                  service with that one guest

(each guest a namespace on a veth in its node's bridge, nginx in it). A
difference of a few per cent is below what one wrk run here repeats to,
so the policy's cost is also measured on its own after the rounds:
`--policy-pairs` pairs of short runs (`--policy-duration`), open and
guarded back to back in ABBA order; the figure is the median of the
pairs' guarded / open ratios, with its 10th-90th percentile spread, and a
goal of at most 3 %.

The Switch is the real soda-switch process, fed by a real soda-master (and
a soda-agent with the fake driver, which "runs" the virtual nodes whose
addresses the backends then take), as deployed. They, HAProxy and this
script run in a "Switch host" namespace that routes between a client
namespace and the backend namespace. Two sets of runs: clients from
another namespace (as clients come in production: through the host's
forwarding, the kernel path DNATs in prerouting), and clients on the
Switch host itself (loopback, output hook). Every path gets the same wrk
command (keep-alive, `-t2 -c32` by default), in rounds that rotate the
order; the figures are medians over the rounds: requests/s, p50 and p99
latency, each path's ratio to direct, and CPU time per request. The kernel
path's nft counter is read back to show the connections were DNATed (not
served by the proxy listener behind it). Needs root, nginx, wrk, haproxy
and nft (scripts/setup).

    sudo .venv/bin/python bench/switch.py [--duration 5] [--rounds 3]
        [--threads 2] [--connections 32] [--nginx-workers 1]

Traffic stays inside the namespaces made here, which are deleted at the end
with everything in them (links, routes, sysctls, the nft table), also on
failure; this host's own network is not touched.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.control_plane import cpu_seconds  # noqa: E402
from bench.stats import percentile  # noqa: E402
from soda import model  # noqa: E402
from soda.agent.network import NodeNetwork  # noqa: E402
from soda.agent.policy import desired_policy  # noqa: E402
from soda.hypervisors.base import guest_mac  # noqa: E402
from tests.support import free_port  # noqa: E402
from tests.system.cluster import Cluster, wait_until  # noqa: E402

CLUSTER_CIDR = "10.212.0.0/16"      # inside the namespace made here only
SWITCH_TO_BACKENDS = "10.212.255.1"    # the Switch host's side of the backends' veth
SWITCH_TO_CLIENTS = "10.212.254.1"     # ... of the clients' veth: the services' front address
CLIENT = "10.212.254.2"
CLIENTS = ("remote", "local")
CLONE_NEWNET = 0x40000000
BACKEND_PORT = 80
PATHS = ("direct", "userspace", "kernel", "haproxy", "node-open", "node-guarded")
# The two nodes of the policy's paths: subnet, gateway, uplink (the Switch
# host's end), the guest.
NODES = {"node-open": ("10.213.1.0/24", "10.213.1.1", "10.213.1.254", "10.213.1.11"),
         "node-guarded": ("10.213.2.0/24", "10.213.2.1", "10.213.2.254", "10.213.2.11")}

AGENT_CONFIG = """\
log_level: WARNING
capacity: {cpu: 16, memory: 65536, bandwidth: 100000, disk: 1000000}
drivers: {fake: {boot_seconds: 0.05, stop_seconds: 0.01}}
"""

NGINX_CONFIG = """\
worker_processes {workers};
daemon off;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen {port} reuseport backlog=4096;
        location / {{ default_type text/plain; return 200 "hello from $server_addr\\n"; }}
    }}
}}
"""

HAPROXY_CONFIG = """\
global
    maxconn 8192
    log stdout format raw local0 err
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend bench
    bind 0.0.0.0:{port}
    default_backend nodes
backend nodes
    balance roundrobin
{servers}
"""


def sh(*argv: str, check: bool = True, timeout: float = 60) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
    return r.stdout


# ---- wrk ------------------------------------------------------------------------

def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(out: str) -> dict:
    """requests/s and p50/p99 latency (ms) from `wrk --latency` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    lat = {q: re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M) for q in ("50", "99")}
    if rps is None or None in lat.values():
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    return {"rps": float(rps.group(1)), "p50": _ms(*lat["50"].groups()), "p99": _ms(*lat["99"].groups()),
            "requests": int(total.group(1)) if total else 0, "errors": errors.group(0) if errors else ""}


def wrk(argv: list[str], url: str, args: argparse.Namespace) -> dict:
    """One wrk run (`argv` starts it); with the CPU time wrk itself used
    (user + system; `ip netns exec` execs it, so it is our child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = sh(*argv, f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency", url,
             timeout=args.duration + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = parse_wrk(out)
    result["wrk_cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


# ---- the bench's world ---------------------------------------------------------------

def enter_netns(name: str) -> None:
    """Move this (still single-threaded) process into namespace `name`: what
    it starts from now on (Master, Agent, Switch, HAProxy, sodactl) runs there."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise SystemExit(f"cannot enter namespace {name}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


class Bench:
    """Three namespaces made here: `switch` (the Switch's host: Master, Agent,
    Switch, HAProxy; this process moves into it), `backends` (nginx on every
    virtual node's address) and `clients` (wrk for clients that come from
    elsewhere). Deleting them at the end takes every link, route, sysctl
    and the nft table along; this host's own network is not touched."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        tag = secrets.token_hex(3)
        self.root = tempfile.mkdtemp(prefix="soda-bench-switch-")
        self.ns = {role: f"sodab-{os.getpid()}-{tag}-{role[0]}" for role in ("switch", "backends", "clients")}
        for path in NODES:          # each node's namespace (NodeNetwork makes it) and its guest's
            self.ns[path] = f"sodab-{os.getpid()}-{tag}-n{path[5]}"
            self.ns[f"guest-{path}"] = f"sodab-{os.getpid()}-{tag}-g{path[5]}"
        self.node_networks: list[NodeNetwork] = []
        self.nginxes: list[subprocess.Popen] = []
        self.table = f"soda_bench_{tag}"
        self.cluster = Cluster(self.root)
        self.procs: list[subprocess.Popen] = []
        self.addresses: dict[str, list[str]] = {}    # service -> its virtual nodes' addresses
        self.ports: dict[str, int] = {}

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.root, f"{name}.log"), "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        with open(os.path.join(self.root, f"{name}.log"), errors="replace") as f:
            return f.read()

    def inside(self, role: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[role], *argv]

    # -- set up --
    def network(self) -> None:
        s, b, c = self.ns["switch"], self.ns["backends"], self.ns["clients"]
        for name in (s, b, c):
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        for peer, here in ((b, SWITCH_TO_BACKENDS), (c, SWITCH_TO_CLIENTS)):
            dev = f"to{peer[-1]}"
            sh("ip", "-n", s, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", peer)
            sh("ip", "-n", s, "addr", "add", f"{here}/32" if peer == b else f"{here}/24", "dev", dev)
            sh("ip", "-n", s, "link", "set", dev, "up")
            sh("ip", "-n", peer, "link", "set", "eth0", "up")
        sh("ip", "-n", b, "route", "add", f"{SWITCH_TO_BACKENDS}/32", "dev", "eth0")
        sh("ip", "-n", b, "route", "add", "default", "via", SWITCH_TO_BACKENDS)
        sh("ip", "-n", c, "addr", "add", f"{CLIENT}/24", "dev", "eth0")
        sh("ip", "-n", c, "route", "add", "default", "via", SWITCH_TO_CLIENTS)
        # The Switch's host routes between its clients and the virtual nodes (a node's job, as in production).
        sh("ip", "netns", "exec", s, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        enter_netns(s)
        self.ports = {"userspace": free_port(), "kernel": free_port(), "haproxy": free_port()}

    def nodes(self) -> None:
        """The two nodes of the policy's paths, from this (the Switch's) host,
        each with one guest: a namespace on a veth port of the node's bridge,
        with the guest's MAC, address and default route, as a TAP's guest."""
        for path, (subnet, gateway, uplink, address) in NODES.items():
            guarded = path == "node-guarded"
            net = NodeNetwork(netns=self.ns[path], bridge="soda0", guarded=guarded)
            self.node_networks.append(net)
            net.configure_node(subnet, gateway, uplink)
            # Replies to the clients' namespace route back through the Switch's host.
            sh("ip", "netns", "exec", net.netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            sh("ip", "-n", net.netns, "route", "add", f"{CLIENT}/32", "via", uplink)
            guest, port, mac = self.ns[f"guest-{path}"], f"gv{path[5]}", guest_mac(address)
            sh("ip", "netns", "add", guest)
            # IPv4 only, as the guard lets through: no IPv6 neighbour
            # discovery for it to count.
            sh("ip", "netns", "exec", guest, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
            sh("ip", "netns", "exec", guest, "sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1")
            sh("ip", "-n", guest, "link", "set", "lo", "up")
            sh("ip", "-n", net.netns, "link", "add", port, "type", "veth", "peer", "name", "eth0",
               "netns", guest)
            sh("ip", "-n", net.netns, "link", "set", port, "master", net.bridge, "up")
            sh("ip", "-n", guest, "link", "set", "eth0", "address", mac, "up")
            sh("ip", "-n", guest, "addr", "add", f"{address}/24", "dev", "eth0")
            sh("ip", "-n", guest, "route", "add", "default", "via", gateway)
            if guarded:
                net.guard.guard(port, mac, address)
                endpoint = model.Endpoint("bench-guarded-1", address, BACKEND_PORT, 1.0, True)
                net.policy.sync(desired_policy([model.EndpointSet("bench-guarded", endpoints=(endpoint,))],
                                               subnet, (gateway, uplink)))

    def backends(self) -> None:
        """nginx in the backend namespace, on every address it has (all the
        virtual nodes'), and in each node's guest."""
        for role in ("backends", *(f"guest-{path}" for path in NODES)):
            root = os.path.join(self.root, role)
            os.makedirs(root, exist_ok=True)
            conf = os.path.join(root, "nginx.conf")
            with open(conf, "w") as f:
                f.write(NGINX_CONFIG.format(workers=self.args.nginx_workers, root=root, port=BACKEND_PORT))
            nginx = self.spawn(f"nginx-{role}", self.inside(role, "nginx", "-p", root, "-c", conf))
            self.nginxes.append(nginx)
            wait_until(lambda: f":{BACKEND_PORT}" in sh(*self.inside(role, "ss", "-Htln"))
                       or nginx.poll() is not None, 15, what=f"nginx to listen in {role}")
            if nginx.poll() is not None:
                raise SystemExit(f"nginx exited: {self.log(f'nginx-{role}')}")

    def platform(self) -> None:
        c = self.cluster
        c.start_master("--cluster-cidr", CLUSTER_CIDR)
        agent_conf = os.path.join(self.root, "agent.yaml")
        with open(agent_conf, "w") as f:
            f.write(AGENT_CONFIG)
        c.start_agent("bench-node", "--address", "127.0.0.1", "--config", agent_conf)
        wait_until(lambda: c.ready_nodes() == ["bench-node"], 30, what="the Agent to register")
        image = os.path.join(self.root, "img")
        sh("mkfs.ext4", "-q", "-F", image, "8M")     # a real one: the Agent checks what it pulls
        c.ctl("image", "push", image, "--name", "img")
        for path, mode in (("userspace", "proxy"), ("kernel", "l4")):
            spec = os.path.join(self.root, f"{path}.yaml")
            with open(spec, "w") as f:
                json.dump({"name": f"bench-{path}", "image": "img", "hypervisor": "fake", "nodes": 2,
                           "port": BACKEND_PORT, "resources": {"cpu": 1.0, "memory": 64},
                           "switch": {"listen": f"0.0.0.0:{self.ports[path]}", "mode": mode}}, f)
            c.ctl("service", "create", "-f", spec, "--wait", timeout=60)
            vnodes = c.json("service", "get", f"bench-{path}")["vnodes"]
            self.addresses[path] = [v["address"] for v in vnodes]
        for address in (a for addrs in self.addresses.values() for a in addrs):
            sh("ip", "-n", self.ns["backends"], "addr", "add", f"{address}/32", "dev", "eth0")
            sh("ip", "route", "add", f"{address}/32", "dev", "tob")

    def switch(self) -> None:
        conf = os.path.join(self.root, "switch.yaml")
        with open(conf, "w") as f:
            f.write(f"nft_table: {self.table}\nnft_masquerade_all: {str(self.args.masquerade_all).lower()}\n"
                    "drain_seconds: 0\nlog_level: WARNING\n")
        self.switch_proc = self.cluster.start_switch("--config", conf)
        for path in ("userspace", "kernel"):
            wait_until(lambda: self.get(f"http://127.0.0.1:{self.ports[path]}/").startswith("hello")
                       or self.switch_proc.poll() is not None, 30, what=f"the Switch to route {path}")
        if self.switch_proc.poll() is not None:
            raise SystemExit(f"soda-switch exited: {self.cluster.log('switch')}")
        wait_until(lambda: self.kernel_connections() is not None, 10, what="the Switch's nft table")

    def haproxy(self) -> None:
        servers = "\n".join(f"    server n{i} {a}:{BACKEND_PORT}" for i, a in enumerate(self.addresses["userspace"]))
        conf = os.path.join(self.root, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(HAPROXY_CONFIG.format(port=self.ports["haproxy"], servers=servers))
        self.haproxy_proc = self.spawn("haproxy", ["haproxy", "-db", "-f", conf])
        wait_until(lambda: self.get(f"http://127.0.0.1:{self.ports['haproxy']}/").startswith("hello")
                   or self.haproxy_proc.poll() is not None, 15, what="haproxy to serve")
        if self.haproxy_proc.poll() is not None:
            raise SystemExit(f"haproxy exited: {self.log('haproxy')}")

    @staticmethod
    def get(url: str) -> str:
        import urllib.request
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except OSError:
            return ""

    def kernel_connections(self) -> int | None:
        """Connections the Switch's DNAT rule took (its nft counter), or None."""
        r = subprocess.run(["nft", "-j", "list", "chain", "ip", self.table, "services"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return None
        for item in json.loads(r.stdout)["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    return expr["counter"]["packets"]
        return None

    # -- run --
    def urls(self, client: str) -> dict[str, str]:
        """Remote clients reach the Switch at its front address, local ones at 127.0.0.1."""
        host = SWITCH_TO_CLIENTS if client == "remote" else "127.0.0.1"
        return {"direct": f"http://{self.addresses['userspace'][0]}:{BACKEND_PORT}/",
                "userspace": f"http://{host}:{self.ports['userspace']}/",
                "kernel": f"http://{host}:{self.ports['kernel']}/",
                "haproxy": f"http://{host}:{self.ports['haproxy']}/",
                **{path: f"http://{NODES[path][3]}:{BACKEND_PORT}/" for path in NODES}}

    def wrk_argv(self, client: str) -> list[str]:
        return self.inside("clients", "wrk") if client == "remote" else ["wrk"]

    def measure(self, client: str) -> dict[str, list[dict]]:
        """Every path once per round, in an order that rotates. Each result
        also holds CPU time per request, figures that the load of the
        machine disturbs less than req/s: the relaying process's (the Switch
        for userspace, HAProxy for haproxy) and that of everything on the
        path (wrk + nginx + relay; the kernel's forwarding work is charged
        mostly to wrk and nginx, whose sends run the receiving side too)."""
        urls, results = self.urls(client), {p: [] for p in PATHS}
        relays = {"userspace": self.switch_proc.pid, "haproxy": self.haproxy_proc.pid}
        workers = [w for nginx in self.nginxes for w in children(nginx.pid)]
        for url in urls.values():          # warm up every path (connections, caches)
            sh(*self.wrk_argv(client), "-t1", "-c4", "-d1s", url, timeout=60)
        before = self.kernel_connections() or 0
        for r in range(self.args.rounds):
            order = PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]
            for path in order:
                pid = relays.get(path)
                cpu = cpu_seconds(pid) if pid else 0.0
                nginx = sum(cpu_seconds(w) for w in workers)
                result = wrk(self.wrk_argv(client), urls[path], self.args)
                relay = cpu_seconds(pid) - cpu if pid else 0.0
                total = relay + result["wrk_cpu"] + sum(cpu_seconds(w) for w in workers) - nginx
                requests = max(1, result["requests"])
                result["cpu_us"] = relay * 1e6 / requests if pid else None
                result["all_cpu_us"] = total * 1e6 / requests
                results[path].append(result)
                print(f"  {client} round {r + 1} {path:9s} {result['rps']:9.0f} req/s", file=sys.stderr)
        taken = (self.kernel_connections() or 0) - before
        if taken < self.args.connections * self.args.rounds:
            raise SystemExit(f"the kernel path's DNAT counted {taken} connections: wrk was not served by it")
        guarded = self.node_networks[1]
        if any(guarded.policy.drops().values()) or any(guarded.guard.drops().values()):
            raise SystemExit(f"the guarded node refused the bench's own packets: "
                             f"{guarded.policy.drops()} {guarded.guard.drops()}")
        if not policy_in_force(self.ns["node-guarded"]):
            raise SystemExit("the guarded node has no policy table: node-guarded measured an open node")
        return results

    def policy_pairs(self, client: str) -> list[float]:
        """node-guarded / node-open of each of `--policy-pairs` back-to-back
        pairs, the first of each pair alternating (ABBA: neither side is
        always the warmer or the later)."""
        runs = argparse.Namespace(**{**vars(self.args), "duration": self.args.policy_duration})
        urls, ratios = self.urls(client), []
        for i in range(self.args.policy_pairs):
            order = ("node-open", "node-guarded") if i % 2 == 0 else ("node-guarded", "node-open")
            rps = {path: wrk(self.wrk_argv(client), urls[path], runs)["rps"] for path in order}
            ratios.append(rps["node-guarded"] / rps["node-open"])
            print(f"  {client} policy pair {i + 1}: guarded / open {ratios[-1]:.3f}", file=sys.stderr)
        return ratios

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.cluster.close()        # SIGTERM: the Switch deletes its nft table
        for net in self.node_networks:
            try:
                net.teardown()
            finally:
                net.remove_netns()
        # The namespaces take their links, routes, sysctls and any table left along.
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def policy_in_force(netns: str) -> bool:
    """Whether the node's namespace holds SODA's policy and guard tables
    (read with nft, not from the code that wrote them)."""
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "tables"],
                         capture_output=True, text=True).stdout
    tables = {(t["table"]["family"], t["table"]["name"])
              for t in json.loads(out or '{"nftables": []}')["nftables"] if "table" in t}
    return {("inet", "soda"), ("bridge", "soda")} <= tables


def report(client: str, results: dict[str, list[dict]], args: argparse.Namespace,
           pairs: list[float]) -> dict:
    """Medians over the rounds. "vs direct" is the median of each round's
    ratio to that round's direct run (next to it in time, so a burst of load
    from elsewhere on the machine moves both)."""
    med = {p: {k: statistics.median(r[k] for r in results[p]) for k in ("rps", "p50", "p99")} for p in PATHS}
    ratio = {p: statistics.median(r["rps"] / d["rps"] for r, d in zip(results[p], results["direct"]))
             for p in PATHS}
    where = ("from another namespace (through the Switch host's forwarding)" if client == "remote"
             else "on the Switch host (loopback)")
    print(f"\nclients {where}: wrk -t{args.threads} -c{args.connections} -d{args.duration}s, keep-alive, "
          f"nginx backends ({args.nginx_workers} worker(s)); medians of {args.rounds} round(s); "
          f"nft_masquerade_all {str(args.masquerade_all).lower()}")
    print(f"{'path':10s} {'req/s':>10s} {'p50 ms':>8s} {'p99 ms':>8s} {'vs direct':>10s} "
          f"{'relay CPU/req':>14s} {'all CPU/req':>12s}")
    for p in PATHS:
        m = med[p]
        cpus = [r["cpu_us"] for r in results[p] if r["cpu_us"] is not None]
        cpu = f"{statistics.median(cpus):11.1f} us" if cpus else f"{'-':>14s}"
        total = statistics.median(r["all_cpu_us"] for r in results[p])
        print(f"{p:10s} {m['rps']:10.0f} {m['p50']:8.2f} {m['p99']:8.2f} {ratio[p]:10.2f} {cpu} {total:9.1f} us")
    errors = {p: [r["errors"] for r in results[p] if r["errors"]] for p in PATHS}
    for p, errs in errors.items():
        if errs:
            print(f"{p}: wrk reported {'; '.join(errs)}")
    in_rounds = statistics.median(g["rps"] / o["rps"] for g, o in zip(results["node-guarded"],
                                                                       results["node-open"]))
    policy = statistics.median(pairs) if pairs else in_rounds
    spread = (percentile(pairs, 10), percentile(pairs, 90)) if pairs else (in_rounds, in_rounds)
    print(f"policy: node-guarded / node-open {in_rounds:.3f} (median of the rounds' ratios)"
          + (f"; {policy:.3f} over {len(pairs)} ABBA pairs of {args.policy_duration} s "
             f"(10th-90th percentile {spread[0]:.3f}-{spread[1]:.3f})" if pairs else ""))
    goals = [("kernel >= 0.95 of direct", ratio["kernel"] >= 0.95),
             ("kernel ahead of haproxy", ratio["kernel"] > ratio["haproxy"]),
             ("userspace >= 0.6 of direct", ratio["userspace"] >= 0.6),
             ("policy costs <= 3 %", policy >= 0.97)]
    print("goals: " + ", ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in goals))
    figures = {p: {"rps": round(med[p]["rps"]), "p50_ms": round(med[p]["p50"], 3),
                   "p99_ms": round(med[p]["p99"], 3), "vs_direct": round(ratio[p], 3)} for p in PATHS}
    figures["policy_guarded_vs_open"] = round(policy, 3)
    figures["policy_pairs"] = {"n": len(pairs), "median": round(policy, 3), "p10": round(spread[0], 3),
                               "p90": round(spread[1], 3), "in_rounds": round(in_rounds, 3)}
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=5, help="seconds of each wrk run")
    p.add_argument("--rounds", type=int, default=3, help="runs of every path (medians are printed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--nginx-workers", type=int, default=1)
    p.add_argument("--no-masquerade-all", dest="masquerade_all", action="store_false",
                   help="the Switch's nft_masquerade_all: false (the backends route back through the Switch "
                        "host here, so remote clients need no masquerade)")
    p.add_argument("--policy-pairs", type=int, default=12,
                   help="back-to-back open/guarded pairs for the policy's cost (0: only the rounds)")
    p.add_argument("--policy-duration", type=int, default=2, help="seconds of each run of a pair")
    p.add_argument("--json", action="store_true",
                   help="print the figures as one JSON object on the last line")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/switch.py needs root (network namespace, nftables)")
    for tool in ("nginx", "wrk", "haproxy", "nft"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run scripts/setup")
    bench = Bench(args)
    try:
        bench.network()
        bench.nodes()
        bench.backends()
        bench.platform()
        bench.switch()
        bench.haproxy()
        results = {client: bench.measure(client) for client in CLIENTS}
        pairs = {client: bench.policy_pairs(client) for client in CLIENTS}
    finally:
        bench.close()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end")
    figures = {}
    for client in CLIENTS:
        figures[client] = report(client, results[client], args, pairs[client])
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
