"""Deploy on first request with real User-Mode Linux guests: a service that
rests at zero virtual nodes, ten concurrent first clients through the Switch
that all get an answer from the one guest started for them, and the service
back at zero once idle. Counted outside the code under test too: the
Agent's guest records, /proc and the cgroup directories."""

import concurrent.futures
import statistics
import subprocess
import time

import pytest

from tests.support import cpu_ticks, free_port
from tests.system.cluster import wait_until
from tests.system.guests import alive, fetch, guest_records, require_guest_support, vnode_cgroups
pytestmark = [pytest.mark.root, pytest.mark.guest]

require_guest_support()

IDLE_SECONDS = 3
CLIENTS = 10


def listening(port):
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    return bool(out.strip())


def timed_fetch(url):
    started = time.monotonic()
    page = fetch(url, timeout=60)
    return page, time.monotonic() - started


def test_first_requests_start_one_guest_and_idle_returns_to_zero(uml_node):
    c = uml_node
    port = free_port()
    c.ctl("service", "create", "od", "--image", "busybox-httpd", "--hypervisor", "uml", "--cpu", "0.5",
          "--memory", "64", "--on-demand", "1", "--idle-seconds", str(IDLE_SECONDS),
          "--switch", f"127.0.0.1:{port}")
    svc = c.json("service", "get", "od")
    assert svc["nodes"] == 0 and svc["vnodes"] == []
    assert svc["on_demand"]["max_nodes"] == 1 and svc["on_demand"]["idle_seconds"] == IDLE_SECONDS
    assert guest_records(c) == {}
    # Wait for the listener without connecting: a connection would deploy.
    wait_until(lambda: listening(port), 30, what="the Switch to listen for od")
    assert c.json("service", "get", "od")["vnodes"] == []

    url = f"http://127.0.0.1:{port}/"
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(timed_fetch, [url] * CLIENTS))
    pages = [page for page, _ in results]
    assert all("SODA virtual node" in page and "od-0" in page for page in pages), pages
    latencies = sorted(seconds for _, seconds in results)
    print(f"\nfirst-request latency over {CLIENTS} concurrent clients (held -> served): "
          f"min {latencies[0]:.2f} s, median {statistics.median(latencies):.2f} s, max {latencies[-1]:.2f} s")
    last_request = time.monotonic()

    # Exactly one virtual node: as the Master sees it, as the Agent recorded
    # it, as a process and as a cgroup.
    svc = c.json("service", "get", "od")
    assert svc["nodes"] == 1 and [v["name"] for v in svc["vnodes"]] == ["od-0"]
    records = guest_records(c)
    assert list(records) == ["od-0"]
    pid = records["od-0"]["pid"]
    c.guest_pids.add(pid)
    assert alive(pid)
    assert vnode_cgroups(c) == ["od-0"]
    warm_page, warm = timed_fetch(url)
    assert "od-0" in warm_page
    print(f"warm request: {warm * 1000:.1f} ms")
    last_request = time.monotonic()

    # Idle: back to zero (no virtual node, no guest process, no cgroup).
    wait_until(lambda: c.json("service", "get", "od")["vnodes"] == [], 60, interval=0.2,
               what="the idle service to go back to zero")
    idle_for = time.monotonic() - last_request
    assert idle_for >= IDLE_SECONDS - 0.5, f"released after {idle_for:.1f} s, before idle_seconds"
    assert c.json("service", "get", "od")["nodes"] == 0
    wait_until(lambda: not alive(pid), 30, what="the guest process to end")
    assert guest_records(c) == {}
    wait_until(lambda: vnode_cgroups(c) == [], 30, what="the guest's cgroup to go")
    print(f"back to zero {idle_for:.1f} s after the last request (idle_seconds {IDLE_SECONDS})")

    # And the next client brings a fresh guest back.
    page, again = timed_fetch(url)
    assert "SODA virtual node" in page
    records = guest_records(c)
    assert len(records) == 1
    c.guest_pids.update(r["pid"] for r in records.values())
    assert len([v for v in c.json("service", "get", "od")["vnodes"]]) == 1
    print(f"second cold start: {again:.2f} s")


def _phases(c, service):
    return [v["phase"] for v in c.json("service", "get", service)["vnodes"]]


def test_a_warm_pool_thaws_its_frozen_guest_for_the_first_request_and_freezes_it_when_idle(uml_node):
    c = uml_node
    port = free_port()
    c.ctl("service", "create", "wp", "--image", "busybox-httpd", "--hypervisor", "uml", "--cpu", "0.5",
          "--memory", "64", "--on-demand", "1", "--warm", "1", "--idle-seconds", str(IDLE_SECONDS),
          "--switch", f"127.0.0.1:{port}")
    assert c.json("service", "get", "wp")["on_demand"]["warm"] == 1
    wait_until(lambda: _phases(c, "wp") == ["FROZEN"], 120, interval=0.2,
               what="the pool's guest to boot and freeze")
    pid = guest_records(c)["wp-0"]["pid"]
    c.guest_pids.add(pid)
    # Frozen as the kernel says: the freezer holds it, and it uses no CPU.
    procs = c.cgroups.procs("wp-0")
    assert pid in procs
    held = cpu_ticks(*procs)
    time.sleep(1.0)
    assert cpu_ticks(*procs) == held, "the frozen guest ran"
    wait_until(lambda: listening(port), 30, what="the Switch to listen for wp")

    url = f"http://127.0.0.1:{port}/"
    page, first = timed_fetch(url)
    assert "wp-0" in page
    assert guest_records(c)["wp-0"]["pid"] == pid, "the pool's guest was booted again, not thawed"
    print(f"\nfirst request to a warm pool (frozen guest thawed -> served): {first * 1000:.1f} ms")
    assert first < 2.0, f"a thaw took {first:.2f} s"
    wait_until(lambda: _phases(c, "wp") == ["RUNNING"], 30, what="the thawed guest to be RUNNING")

    # Idle: frozen again, the same guest; and thawed again by the next client.
    wait_until(lambda: _phases(c, "wp") == ["FROZEN"], 60, interval=0.2,
               what="the idle service to freeze its guest")
    assert alive(pid) and guest_records(c)["wp-0"]["pid"] == pid
    page, again = timed_fetch(url)
    assert "wp-0" in page and guest_records(c)["wp-0"]["pid"] == pid
    print(f"second thaw: {again * 1000:.1f} ms")
