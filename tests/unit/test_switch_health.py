"""Active health checks, draining and per-virtual-node counters of the Switch.

The HealthMonitor alone with a scripted probe (rise/fall, observers, passive
failures), the real TCP and HTTP probes against loopback servers, and the
Proxy end to end on loopback: a node that dies stops getting connections
without a client seeing an error, a node that leaves drains, and the
counters match what the clients and backends saw."""

import asyncio
import re
import socket

import pytest

from soda import model
from soda.switch import metrics
from soda.switch.health import HealthMonitor, http_probe, tcp_probe
from soda.switch.proxy import Proxy
from tests.support import free_port
from tests.unit.test_switch_proxy import REQUEST_TIMEOUT, Backend, eset, get, names, run, settle  # noqa: F401

FAST = model.HealthCheck(kind="tcp", interval=0.05, timeout=0.5, rise=2, fall=2)


def ep(name, port=1, ready=True, address="127.0.0.1"):
    return model.Endpoint(vnode=name, address=address, port=port, weight=1.0, ready=ready)


class Script:
    """A probe whose answers the test sets per vnode; counts calls."""

    def __init__(self):
        self.ok = {}
        self.calls = []

    async def __call__(self, endpoint, check):
        self.calls.append(endpoint.vnode)
        return self.ok.get(endpoint.vnode, True)


