"""The Switch in front of real User-Mode Linux guests: share-weighted split that follows a live cpu resize, a guest killed
under a continuous request loop with no failed request, and a scale-down
under load whose removed node finishes its in-flight requests.

Who answered is read from the guests' own pages; what the Switch did is
read from its /metrics (a Switch restarted by the test with a metrics
address); guest pids from the Agent's records; nothing from the code under
test decides a pass alone."""

import os
import re
import signal
import socket
import threading
import time
import urllib.request

import pytest
import yaml

from tests.support import free_port
from tests.system.cluster import wait_until
from tests.system.guests import require_guest_support
from tests.system.guests import alive, fetch, guest_records
from tests.system.guests import uml_node as _uml_node
from tests.system.test_switch_core_input import series as parse_series

pytestmark = [pytest.mark.root, pytest.mark.guest]

require_guest_support()

# Checks every 0.5 s, out after 2 failures: the "check window" is about
# 2 s. The timeout is generous: a guest busy burning CPU on a loaded
# 2-core machine must not pass for dead.
HEALTH = {"kind": "http", "path": "/", "expect_status": 200, "interval": 0.5, "timeout": 1.0,
          "rise": 2, "fall": 2}
CHECK_WINDOW = HEALTH["interval"] * HEALTH["fall"] + HEALTH["timeout"]


@pytest.fixture
def node(cluster, rootfs):
    """A UML node whose Switch serves /metrics and reports every 0.5 s."""
    with _uml_node(cluster, rootfs) as c:
        c.kill("switch")
        c.metrics = f"127.0.0.1:{free_port()}"
        config = os.path.join(c.root, "switch.yaml")
        with open(config, "w") as f:
            yaml.safe_dump({"report_seconds": 0.5, "name": f"sw-{os.getpid()}"}, f)
        c.start_switch("--config", config, "--metrics-listen", c.metrics, name=f"sw-{os.getpid()}")
        wait_until(lambda: _metrics(c) is not None, 30, what="the Switch's /metrics")
        yield c


