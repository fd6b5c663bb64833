"""A local cluster of several physical nodes with real UML guests, for the
system tests and bench/cluster.py: soda-devcluster's fabric layout (each
node a namespace acting as a host), plus what they observe it with, read
from the kernel, HTTP and sodactl rather than from the code under test:
where each virtual node runs, routes per namespace, a client loop through
the Switch, the guest processes a node's Agent recorded."""

from __future__ import annotations

import collections
import http.client
import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
import uuid

from soda.devcluster import ClusterConfig, LocalCluster
from soda.devcluster.credentials import sodactl_env
from soda.procid import ProcessId
from tests.support import free_port, traversable
from tests.system.cluster import wait_until

IMAGE = "busybox-httpd"
ANSWER_PREFIX = "SODA virtual node "


def fabric_config(state_dir: str, nodes: int = 3, node_lost_seconds: float = 4.0) -> ClusterConfig:
    tag = uuid.uuid4().hex[:6]
    n = int(tag, 16)
    # Ranges of their own: another cluster on this machine (the demo, a
    # test that failed to clean up) must not share routes with this one.
    return ClusterConfig(
        state_dir=traversable(state_dir), master_addr=f"127.0.0.1:{free_port()}", node="mn-1",
        nodes=nodes,
        netns=f"sodamn{tag}", cgroup_parent=f"soda-mn-{tag}", cluster_cidr=f"10.{100 + n % 100}.0.0/16",
        fabric_cidr=f"10.232.{n % 250}.0/24", switch_metrics=f"127.0.0.1:{free_port()}",
        master_args=("--node-lost-seconds", str(node_lost_seconds)))


class MultiNode:
    """A running fabric cluster and the ways to look at it."""

    def __init__(self, config: ClusterConfig):
        self.config = config
        self.cluster = LocalCluster(config)
        self.layout = self.cluster.layout

    def __enter__(self) -> MultiNode:
        self.cluster.up()
        return self

    def __exit__(self, *exc) -> None:
        self.cluster.down()

    # ---- sodactl ------------------------------------------------------------
    def ctl(self, *args: str, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "soda.cli.sodactl", "--master", self.config.master_addr,
                                 *args], capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL, env=sodactl_env(self.config.state_dir))
        if check:
            assert result.returncode == 0, f"sodactl {' '.join(args)}: {result.stdout}{result.stderr}"
        return result

    def json(self, *args: str):
        return json.loads(self.ctl("-o", "json", *args).stdout)

    def push(self, rootfs: str) -> None:
        self.ctl("image", "push", rootfs, "--name", IMAGE)

    def spec_file(self, name: str, port: int, cpus: list[float], bandwidth: int = 10,
                  extra: str = "") -> str:
        """A service of one UML guest per entry of `cpus` (32 MiB each)
        behind the Switch on `port`, with quick health checks and a 1 s
        drain, so that losses and moves show within seconds; `extra`: more
        lines of YAML (e.g. its network)."""
        path = os.path.join(self.config.state_dir, f"{name}.yaml")
        with open(path, "w") as f:
            f.write(f"name: {name}\nimage: {IMAGE}\nhypervisor: uml\nnodes: {len(cpus)}\n"
                    f"resources: {{cpu: [{', '.join(map(str, cpus))}], memory: 32, bandwidth: {bandwidth}}}\n"
                    f"{extra}switch: {{listen: '127.0.0.1:{port}', drain_seconds: 1,\n"
                    f"         health: {{interval: 0.5, timeout: 0.5, rise: 1, fall: 2}}}}\n")
        return path

    def create(self, name: str, cpus: list[float], bandwidth: int = 10, extra: str = "") -> int:
        """Create it, wait until every virtual node is healthy through the
        Switch; returns the Switch port."""
        port = free_port()
        self.ctl("service", "create", "-f", self.spec_file(name, port, cpus, bandwidth, extra),
                 "--wait", "--timeout", "240")
        wait_healthy(self, name)
        return port

    def delete(self, name: str) -> None:
        self.ctl("service", "delete", name, "--wait", "--timeout", "120")

    def vnodes(self, service: str) -> list[dict]:
        return self.json("service", "get", service)["vnodes"]

    def nodes(self) -> dict[str, dict]:
        return {n["name"]: n for n in self.json("node", "list")}

    def placement(self, service: str) -> dict[str, str]:
        """virtual node -> physical node, of the live ones."""
        return {v["name"]: v["node"] for v in self.vnodes(service) if not v.get("deleting")}

    def all_running_on(self, service: str, count: int, nodes: set[str]) -> bool:
        live = [v for v in self.vnodes(service) if not v.get("deleting")]
        return (len(live) == count and all(v["phase"] == "RUNNING" and v["node"] in nodes for v in live))

    def healthy_through_switch(self, service: str) -> bool:
        """Every live virtual node listed ready and passing the Switch's checks."""
        live = [v for v in self.vnodes(service) if not v.get("deleting")]
        return bool(live) and all((v.get("switch") or {}).get("healthy") and v["switch"].get("routable")
                                  for v in live)

    # ---- the kernel -----------------------------------------------------------
    def routes(self, netns: str = "") -> dict[str, str]:
        """destination -> gateway, of the routes with a gateway, in `netns` (root: "")."""
        argv = ["ip", *(["-n", netns] if netns else []), "-j", "route", "show"]
        out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout or "[]")
        return {r["dst"]: r["gateway"] for r in out if "gateway" in r and r["dst"] != "default"}

    def guest_processes(self, index: int) -> dict[str, ProcessId]:
        """The UML guests node `index`'s Agent recorded, by virtual node."""
        root = os.path.join(self.cluster.agent_dir_of(f"agent-{index}"), "uml")
        found = {}
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
            try:
                with open(os.path.join(root, name, "guest.json")) as f:
                    record = json.load(f)
            except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
                continue
            pid = ProcessId.read(record["pid"])
            if pid is not None:
                found[name] = pid
        return found

    def subnet_of(self, node: str) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(self.nodes()[node]["subnet"])


def get(port: int, timeout: float = 5.0) -> str:
    """One HTTP request through the Switch; the answering virtual node."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/")
        body = conn.getresponse().read().decode().strip()
    finally:
        conn.close()
    if not body.startswith(ANSWER_PREFIX):
        raise ValueError(f"unexpected answer {body[:80]!r}")
    return body[len(ANSWER_PREFIX):].split()[0]


class ClientLoop:
    """Idempotent requests through the Switch, one every `interval`, from a
    thread: which virtual node answered each, and which failed and when."""

    def __init__(self, port: int, interval: float = 0.05, timeout: float = 5.0):
        self.port, self.interval, self.timeout = port, interval, timeout
        self.answers: collections.Counter[str] = collections.Counter()
        self.failures: list[tuple[float, str]] = []
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.timeout + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sent += 1
            try:
                self.answers[get(self.port, self.timeout)] += 1
            except (OSError, ValueError, http.client.HTTPException) as exc:
                self.failures.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
            self._stop.wait(self.interval)


def wait_healthy(mn: MultiNode, service: str, timeout: float = 60) -> None:
    wait_until(lambda: mn.healthy_through_switch(service), timeout, 0.2,
               what=f"every virtual node of {service} healthy through the Switch")