async def until(predicate, timeout=5.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


# ---- the monitor alone ---------------------------------------------------

def test_ready_endpoints_start_healthy_and_fall_after_fall_failures(run):
    async def main():
        probe = Script()
        mon = HealthMonitor(probe, jitter=lambda: 1.0)
        seen = []
        mon.subscribe(lambda service, healthy: seen.append((service, healthy)))
        mon.update("web", FAST, [ep("a"), ep("b"), ep("c", ready=False)])
        # Optimistic: the Master said RUNNING; the unready one is not tracked.
        assert mon.healthy("web") == {"a", "b"}
        assert seen == [("web", frozenset({"a", "b"}))]
        probe.ok["b"] = False
        await until(lambda: not mon.is_healthy("web", "b"))
        assert mon.state("web")["b"]["failures"] >= FAST.fall
        assert seen[-1] == ("web", frozenset({"a"}))
        probe.ok["b"] = True
        await until(lambda: mon.is_healthy("web", "b"))
        assert mon.state("web")["b"]["passes"] >= FAST.rise
        assert seen[-1] == ("web", frozenset({"a", "b"}))
        await mon.close()
    run(main())


def test_one_failure_is_not_enough_and_rise_needs_passes_in_a_row(run):
    async def main():
        probe = Script()
        mon = HealthMonitor(probe, jitter=lambda: 1.0)
        check = model.HealthCheck(kind="tcp", interval=60, timeout=1, rise=3, fall=2)
        mon.update("web", check, [ep("a")])
        target = mon._services["web"].targets["a"]

        async def checked(n):
            await until(lambda: len(probe.calls) == n)
            await asyncio.sleep(0.02)
        mon.report_failure("web", "a")          # counts one failure, wakes a real check
        await checked(1)
        assert mon.is_healthy("web", "a")       # failed once, then passed: still healthy
        probe.ok["a"] = False
        mon.report_failure("web", "a")
        assert mon.is_healthy("web", "a")       # one failure in a row
        await checked(2)                        # the woken check fails: two in a row
        assert not mon.is_healthy("web", "a")
        probe.ok["a"] = True
        for n in (3, 4):
            target.wake.set()
            await checked(n)
            assert not mon.is_healthy("web", "a")
        target.wake.set()
        await checked(5)
        assert mon.is_healthy("web", "a")       # third pass in a row
        await mon.close()
    run(main())


def test_kind_none_runs_no_checks_and_removed_service_notifies_empty(run):
    async def main():
        probe = Script()
        mon = HealthMonitor(probe)
        seen = []
        mon.subscribe(lambda service, healthy: seen.append(healthy))
        mon.update("web", model.HealthCheck(kind="none", interval=0.01), [ep("a")])
        mon.report_failure("web", "a")
        await asyncio.sleep(0.1)
        assert probe.calls == [] and mon.healthy("web") == {"a"}
        mon.remove("web")
        assert seen == [frozenset({"a"}), frozenset()] and mon.healthy("web") == frozenset()
        await mon.close()
    run(main())


def test_moved_endpoint_starts_over_and_gone_endpoint_is_dropped(run):
    async def main():
        probe = Script()
        probe.ok["a"] = False
        mon = HealthMonitor(probe, jitter=lambda: 1.0)
        mon.update("web", FAST, [ep("a", port=1)])
        await until(lambda: not mon.is_healthy("web", "a"))
        mon.update("web", FAST, [ep("a", port=2)])      # placed again elsewhere
        assert mon.is_healthy("web", "a")
        mon.update("web", FAST, [])
        assert mon.healthy("web") == frozenset() and mon.state("web") == {}
        await mon.close()
    run(main())


def test_an_observer_that_raises_does_not_starve_the_others(run, caplog):
    async def main():
        mon = HealthMonitor(Script())
        got = []
        mon.subscribe(lambda s, h: 1 / 0)
        unsubscribe = mon.subscribe(lambda s, h: got.append(h))
        mon.update("web", FAST, [ep("a")])
        unsubscribe()
        mon.update("web", FAST, [])
        assert got == [frozenset({"a"})]
        await mon.close()
    run(main())
    assert "health observer" in caplog.text


# ---- the real probes --------------------------------------------------------

async def http_server(status_line):
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(status_line + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_tcp_and_http_probes_against_loopback(run):
    async def main():
        ok_server, ok_port = await http_server(b"HTTP/1.0 200 OK")
        bad_server, bad_port = await http_server(b"HTTP/1.0 503 Service Unavailable")
        closed = free_port()
        check = model.HealthCheck(kind="http", path="/healthz", expect_status=200, timeout=1.0)
        assert await tcp_probe(ep("a", ok_port), check)
        assert not await tcp_probe(ep("a", closed), check)
        assert await http_probe(ep("a", ok_port), check)
        assert not await http_probe(ep("a", bad_port), check)
        assert await http_probe(ep("a", bad_port), model.HealthCheck(kind="http", path="/", expect_status=503))
        assert not await http_probe(ep("a", closed), check)
        for server in (ok_server, bad_server):
            server.close()
    run(main())


def test_probe_timeout_bounds_a_silent_node(run):
    async def main():
        async def silent(reader, writer):
            await asyncio.sleep(10)
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert not await http_probe(ep("a", port), model.HealthCheck(kind="http", path="/", timeout=0.2))
        assert loop.time() - started < 1.0
        server.close()
    run(main())


# ---- the proxy with health checks -------------------------------------------------

def test_a_dead_node_gets_no_traffic_and_no_client_sees_an_error(run):
    async def main():
        a, b = await Backend("a").start(), await Backend("b").start()
        port = free_port()
        proxy = Proxy(fail_timeout=0.01)        # passive marks expire at once: health decides alone
        await proxy.apply(eset(port, a.endpoint(), b.endpoint(), health=FAST))
        assert sorted(set(await names(port, 6))) == ["a", "b"]
        await b.stop()                          # the node dies: its port refuses
        answers = [await get(port) for _ in range(10)]
        assert answers == ["a"] * 10            # passive retry: nobody saw the refusal
        await until(lambda: not proxy.health.is_healthy("web", "b"))
        failures = proxy.services()["web"]["stats"].connect_failures
        assert await names(port, 20) == ["a"] * 20
        # Unhealthy: not even tried any more.
        assert proxy.services()["web"]["stats"].connect_failures == failures
        await settle(proxy)
        await proxy.close()
    run(main())


def test_a_node_that_comes_back_gets_traffic_again(run):
    async def main():
        a = await Backend("a").start()
        b = Backend("b")
        port, bport = free_port(), free_port()
        proxy = Proxy(fail_timeout=0.01)
        b_ep = model.Endpoint("b", "127.0.0.1", bport, 1.0, True)
        await proxy.apply(eset(port, a.endpoint(), b_ep, health=FAST))
        await until(lambda: not proxy.health.is_healthy("web", "b"))
        assert set(await names(port, 6)) == {"a"}
        b.server = await asyncio.start_server(b._handle, "127.0.0.1", bport)
        b.port = bport
        Backend.live.append(b)
        await until(lambda: proxy.health.is_healthy("web", "b"))
        assert set(await names(port, 6)) == {"a", "b"}
        await settle(proxy)
        await proxy.close()
    run(main())


# ---- draining -----------------------------------------------------------------

async def holding_connection(drain_seconds=30.0):
    """A proxy routing to a "hold" backend, a client connected through it,
    and a second backend to route to once "held" leaves."""
    held = await Backend("held", mode="hold").start()
    other = await Backend("other").start()
    port = free_port()
    proxy = Proxy()
    await proxy.apply(eset(port, held.endpoint(), drain_seconds=drain_seconds))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT) == b"held\n"
    return proxy, port, other, reader, writer


async def cut_or_closed(reader):
    """The connection ends: EOF or reset, not a hang."""
    try:
        assert await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT) == b""
    except ConnectionResetError:
        pass


