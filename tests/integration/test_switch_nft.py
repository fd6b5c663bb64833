"""The Switch's kernel path against the real kernel, all inside namespaces
this test makes: a "Switch host" namespace (where the KernelPath programs
its table, and where loopback clients run), a backend namespace holding the
virtual nodes (small servers that answer each line with their name), and a
client namespace for clients that come from elsewhere (prerouting). Who
answered is counted by the clients; the table, its counters, route_localnet
and the namespaces are read back with nft/sysctl/ip, independently of the
code. The last test runs the real soda-switch process (Master, fake-driver
Agent) on this host with a table of its own, the virtual nodes in a
namespace behind a veth, and checks weights, health and shutdown."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from soda.model.spec import SwitchSpec
from soda.model.switching import Endpoint, EndpointSet
from tests.integration.conftest import delete_netns, run, unique

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("the kernel path needs root (netns, nftables)", allow_module_level=True)

from soda.switch.nft import KernelPath  # noqa: E402

SWITCH_SIDE, BACKEND_SIDE = "10.211.7.1", "10.211.7.0/24"
NODES = {"web-0": "10.211.7.2", "web-1": "10.211.7.3"}
SWITCH_FRONT, CLIENT_ADDR = "10.211.8.1", "10.211.8.2"
BACKEND_PORT = 8000

# Answers every line it reads with its name: one connection can carry many requests.
BACKEND = r"""
import socketserver, sys
class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(sys.argv[3].encode() + b"\n")
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
Server((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
"""

# N fresh connections to HOST:PORT, one request each; prints who answered (JSON).
CLIENT = r"""
import json, socket, sys
from collections import Counter
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
got = Counter()
for _ in range(count):
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(b"hello\n")
            got[s.makefile().readline().strip() or "empty"] += 1
    except OSError as e:
        got["error:" + type(e).__name__] += 1
print(json.dumps(got))
"""


def ns(netns, *argv):
    """argv run in `netns` (None: on this host)."""
    return (["ip", "netns", "exec", netns] if netns else []) + list(argv)


def ask(netns: str, host: str, port: int, count: int) -> Counter:
    out = run(ns(netns, sys.executable, "-c", CLIENT, host, str(port), str(count)), timeout=120).stdout
    return Counter(json.loads(out))


def table_names(netns: str) -> list[str]:
    out = json.loads(run(ns(netns, "nft", "-j", "list", "tables")).stdout)["nftables"]
    return [item["table"]["name"] for item in out if "table" in item]


def map_elements(netns: str, table: str) -> list[tuple[str, int]]:
    """The DNAT map of the table's only service rule, as the kernel lists it."""
    listing = run(ns(netns, "nft", "list", "chain", "ip", table, "services")).stdout
    return [(address, int(port)) for address, port in re.findall(r"\d+ : ([\d.]+) \. (\d+)", listing)]


def dnat_count(netns: str, table: str, service: str) -> int:
    """Connections the service's DNAT rule took, by the kernel's own counter."""
    out = json.loads(run(ns(netns, "nft", "-j", "list", "chain", "ip", table, "services")).stdout)["nftables"]
    for rule in (item["rule"] for item in out if "rule" in item):
        if rule.get("comment") == service:
            return next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    raise AssertionError(f"no rule for {service} in {table}")


def sysctl(netns: str, key: str) -> str:
    return run(ns(netns, "sysctl", "-n", key)).stdout.strip()


@pytest.fixture
def lab(netns):
    """The Switch host (`netns`), a backend namespace with the two virtual
    nodes' servers, a client namespace; all removed afterwards."""
    backends, clients = unique("sodat-"), unique("sodat-")
    tag = netns.rsplit("-", 1)[1]
    procs: list[subprocess.Popen] = []
    try:
        for name in (backends, clients):
            run(["ip", "netns", "add", name])
        for name in (netns, backends, clients):
            run(["ip", "-n", name, "link", "set", "lo", "up"])
        to_b, to_c = f"snb{tag}", f"snc{tag}"
        run(["ip", "-n", netns, "link", "add", to_b, "type", "veth", "peer", "name", "eth0", "netns", backends])
        run(["ip", "-n", netns, "link", "add", to_c, "type", "veth", "peer", "name", "eth0", "netns", clients])
        run(["ip", "-n", netns, "addr", "add", f"{SWITCH_SIDE}/24", "dev", to_b])
        run(["ip", "-n", netns, "addr", "add", f"{SWITCH_FRONT}/24", "dev", to_c])
        for name in (netns, backends, clients):
            for dev in ([to_b, to_c] if name == netns else ["eth0"]):
                run(["ip", "-n", name, "link", "set", dev, "up"])
        for address in NODES.values():
            run(["ip", "-n", backends, "addr", "add", f"{address}/24", "dev", "eth0"])
        run(["ip", "-n", backends, "route", "add", "default", "via", SWITCH_SIDE])
        run(["ip", "-n", clients, "addr", "add", f"{CLIENT_ADDR}/24", "dev", "eth0"])
        run(["ip", "-n", clients, "route", "add", "default", "via", SWITCH_FRONT])
        # The operator's part for clients from elsewhere: the Switch host forwards.
        run(ns(netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"))
        for vnode, address in NODES.items():
            procs.append(subprocess.Popen(ns(backends, sys.executable, "-c", BACKEND, address, str(BACKEND_PORT),
                                             vnode), stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + 15
        while run(ns(backends, "ss", "-Htln", f"sport = :{BACKEND_PORT}")).stdout.count("LISTEN") < len(NODES):
            assert time.monotonic() < deadline, "the backends did not listen"
            time.sleep(0.05)
        yield {"switch": netns, "backends": backends, "clients": clients, "to_backends": to_b,
               "table": f"sodat_{tag}"}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
        for name in (backends, clients):
            delete_netns(name)


def endpoints(weights: dict[str, float]) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(vnode, NODES[vnode], BACKEND_PORT, weight, True) for vnode, weight in weights.items())


def service(name: str, listen: str, weights: dict[str, float]) -> EndpointSet:
    return EndpointSet(name, SwitchSpec(listen=listen, mode="l4"), endpoints(weights))


def test_kernel_path_spreads_by_weight_follows_updates_and_leaves_nothing(lab):
    s = lab["switch"]
    localnet_key = f"net.ipv4.conf.{lab['to_backends']}.route_localnet"
    assert sysctl(s, localnet_key) == "0"

    async def scenario():
        path = KernelPath(table=lab["table"], netns=s)
        await path.start()
        try:
            # Loopback clients on the Switch host: output hook, route_localnet, masquerade.
            await path.apply(service("web", "127.0.0.1:8080", {"web-0": 0.5, "web-1": 1.0}))
            assert sysctl(s, localnet_key) == "1"
            assert sorted(Counter(map_elements(s, lab["table"])).values()) == [1, 2]
            got = ask(s, "127.0.0.1", 8080, 300)
            assert got == {"web-0": 100, "web-1": 200}, got
            assert dnat_count(s, lab["table"], "web") == 300
            assert await path.connection_counts() == {"web": 300}

            # Clients from another namespace: prerouting, forwarding.
            await path.apply(service("api", f"{SWITCH_FRONT}:9090", {"web-0": 1.0, "web-1": 1.0}))
            got = ask(lab["clients"], SWITCH_FRONT, 9090, 100)
            assert got == {"web-0": 50, "web-1": 50}, got
            assert await path.connection_counts() == {"web": 300, "api": 100}   # kept across the rewrite

            # Live update while a connection is open: new connections follow
            # the new map, the open one stays with its node (draining).
            await path.remove("api")
            await path.apply(service("web", "127.0.0.1:8080", {"web-0": 1.0, "web-1": 1.0}))
            held = subprocess.Popen(ns(s, sys.executable, "-c", HELD, "127.0.0.1", "8080"),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                first = held.stdout.readline().strip()
                assert first in NODES
                assert ask(s, "127.0.0.1", 8080, 100) == {"web-0": 50, "web-1": 50}
                await path.apply(service("web", "127.0.0.1:8080", {"web-1": 1.0}))
                assert ask(s, "127.0.0.1", 8080, 40) == {"web-1": 40}
                held.stdin.write("again\n")
                held.stdin.flush()
                assert held.stdout.readline().strip() == first
            finally:
                held.kill()
                held.wait(timeout=10)
            # No ready node: no rule, the connection reaches the (absent) listener.
            await path.apply(EndpointSet("web", SwitchSpec(listen="127.0.0.1:8080", mode="l4"),
                                         (Endpoint("web-1", NODES["web-1"], BACKEND_PORT, 1.0, False),)))
            assert ask(s, "127.0.0.1", 8080, 3) == {"error:ConnectionRefusedError": 3}
            assert lab["table"] in table_names(s)
        finally:
            await path.close()
        assert lab["table"] not in table_names(s)
        assert sysctl(s, localnet_key) == "0"

    asyncio.run(scenario())


# Keeps one connection open: a request per line of stdin, each answer printed.
HELD = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = s.makefile("rw")
f.write("first\n"); f.flush(); print(f.readline().strip(), flush=True)
for line in sys.stdin:
    f.write(line); f.flush(); print(f.readline().strip(), flush=True)
"""


def test_close_lets_open_connections_finish_then_removes_the_table(lab):
    s, table = lab["switch"], lab["table"]

    async def scenario():
        path = KernelPath(table=table, netns=s)
        await path.apply(service("web", "127.0.0.1:8080", {"web-0": 1.0}))
        held = subprocess.Popen(ns(s, sys.executable, "-c", HELD, "127.0.0.1", "8080"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert held.stdout.readline().strip() == "web-0"
            closing = asyncio.create_task(path.close(drain_seconds=2.0))
            await asyncio.sleep(0.3)
            assert not closing.done()
            # New connections are no longer forwarded; the open one still is.
            assert ask(s, "127.0.0.1", 8080, 2) == {"error:ConnectionRefusedError": 2}
            held.stdin.write("still there?\n")
            held.stdin.flush()
            assert held.stdout.readline().strip() == "web-0"
            assert table in table_names(s)
            await closing
        finally:
            held.kill()
            held.wait(timeout=10)
        assert table not in table_names(s)

    asyncio.run(scenario())


def test_a_table_left_by_a_dead_switch_is_taken_over_and_replaced_whatever_its_layout(lab):
    s, table = lab["switch"], lab["table"]
    # What a Switch that was SIGKILLed leaves: its table, sending everything to web-0.
    leftover = (f'table ip {table} {{\n comment "soda-switch pid 999999999 start 1"\n'
                f' chain output {{ type nat hook output priority -100; policy accept;\n'
                f'  ip daddr 127.0.0.1 tcp dport 8080 dnat ip to {NODES["web-0"]}:{BACKEND_PORT}\n }}\n}}\n')
    subprocess.run(ns(s, "nft", "-f", "-"), input=leftover, text=True, check=True, capture_output=True)
    assert table in table_names(s)

    async def scenario():
        path = KernelPath(table=table, netns=s)
        await path.start()
        assert table in table_names(s)               # forwards until the endpoints are known
        try:
            await path.apply(service("web", "127.0.0.1:8080", {"web-1": 1.0}))
            await path.take_over()                   # one transaction, another chain layout
            assert ask(s, "127.0.0.1", 8080, 10) == {"web-1": 10}
        finally:
            await path.close()
        assert table not in table_names(s)

    asyncio.run(scenario())


# A Switch's kernel path in a process of its own, for the test to SIGKILL:
# its table names it as its owner, as a real Switch's does.
SWITCH = r"""
import asyncio, sys
from soda.model.spec import SwitchSpec
from soda.model.switching import Endpoint, EndpointSet
from soda.switch.nft import KernelPath
table, netns, listen, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
nodes = [arg.split("=") for arg in sys.argv[5:]]
async def main():
    path = KernelPath(table=table, netns=netns)
    await path.start()
    await path.apply(EndpointSet("web", SwitchSpec(listen=listen, mode="l4"),
                                 tuple(Endpoint(name, address, port, 1.0, True) for name, address in nodes)))
    print("ready", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""

# New connections to HOST:PORT, one request each, for SECONDS; who answered (JSON).
STREAM = r"""
import json, socket, sys, time
from collections import Counter
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
got, end = Counter(), time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(b"hello\n")
            got[s.makefile().readline().strip() or "empty"] += 1
    except OSError as e:
        got["error:" + type(e).__name__] += 1
    time.sleep(0.005)
print(json.dumps(got))
"""


def test_a_restarted_switch_takes_its_table_over_and_connections_keep_flowing(lab):
    """kill -9 of the Switch, then a new one: the table it left keeps
    forwarding (no rule missing at any moment) until the new Switch knows
    the endpoints and replaces it in one transaction; a connection open
    across it all keeps its virtual node, new ones follow the new map. The
    route_localnet the killed one set is restored when the new one stops:
    the table recorded its original value."""
    s, table = lab["switch"], lab["table"]
    localnet_key = f"net.ipv4.conf.{lab['to_backends']}.route_localnet"
    assert sysctl(s, localnet_key) == "0"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs: list[subprocess.Popen] = []

    def spawn(argv, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kw)
        procs.append(proc)
        return proc

    async def scenario():
        dead = spawn([sys.executable, "-c", SWITCH, table, s, "127.0.0.1:8080", str(BACKEND_PORT),
                      *(f"{name}={address}" for name, address in NODES.items())], cwd=repo)
        assert dead.stdout.readline().strip() == "ready"
        assert sysctl(s, localnet_key) == "1"
        assert f" localnet {lab['to_backends']}=0\"" in run(ns(s, "nft", "list", "table", "ip", table)).stdout
        before = sorted(map_elements(s, table))
        held = spawn(ns(s, sys.executable, "-c", HELD, "127.0.0.1", "8080"))
        first = held.stdout.readline().strip()
        assert first in NODES
        stream = spawn(ns(s, sys.executable, "-c", STREAM, "127.0.0.1", "8080", "4"))
        await asyncio.sleep(0.5)
        dead.kill()                                  # SIGKILL: no close(), the table stays
        dead.wait(timeout=10)
        await asyncio.sleep(0.3)

        path = KernelPath(table=table, netns=s)
        await path.start()
        try:
            assert sorted(map_elements(s, table)) == before     # taken over, not deleted
            await path.apply(service("web", "127.0.0.1:8080", {"web-1": 1.0}))
            await asyncio.sleep(0.5)                 # the Master's snapshot settling
            assert sorted(map_elements(s, table)) == before
            await path.take_over()
            assert map_elements(s, table) == [(NODES["web-1"], BACKEND_PORT)]
            assert f"soda-switch pid {os.getpid()} " in run(ns(s, "nft", "list", "table", "ip", table)).stdout
            got = Counter(json.loads(stream.communicate(timeout=30)[0]))
            assert got and all(not answer.startswith("error") for answer in got), got
            assert ask(s, "127.0.0.1", 8080, 20) == {"web-1": 20}
            held.stdin.write("still there?\n")
            held.stdin.flush()
            assert held.stdout.readline().strip() == first
            assert sysctl(s, localnet_key) == "1"
            assert f" localnet {lab['to_backends']}=0\"" in run(ns(s, "nft", "list", "table", "ip", table)).stdout
        finally:
            await path.close()
        assert table not in table_names(s)
        assert sysctl(s, localnet_key) == "0"

    try:
        asyncio.run(scenario())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        run(ns(s, "nft", "delete", "table", "ip", table), check=False)


# ---- the real soda-switch process ---------------------------------------------------

PROCESS_CIDR = "10.213.0.0/16"      # the Master hands the fake node a /24 of it
PROCESS_HOST_SIDE = "10.213.255.1"


@pytest.fixture
def backend_netns():
    """A namespace for the virtual nodes, joined to this host by a veth
    (as a node's bridge is); removed with its routes afterwards."""
    name = unique("sodat-")
    veth = f"snp{name.rsplit('-', 1)[1]}"
    try:
        run(["ip", "netns", "add", name])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name])
        run(["ip", "addr", "add", f"{PROCESS_HOST_SIDE}/32", "dev", veth])
        run(["ip", "link", "set", veth, "up"])
        run(["ip", "-n", name, "link", "set", "eth0", "up"])
        run(["ip", "-n", name, "route", "add", f"{PROCESS_HOST_SIDE}/32", "dev", "eth0"])
        run(["ip", "-n", name, "route", "add", "default", "via", PROCESS_HOST_SIDE])
        yield name, veth
    finally:
        run(["ip", "link", "del", veth], check=False)       # takes its /32 routes along
        delete_netns(name)


@pytest.mark.cluster
def test_switch_process_routes_l4_in_the_kernel_follows_health_and_cleans_up(backend_netns, tmp_path):
    from tests.system.cluster import Cluster, wait_until
    from tests.support import free_port

    netns, veth = backend_netns
    table = f"sodat_{netns.rsplit('-', 1)[1]}"
    listen_port = free_port()
    c = Cluster(str(tmp_path))
    servers: dict[str, subprocess.Popen] = {}
    try:
        c.start_master("--cluster-cidr", PROCESS_CIDR)
        c.start_agent("node-a", "--address", "127.0.0.1")
        wait_until(lambda: c.ready_nodes() == ["node-a"], 30, what="the Agent to register")
        image = str(tmp_path / "img")
        run(["mkfs.ext4", "-q", "-F", image, "8M"])
        c.ctl("image", "push", image, "--name", "img")
        spec = tmp_path / "web.yaml"
        spec.write_text(json.dumps({
            "name": "web", "image": "img", "hypervisor": "fake", "nodes": 2, "port": BACKEND_PORT,
            "resources": {"cpu": [0.5, 1.0], "memory": 64},
            "switch": {"listen": f"127.0.0.1:{listen_port}", "mode": "l4",
                       "health": {"kind": "tcp", "interval": 0.2, "timeout": 0.5, "rise": 1, "fall": 1}}}))
        c.ctl("service", "create", "-f", str(spec), "--wait", timeout=60)
        by_cpu = {v["resources"]["cpu"]: v for v in c.json("service", "get", "web")["vnodes"]}
        for v in by_cpu.values():
            run(["ip", "-n", netns, "addr", "add", f"{v['address']}/32", "dev", "eth0"])
            run(["ip", "route", "add", f"{v['address']}/32", "dev", veth])
            servers[v["name"]] = subprocess.Popen(ns(netns, sys.executable, "-c", BACKEND, v["address"],
                                                     str(BACKEND_PORT), v["name"]), stdin=subprocess.DEVNULL)
        wait_until(lambda: run(ns(netns, "ss", "-Htln")).stdout.count(f":{BACKEND_PORT}") == 2, 15,
                   what="the backends to listen")

        config = tmp_path / "switch.yaml"
        config.write_text(f"nft_table: {table}\ndrain_seconds: 0\n")
        switch_argv = [sys.executable, "-m", "soda.switch.main", "--master", c.master_addr, "--config", str(config),
                       *c.tls_flags("switch", "switch")]
        switch = c._spawn("switch", switch_argv)
        wait_until(lambda: "comment \"web\"" in run(["nft", "list", "table", "ip", table], check=False).stdout
                   or switch.poll() is not None, 30, what="the Switch's DNAT rule")
        assert switch.poll() is None, c.log("switch")

        small, big = by_cpu[0.5]["name"], by_cpu[1.0]["name"]
        got = ask(None, "127.0.0.1", listen_port, 300)
        assert got == {small: 100, big: 200}, (got, c.log("switch"))
        assert dnat_count(None, table, "web") == 300        # the kernel took them, not the proxy listener

        # The bigger node dies: its health check fails, the map loses it.
        servers[big].kill()
        servers[big].wait(timeout=10)
        wait_until(lambda: run(["nft", "list", "chain", "ip", table, "services"]).stdout.count(" . ") == 1, 15,
                   what="the kernel map to drop the dead node")
        assert ask(None, "127.0.0.1", listen_port, 30) == {small: 30}

        switch.send_signal(signal.SIGTERM)
        assert switch.wait(timeout=20) == 0, c.log("switch")
        assert table not in [t for t in run(["nft", "list", "tables"]).stdout.split()]
        assert run(["sysctl", "-n", f"net.ipv4.conf.{veth}.route_localnet"]).stdout.strip() == "0"

        # kill -9 of a running Switch, and a new one: the kernel forwards all
        # along, on the table the killed one left, until the new one takes it over.
        switch = c._spawn("switch", switch_argv)
        wait_until(lambda: run(["nft", "list", "chain", "ip", table, "services"], check=False).stdout.count(" . ")
                   == 1, 30, what="the Switch's DNAT rule to the live node")
        stream = subprocess.Popen([sys.executable, "-c", STREAM, "127.0.0.1", str(listen_port), "4"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(0.5)
            switch.kill()
            switch.wait(timeout=10)
            switch = c._spawn("switch", switch_argv)
            got = Counter(json.loads(stream.communicate(timeout=30)[0]))
        finally:
            if stream.poll() is None:
                stream.kill()
                stream.communicate(timeout=10)
        assert got and set(got) == {small}, (got, c.log("switch"))
        wait_until(lambda: f"soda-switch pid {switch.pid} " in run(["nft", "list", "table", "ip", table]).stdout,
                   15, what="the new Switch to take its table over")
        assert ask(None, "127.0.0.1", listen_port, 10) == {small: 10}
        switch.send_signal(signal.SIGTERM)
        assert switch.wait(timeout=20) == 0, c.log("switch")
        assert table not in [t for t in run(["nft", "list", "tables"]).stdout.split()]
        # The killed Switch set it; the one that took its table over restored it.
        assert run(["sysctl", "-n", f"net.ipv4.conf.{veth}.route_localnet"]).stdout.strip() == "0"
    finally:
        c.close()
        run(["nft", "delete", "table", "ip", table], check=False)
        for proc in servers.values():
            proc.kill()
            proc.wait(timeout=10)