def _metrics(c):
    try:
        with urllib.request.urlopen(f"http://{c.metrics}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def series(c, name):
    """vnode -> value of metric `name` for service web, as the Switch serves it now."""
    return parse_series(_metrics(c) or "", name)


def create(c, nodes, cpu, drain=30.0):
    port = free_port()
    spec = os.path.join(c.root, "web.yaml")
    with open(spec, "w") as f:
        yaml.safe_dump({"name": "web", "image": "busybox-httpd", "hypervisor": "uml", "nodes": nodes,
                        "resources": {"cpu": cpu, "memory": 64},
                        "switch": {"listen": f"127.0.0.1:{port}", "health": HEALTH, "drain_seconds": drain}}, f)
    c.ctl("service", "create", "-f", spec, "--wait", "--timeout", "120", timeout=180)
    records = guest_records(c)
    c.guest_pids.update(r["pid"] for r in records.values())
    url = f"http://127.0.0.1:{port}/"
    names = [f"web-{i}" for i in range(nodes)]
    seen = set()
    # A guest is RUNNING as its httpd starts: count only once all have answered.
    wait_until(lambda: seen.update({_who(_get(url))}) or seen >= set(names), 60,
               what="every guest to answer through the Switch")
    return url, records


def _get(url, timeout=5):
    try:
        return fetch(url, timeout)
    except OSError:
        return ""


def _who(page):
    m = re.search(r"virtual node (\S+)", page)
    return m.group(1) if m else ""


def split(url, n):
    counts = {}
    for _ in range(n):
        who = _who(fetch(url, timeout=10))
        counts[who] = counts.get(who, 0) + 1
    return counts


def test_split_follows_cpu_shares_and_a_live_resize(node):
    c = node
    url, records = create(c, 2, [0.5, 1.0])
    counts = split(url, 300)
    print(f"\ncpu 0.5:1.0 -> {counts}")
    # 1:2 within +-5 % of the 300 requests.
    assert abs(counts.get("web-0", 0) - 100) <= 15 and abs(counts.get("web-1", 0) - 200) <= 15, counts

    # A connection open across the resize: request line sent, headers not ended.
    host, port = url.split("/")[2].split(":")
    held = socket.create_connection((host, int(port)), timeout=10)
    held.sendall(b"GET / HTTP/1.0\r\n")
    time.sleep(0.3)
    c.ctl("service", "resize", "web", "--cpu", "1.0,0.5")
    weights = {v["name"]: v["weight"] for v in c.json("service", "get", "web")["vnodes"]}
    assert weights == {"web-0": 1.0, "web-1": 0.5}
    wait_until(lambda: "web-1=" in c.log("switch") and re.search(
        r"web-0=\S+ \(weight 1\), web-1=\S+ \(weight 0\.5\)", c.log("switch")), 20,
        what="the Switch to take the new weights")
    held.sendall(b"Host: x\r\n\r\n")
    answer = b""
    while data := held.recv(65536):
        answer += data
    held.close()
    assert b"200 OK" in answer and b"SODA virtual node web-" in answer, answer

    counts = split(url, 300)
    print(f"after resize to cpu 1.0:0.5 -> {counts}")
    assert abs(counts.get("web-0", 0) - 200) <= 15 and abs(counts.get("web-1", 0) - 100) <= 15, counts
    # Live: the same guests, no restart.
    assert {n: r["pid"] for n, r in guest_records(c).items()} == {n: r["pid"] for n, r in records.items()}


class Loop(threading.Thread):
    """Requests through the Switch back to back (`workers` at a time) until stopped;
    records (start, end, ok, answer or error) of each."""

    def __init__(self, url, workers=1, timeout=30):
        super().__init__(daemon=True)
        self.url, self.workers, self.timeout = url, workers, timeout
        self.results = []
        self.stopping = threading.Event()

    def _one(self):
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                body = fetch(self.url, self.timeout)
                self.results.append((started, time.monotonic(), True, body))
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                self.results.append((started, time.monotonic(), False, repr(exc)))

    def run(self):
        threads = [threading.Thread(target=self._one, daemon=True) for _ in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def stop(self):
        self.stopping.set()
        self.join(120)
        assert not self.is_alive()
        return self.results


def test_killed_guest_costs_no_request_and_gets_no_traffic_after_the_check_window(node):
    c = node
    url, records = create(c, 2, [1.0, 1.0])
    loop = Loop(url, workers=2)
    loop.start()
    time.sleep(2)
    sampler = Sampler(c, "web-1", interval=0.1)
    sampler.start()
    killed = time.monotonic()
    os.kill(records["web-1"]["pid"], signal.SIGKILL)
    time.sleep(10)
    results = loop.stop()
    samples = [(t - killed, *rest) for t, *rest in sampler.stop()]
    failed = [r for r in results if not r[2]]
    assert not failed, (failed[:5], c.log("switch")[-3000:])
    after = [r for r in results if r[0] > killed]
    assert len(after) > 20, len(after)
    # The dead node was taken out: unhealthy by the checks or withdrawn by the Master.
    assert any(s[2] == 0 or s[3] == 0 or s[2] is None for s in samples), samples
    # After the first failed check window no connection is tried on it any more,
    # until the Agent has booted a new guest (which then answers: no failures).
    window = CHECK_WINDOW + 1.5             # + slack for the Switch's and the sampler's timing
    late = [s[1] or 0 for s in samples if s[0] >= window]
    assert late and max(late) == min(late), samples
    print(f"\nkill -9 of web-1 under load: {len(after)} requests after the kill, 0 failed; "
          f"connect failures to web-1: {max(s[1] or 0 for s in samples):.0f}; "
          f"slowest request {max(r[1] - r[0] for r in after):.2f} s")


class Sampler(threading.Thread):
    """Reads the Switch's figures for one virtual node every `interval` seconds
    until stopped: (time, connect failures, healthy, routable, open, total);
    a figure is None while the Switch does not list the node."""

    NAMES = ("soda_switch_connect_failures_total", "soda_switch_endpoint_healthy",
             "soda_switch_endpoint_routable", "soda_switch_connections_open", "soda_switch_connections_total")

    def __init__(self, c, vnode, interval=0.02):
        super().__init__(daemon=True)
        self.c, self.vnode, self.interval = c, vnode, interval
        self.samples = []
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            text = _metrics(self.c) or ""
            self.samples.append((time.monotonic(), *(parse_series(text, name).get(self.vnode)
                                                      for name in self.NAMES)))
            time.sleep(self.interval)

    def stop(self):
        self.stopping.set()
        self.join(30)
        return self.samples


def test_scale_down_under_load_finishes_the_removed_nodes_requests(node):
    c = node
    url, records = create(c, 2, [1.0, 1.0])
    burn = url + "cgi-bin/burn?seconds=1"
    assert "burned 1" in fetch(burn, 30)
    loop = Loop(burn, workers=4, timeout=60)
    loop.start()
    wait_until(lambda: series(c, "soda_switch_connections_open").get("web-1", 0) >= 1, 30,
               what="a request in flight on web-1")
    sampler = Sampler(c, "web-1")
    sampler.start()
    resized = time.monotonic()
    c.ctl("service", "resize", "web", "--nodes", "1")
    time.sleep(5)
    results = loop.stop()
    samples = sampler.stop()
    failed = [r for r in results if not r[2]]
    assert not failed, (failed[:5], c.log("switch")[-3000:])
    assert all("burned 1" in r[3] for r in results)
    # The Switch stopped routing to web-1 while requests on it were still in flight...
    draining = [s for s in samples if s[3] == 0 and (s[4] or 0) >= 1]
    assert draining, (samples[-20:], c.log("switch")[-3000:])
    # ... which then finished (no failed request above), and it got no new connection.
    assert samples[-1][4] in (0, None)
    totals = [s[5] for s in samples if s[0] >= draining[0][0] and s[5] is not None]
    assert max(totals) == min(totals), totals
    finished_after = [r for r in results if r[0] < resized < r[1]]
    assert finished_after, "no request was in flight across the resize"
    # Drained, the Master lets the Agent stop it: the guest goes and the record with it.
    wait_until(lambda: [v["name"] for v in c.json("service", "get", "web")["vnodes"]] == ["web-0"], 60,
               what="web-1 to be stopped after draining")
    wait_until(lambda: not alive(records["web-1"]["pid"]), 30, what="web-1's guest to exit")
    assert alive(records["web-0"]["pid"])
    print(f"\nscale-down under load: {len(results)} burn requests, 0 failed, "
          f"{len(finished_after)} in flight across the resize, up to {max(s[4] for s in draining):.0f} "
          f"draining on web-1")