def test_a_node_that_leaves_finishes_its_connections_but_gets_no_new_ones(run):
    async def main():
        proxy, port, other, reader, writer = await holding_connection()
        await proxy.apply(eset(port, other.endpoint()))       # scale-down: "held" left
        assert await names(port, 5) == ["other"] * 5
        view = {v.vnode: v for v in proxy.views()[0].vnodes}
        assert view["held"].stats.open == 1 and not view["held"].routable
        writer.write(b"still here")
        assert await asyncio.wait_for(reader.readexactly(10), REQUEST_TIMEOUT) == b"still here"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT) == b""
        writer.close()
        await settle(proxy)
        # Drained in time: its timer is gone and so are its counters.
        assert "held" not in proxy._services["web"].drains
        assert [v.vnode for v in proxy.views()[0].vnodes] == ["other"]
        await proxy.close()
    run(main())


def test_a_connection_still_open_after_drain_seconds_is_cut(run):
    async def main():
        proxy, port, other, reader, writer = await holding_connection(drain_seconds=0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await proxy.apply(eset(port, other.endpoint(), drain_seconds=0.3))
        await cut_or_closed(reader)
        assert 0.25 <= loop.time() - started < 2.0
        writer.close()
        await settle(proxy)
        await proxy.close()
    run(main())


def test_a_removed_service_drains_then_cuts_and_is_reported_meanwhile(run):
    async def main():
        proxy, _, _, reader, writer = await holding_connection(drain_seconds=0.4)
        await proxy.remove("web")
        (view,) = proxy.views()
        assert view.service == "web" and not view.listening
        assert [(v.vnode, v.routable, v.stats.open) for v in view.vnodes] == [("held", False, 1)]
        await cut_or_closed(reader)
        writer.close()
        await settle(proxy)
        assert proxy.views() == []
        await proxy.close()
    run(main())


# ---- counters --------------------------------------------------------------------

def test_counters_match_what_clients_and_backends_saw(run):
    async def main():
        echo = await Backend("echo", mode="echo").start()
        dead = free_port()
        port = free_port()
        proxy = Proxy(fail_timeout=60)
        await proxy.apply(eset(port, echo.endpoint(),
                               model.Endpoint("dead", "127.0.0.1", dead, 1.0, True)))
        sent = received = 0
        for i in range(6):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            payload = b"x" * (1000 + i)
            writer.write(payload)
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT)
            assert answer == b"echo:" + payload
            sent, received = sent + len(payload), received + len(answer)
            writer.close()
        await settle(proxy)
        views = {v.vnode: v for v in proxy.views()[0].vnodes}
        e, d = views["echo"].stats, views["dead"].stats
        assert (e.total, e.open, e.bytes_in, e.bytes_out) == (6, 0, sent, received)
        assert e.connect_failures == 0 and d.connect_failures >= 1 and d.total == 0
        assert e.ttfb_count == 6 and 0 < e.ttfb_p50 < REQUEST_TIMEOUT and e.ttfb_last > 0
        assert e.ttfb_mean == pytest.approx(e.ttfb_sum / 6)
        text = metrics.render_prometheus(proxy.views())
        assert f'soda_switch_bytes_in_total{{service="web",vnode="echo"}} {sent}' in text
        assert f'soda_switch_bytes_out_total{{service="web",vnode="echo"}} {received}' in text
        assert 'soda_switch_connections_total{service="web",vnode="echo"} 6' in text
        assert 'soda_switch_connections_open{service="web",vnode="echo"} 0' in text
        assert re.search(r'soda_switch_connect_failures_total\{service="web",vnode="dead"\} [1-9]', text)
        assert f'soda_switch_listening{{service="web",listen="127.0.0.1:{port}"}} 1' in text
        await proxy.close()
    run(main())


def test_vnode_stats_median_and_window():
    s = metrics.VnodeStats()
    assert (s.ttfb_p50, s.ttfb_mean) == (0.0, 0.0)
    for value in (0.3, 0.1, 0.2):
        s.record_ttfb(value)
    assert s.ttfb_p50 == 0.2 and s.ttfb_last == 0.2 and s.ttfb_mean == pytest.approx(0.2)
    for _ in range(metrics.TTFB_WINDOW):
        s.record_ttfb(1.0)
    assert s.ttfb_p50 == 1.0 and s.ttfb_count == 3 + metrics.TTFB_WINDOW


def test_metrics_server_serves_text_and_404(run):
    async def main():
        stats = metrics.VnodeStats(total=3, bytes_in=10)
        view = metrics.ServiceView("w\"eb", "127.0.0.1:1", True, "",
                                   (metrics.VnodeView("w-0", stats, True, True),))
        server = metrics.MetricsServer(lambda: [view])
        await server.start("127.0.0.1", 0)

        async def fetch(path):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT)
            writer.close()
            return data.decode()
        page = await fetch("/metrics")
        assert page.startswith("HTTP/1.0 200 OK")
        assert 'soda_switch_connections_total{service="w\\"eb",vnode="w-0"} 3' in page
        assert "# TYPE soda_switch_bytes_in_total counter" in page
        assert (await fetch("/")).startswith("HTTP/1.0 404")
        await server.close()
    run(main())


