"""soda-switch as a real process with a Master and a fake-driver Agent:
bad Switch input is refused at create time with one `error:` line and
nothing created (unknown policy, a health path that is not a path, a listen
host the Switch may not bind, an address another process or service holds),
and the per-virtual-node counters are visible at /metrics and through
`sodactl service get` after traffic. The "virtual nodes" are plain servers
on 127.78.x.y the test runs itself (as in test_switch_process.py)."""

import os
import re
import socket
import urllib.request
from collections import Counter

import pytest
import yaml

from tests.support import free_port, make_ext4_image
from tests.system.cluster import wait_until
from tests.system.test_switch_process import LOOPBACK_CLUSTER, NameServer, request

pytestmark = pytest.mark.cluster


def metrics_text(addr: str) -> str:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        return r.read().decode()


def series(text: str, name: str) -> dict[str, float]:
    """vnode -> value of metric `name` for service web."""
    return {m.group(1): float(m.group(2))
            for m in re.finditer(rf'^{name}\{{service="web",vnode="([^"]+)"\}} (\S+)$', text, re.M)}


def test_bad_switch_input_is_refused_and_counters_are_visible(cluster, tmp_path):
    c = cluster
    c.start_master("--cluster-cidr", LOOPBACK_CLUSTER)
    c.start_agent("node-a", "--address", "127.0.0.1")
    wait_until(lambda: c.ready_nodes() == ["node-a"], 30, what="the Agent to register")
    c.ctl("image", "push", make_ext4_image(str(tmp_path / "img")), "--name", "img")
    metrics_addr = f"127.0.0.1:{free_port()}"
    config = tmp_path / "switch.yaml"
    config.write_text(yaml.safe_dump({"listen_hosts": ["127.0.0.1"], "report_seconds": 0.5,
                                      "name": f"sw-{os.getpid()}"}))
    switch = c.start_switch("--config", str(config), "--metrics-listen", metrics_addr,
                            name=f"sw-{os.getpid()}")

    guest_port, listen_port = free_port(), free_port()
    c.ctl("service", "create", "web", "--image", "img", "--nodes", "2", "--cpu", "0.5,1.0",
          "--port", str(guest_port), "--switch", f"127.0.0.1:{listen_port}", "--wait", timeout=60)
    vnodes = c.json("service", "get", "web")["vnodes"]
    servers = [NameServer((v["address"], guest_port), v["name"]) for v in vnodes]
    held = socket.socket()
    try:
        wait_until(lambda: request(listen_port) or switch.poll() is not None, 30, what="the Switch to route")
        assert switch.poll() is None, c.log("switch")
        # The Switch reports to the Master: its figures show in service get.
        wait_until(lambda: all(v["switch"] for v in c.json("service", "get", "web")["vnodes"]), 30,
                   what="the Switch's first report")

        # ---- bad input: one error line, exit 1, nothing created ----
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy_port = held.getsockname()[1]

        def refused(switch_section, expected):
            spec = tmp_path / "bad.yaml"
            spec.write_text(yaml.safe_dump({"name": "bad", "image": "img", "port": guest_port,
                                            "switch": switch_section}))
            result = c.ctl("service", "create", "-f", str(spec), check=False)
            assert result.returncode == 1, (result.stdout, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
            assert result.stdout == ""
            assert [s["name"] for s in c.json("service", "list")] == ["web"]

        refused({"listen": f"127.0.0.1:{free_port()}", "policy": "random"}, "unknown switch policy")
        refused({"listen": f"127.0.0.1:{free_port()}", "health": {"kind": "http", "path": "healthz"}},
                "is not an HTTP path")
        not_allowed = free_port()
        refused({"listen": f"127.0.0.2:{not_allowed}"}, "not one the Switch may listen on")
        refused({"listen": f"127.0.0.1:{listen_port}"}, "already used by service 'web'")
        # Another process (this test) holds busy_port: refused once the Switch
        # has reported it (every 0.5 s here).
        spec = tmp_path / "busy.yaml"
        spec.write_text(yaml.safe_dump({"name": "bad", "image": "img", "switch": {"listen": f"127.0.0.1:{busy_port}"}}))
        wait_until(lambda: "another process listens" in c.ctl("service", "create", "-f", str(spec),
                                                               check=False).stderr, 10,
                   what="the busy address to be refused")
        assert [s["name"] for s in c.json("service", "list")] == ["web"]
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", not_allowed), timeout=2).close()

        # ---- counters after traffic ----
        got = Counter(request(listen_port) for _ in range(60))
        by_cpu = {v["resources"]["cpu"]: v["name"] for v in vnodes}
        assert got == {by_cpu[0.5]: 20, by_cpu[1.0]: 40}, c.log("switch")
        text = metrics_text(metrics_addr)
        totals = series(text, "soda_switch_connections_total")
        assert totals[by_cpu[0.5]] >= 20 and totals[by_cpu[1.0]] >= 40, text
        assert series(text, "soda_switch_endpoint_healthy") == {by_cpu[0.5]: 1.0, by_cpu[1.0]: 1.0}
        assert all(v == 0 for v in series(text, "soda_switch_connections_open").values())
        # Each answer is the node's name; each request 18 bytes ("GET / HTTP/1.0\r\n\r\n").
        out = series(text, "soda_switch_bytes_out_total")
        assert out[by_cpu[1.0]] >= 40 * len(by_cpu[1.0])
        assert series(text, "soda_switch_bytes_in_total")[by_cpu[1.0]] >= 40 * 18
        assert 0 < series(text, "soda_switch_ttfb_p50_seconds")[by_cpu[1.0]] < 5

        def shown():
            return {v["name"]: v["switch"] for v in c.json("service", "get", "web")["vnodes"]}
        wait_until(lambda: shown()[by_cpu[1.0]]["total"] >= 40, 10, what="the Master to show the counters")
        stats = shown()
        assert stats[by_cpu[0.5]]["total"] >= 20 and stats[by_cpu[1.0]]["bytes_in"] >= 40 * 18
        assert stats[by_cpu[1.0]]["healthy"] and stats[by_cpu[1.0]]["ttfb_p50"] > 0
        table = c.ctl("service", "get", "web").stdout
        assert "Through the Switch" in table and "TTFB-P50" in table
        c.ctl("service", "delete", "web", "--wait", timeout=60)
    finally:
        held.close()
        for server in servers:
            server.shutdown()
            server.server_close()