def test_tcp_listeners_sees_a_listening_socket():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert ("127.0.0.1", port) in metrics.tcp_listeners()
    with socket.socket(socket.AF_INET6) as s6:
        s6.bind(("::1", 0))
        s6.listen()
        assert ("::1", s6.getsockname()[1]) in metrics.tcp_listeners()


# ---- unanswered requests on a node found dead -----------------------------------------

async def hanging_backend():
    """Accepts, reads, never answers (a guest that froze or died mid-request)."""
    conns = []

    async def hang(reader, writer):
        conns.append(writer)
        await asyncio.sleep(3600)
    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], conns


async def good_and_hung(mode="name"):
    """A proxy over a working backend and a hanging one whose HTTP checks
    time out: (proxy, listen port, hanging server, its connections)."""
    good = await Backend("good", mode=mode).start()
    server, hport, conns = await hanging_backend()
    port = free_port()
    proxy = Proxy()
    check = model.HealthCheck(kind="http", path="/", interval=0.1, timeout=0.2, rise=1, fall=2)
    await proxy.apply(eset(port, model.Endpoint("hung", "127.0.0.1", hport, 1.0, True), good.endpoint(),
                           health=check))
    return proxy, port, server, conns


def test_unanswered_get_on_a_node_found_dead_is_sent_to_another(run):
    async def main():
        proxy, port, server, conns = await good_and_hung()
        # Smooth WRR sends the first request to "good" or "hung": ask twice, both answer "good".
        loop = asyncio.get_running_loop()
        started = loop.time()
        answers = await asyncio.gather(get(port), get(port))
        assert answers == ["good", "good"]
        assert loop.time() - started < REQUEST_TIMEOUT - 1
        assert proxy.services()["web"]["stats"].redispatched >= 1
        assert conns                     # the hung node really had taken a request
        server.close()
        await settle(proxy)
        await proxy.close()
    run(main())


def test_a_reset_before_any_answer_is_sent_to_another_node(run):
    async def main():
        good = await Backend("good").start()

        async def reset(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()
        bad = await asyncio.start_server(reset, "127.0.0.1", 0)
        port = free_port()
        proxy = Proxy()
        await proxy.apply(eset(port, model.Endpoint("bad", "127.0.0.1", bad.sockets[0].getsockname()[1], 1.0, True),
                               good.endpoint()))
        assert await names(port, 4) == ["good"] * 4
        assert proxy.services()["web"]["stats"].redispatched >= 1
        bad.close()
        await settle(proxy)
        await proxy.close()
    run(main())


def test_a_post_is_never_sent_twice(run):
    async def main():
        proxy, port, server, conns = await good_and_hung(mode="echo")
        outcomes = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /pay HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
            writer.write_eof()
            try:
                outcomes.append(await asyncio.wait_for(reader.read(), 2.0))
            except (asyncio.TimeoutError, ConnectionResetError):
                outcomes.append(None)
            writer.close()
        # One went to the hung node and stays unanswered there; never replayed.
        assert sorted(map(bool, outcomes)) == [False, True]
        assert proxy.services()["web"]["stats"].redispatched == 0
        server.close()
        for w in conns:
            w.close()
        await proxy.close(0)
    run(main())


def test_a_node_the_master_marks_unready_has_its_requests_moved_or_cut(run):
    async def main():
        good = await Backend("good").start()
        talker = await Backend("talker", mode="hold").start()      # answers at once, then holds
        server, hport, conns = await hanging_backend()
        hung = model.Endpoint("hung", "127.0.0.1", hport, 1.0, True)
        port = free_port()
        proxy = Proxy()
        await proxy.apply(eset(port, hung, talker.endpoint()))
        # An unanswered GET on "hung" and an answered connection on "talker".
        pending = asyncio.ensure_future(get(port))
        await until(lambda: conns)                  # round robin: "hung" took it
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT) == b"talker\n"
        # Their guests died (the Agent saw it): listed, not ready.
        await proxy.apply(eset(port, model.Endpoint("hung", "127.0.0.1", hport, 1.0, False),
                               talker.endpoint(ready=False), good.endpoint()))
        assert await asyncio.wait_for(pending, REQUEST_TIMEOUT) == "good"
        await cut_or_closed(reader)
        writer.close()
        server.close()
        await settle(proxy)
        await proxy.close()
    run(main())
