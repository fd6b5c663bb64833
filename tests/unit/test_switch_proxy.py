"""The Switch's asyncio proxy end to end on loopback: tiny backends that
answer with their own name, a Proxy fed EndpointSets, clients counting who
answered. Every request has a count and a time bound."""

import asyncio
import logging
import socket
from collections import Counter

import pytest

from soda import model
from soda.switch.proxy import Proxy
from tests.support import free_port

REQUEST_TIMEOUT = 5.0

LOOPS = ["asyncio"]
try:
    import uvloop
    LOOPS.append("uvloop")
except ImportError:       # the stock loop is tested either way
    uvloop = None


@pytest.fixture(params=LOOPS)
def run(request):
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def runner(coro, timeout=60.0):
        async def bounded():
            try:
                return await asyncio.wait_for(coro, timeout)
            finally:
                while Backend.live:
                    await Backend.live.pop().stop()
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())
    return runner


class Backend:
    """A loopback server. mode "name": answers one HTTP-ish request with its
    name, then closes. mode "echo": reads to EOF, then sends back
    "<name>:" + what it read, then closes. mode "hold": sends its name at
    once and echoes until EOF."""

    live = []       # started and not yet stopped: the runner stops them

    def __init__(self, name, mode="name"):
        self.name = name
        self.mode = mode
        self.hits = 0
        self.server = None
        self.port = 0

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.live.append(self)
        return self

    async def _handle(self, reader, writer):
        self.hits += 1
        try:
            if self.mode == "name":
                await reader.readuntil(b"\r\n\r\n")
                body = self.name.encode()
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            elif self.mode == "echo":
                data = await reader.read()
                writer.write(self.name.encode() + b":" + data)
            else:
                writer.write(self.name.encode() + b"\n")
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def endpoint(self, weight=1.0, ready=True):
        return model.Endpoint(vnode=self.name, address="127.0.0.1", port=self.port, weight=weight, ready=ready)

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()


def eset(listen_port, *endpoints, policy="weighted-round-robin", service="web",
         health=model.HealthCheck(kind="none"), drain_seconds=30.0):
    """No active checks by default: they would connect to the backends these
    tests count connections on (tests/unit/test_switch_health.py has them)."""
    return model.EndpointSet(service=service,
                             switch=model.SwitchSpec(listen=f"127.0.0.1:{listen_port}", policy=policy,
                                                     health=health, drain_seconds=drain_seconds),
                             endpoints=tuple(endpoints))


async def get(port):
    """One HTTP-ish request through the proxy; the name in the answer ("" if none)."""
    async def once():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
            answer = await reader.read()
        finally:
            writer.close()
        return answer.partition(b"\r\n\r\n")[2].decode()
    return await asyncio.wait_for(once(), REQUEST_TIMEOUT)


async def turned_away(port):
    """A request the proxy cannot place: closed without an answer (a reset
    when the request was still unread), never left hanging."""
    try:
        return await get(port) == ""
    except ConnectionResetError:
        return True


async def names(port, n):
    return [await get(port) for _ in range(n)]


async def settle(proxy, timeout=REQUEST_TIMEOUT):
    """Wait until the proxy has no connection left (bounded)."""
    for _ in range(int(timeout / 0.01)):
        if proxy.active_connections() == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{proxy.active_connections()} connection(s) still open")


def test_weights_one_to_two_split_sixty_requests_twenty_forty(run):
    async def main():
        a, b = await Backend("a").start(), await Backend("b").start()
        port = free_port()
        proxy = Proxy()
        await proxy.apply(eset(port, a.endpoint(0.5), b.endpoint(1.0)))
        got = await names(port, 60)
        assert Counter(got) == {"a": 20, "b": 40}
        assert (a.hits, b.hits) == (20, 40)          # what the backends saw
        for i in range(len(got) - 2):                # interleaved, not bursts
            assert got[i:i + 3].count("a") == 1, got
        await settle(proxy)
        info = proxy.services()["web"]
        assert info["active"] == {"a": 0, "b": 0}
        assert info["stats"].per_endpoint == {"a": 20, "b": 40} and info["stats"].refused == 0
        await proxy.close()
    run(main())


def test_refusing_node_is_skipped_by_passive_failover(run):
    async def main():
        a, b = await Backend("a").start(), await Backend("b").start()
        dead = model.Endpoint("dead", "127.0.0.1", free_port(), 1.0, True)     # nothing listens there
        port = free_port()
        proxy = Proxy(fail_timeout=60)
        await proxy.apply(eset(port, dead, a.endpoint(), b.endpoint()))
        got = await names(port, 30)
        assert len(got) == 30 and set(got) == {"a", "b"}, got      # no client saw an error
        stats = proxy.services()["web"]["stats"]
        assert stats.connect_failures == 1 and stats.failovers == 1 and stats.refused == 0
        await proxy.close()
    run(main())


def test_client_is_closed_only_when_no_node_answers(run):
    async def main():
        dead1 = model.Endpoint("dead1", "127.0.0.1", free_port(), 1.0, True)
        dead2 = model.Endpoint("dead2", "127.0.0.1", free_port(), 1.0, True)
        port = free_port()
        proxy = Proxy()
        await proxy.apply(eset(port, dead1, dead2))
        assert await turned_away(port)
        await proxy.apply(eset(port))                # no endpoints at all
        assert await turned_away(port)
        await settle(proxy)
        info = proxy.services()["web"]
        assert info["stats"].refused == 2 and info["stats"].connect_failures == 2
        await proxy.close()
    run(main())


def test_unready_nodes_get_nothing(run):
    async def main():
        a, b = await Backend("a").start(), await Backend("b").start()
        port = free_port()
        proxy = Proxy()
        await proxy.apply(eset(port, a.endpoint(1.0), b.endpoint(2.0, ready=False)))
        assert set(await names(port, 12)) == {"a"} and b.hits == 0
        await proxy.apply(eset(port, a.endpoint(1.0), b.endpoint(2.0, ready=True)))
        assert Counter(await names(port, 12)) == {"a": 4, "b": 8}
        await proxy.close()
    run(main())


def test_live_weight_update_changes_the_split(run):
    async def main():
        a, b = await Backend("a").start(), await Backend("b").start()
        port = free_port()
        proxy = Proxy()
        await proxy.apply(eset(port, a.endpoint(1.0), b.endpoint(2.0)))
        assert Counter(await names(port, 30)) == {"a": 10, "b": 20}
        await proxy.apply(eset(port, a.endpoint(3.0), b.endpoint(1.0)))
        assert Counter(await names(port, 40)) == {"a": 30, "b": 10}
        await proxy.close()
    run(main())


def test_half_close_is_relayed_both_ways(run):
    async def main():
        echo = await Backend("echo", mode="echo").start()
        port = free_port()
        proxy = Proxy()
        await proxy.apply(eset(port, echo.endpoint()))

        async def exchange(payload):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            writer.write_eof()                       # our half closes, theirs stays open
            answer = await reader.read()
            writer.close()
            return answer
        payload = b"x" * 100_000
        assert await asyncio.wait_for(exchange(payload), REQUEST_TIMEOUT) == b"echo:" + payload
        assert await asyncio.wait_for(exchange(b""), REQUEST_TIMEOUT) == b"echo:"
        await settle(proxy)
        await proxy.close()
    run(main())


def test_large_streams_keep_every_byte_in_order(run):
    async def main():
        hold = await Backend("hold", mode="hold").start()
        port = free_port()
        proxy = Proxy()
        await proxy.apply(eset(port, hold.endpoint()))
        payload = bytes(range(256)) * (16 * 1024)     # 4 MiB, more than any socket buffer

        async def exchange():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)

            async def send():
                for i in range(0, len(payload), 65536):
                    writer.write(payload[i:i + 65536])
                    await writer.drain()
                writer.write_eof()
            sender = asyncio.create_task(send())
            answer = await reader.read()
            await sender
            writer.close()
            return answer
        assert await asyncio.wait_for(exchange(), 30) == b"hold\n" + payload
        await settle(proxy)
        await proxy.close()
    run(main())


def test_deleting_a_service_closes_its_listener_and_drains(run):
    async def main():
        echo = await Backend("echo", mode="echo").start()
        port = free_port()
        proxy = Proxy()
        await proxy.apply(eset(port, echo.endpoint()))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"before")
        await asyncio.sleep(0.05)
        await proxy.apply(model.EndpointSet(service="web", deleted=True))
        assert "web" not in proxy.services()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), REQUEST_TIMEOUT)
        # The connection that was open runs to its end.
        writer.write(b" and after")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT) == b"echo:before and after"
        writer.close()
        await settle(proxy)
        await proxy.close()
    run(main())


def test_service_without_listen_address_gets_no_listener(run):
    async def main():
        a = await Backend("a").start()
        port = free_port()
        proxy = Proxy()
        await proxy.apply(eset(port, a.endpoint()))
        await proxy.apply(model.EndpointSet(service="web", switch=model.SwitchSpec(listen=""),
                                            endpoints=(a.endpoint(),)))
        assert proxy.services() == {}
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), REQUEST_TIMEOUT)
        await proxy.close()
    run(main())


def test_changed_listen_address_rebinds(run):
    async def main():
        a = await Backend("a").start()
        old, new = free_port(), free_port()
        proxy = Proxy()
        await proxy.apply(eset(old, a.endpoint()))
        assert await get(old) == "a"
        await proxy.apply(eset(new, a.endpoint()))
        assert await get(new) == "a"
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", old), REQUEST_TIMEOUT)
        await proxy.close()
    run(main())


def test_unbindable_address_fails_alone_and_is_retried(run, caplog):
    async def main():
        a = await Backend("a").start()
        squatter = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        taken = squatter.sockets[0].getsockname()[1]
        good = free_port()
        proxy = Proxy(bind_retry_seconds=0.1)
        with caplog.at_level(logging.ERROR, logger="soda.switch.proxy"):
            await proxy.apply(eset(taken, a.endpoint(), service="blocked"))
            await proxy.apply(eset(good, a.endpoint(), service="fine"))
        assert f"service blocked: cannot listen on 127.0.0.1:{taken}" in caplog.text
        info = proxy.services()
        assert not info["blocked"]["listening"] and info["blocked"]["bind_error"]
        assert info["fine"]["listening"] and await get(good) == "a"
        # The address comes free: the retry timer binds it without an update.
        squatter.close()
        await squatter.wait_closed()
        for _ in range(100):
            if proxy.services()["blocked"]["listening"]:
                break
            await asyncio.sleep(0.05)
        assert await get(taken) == "a"
        await proxy.close()
    run(main())


def test_listen_hosts_allowlist(run, caplog):
    async def main():
        a = await Backend("a").start()
        port = free_port()
        proxy = Proxy(listen_hosts=["127.0.0.2"])
        with caplog.at_level(logging.ERROR, logger="soda.switch.proxy"):
            await proxy.apply(eset(port, a.endpoint()))
        assert "not in this Switch's listen_hosts" in caplog.text
        assert not proxy.services()["web"]["listening"]
        await proxy.apply(model.EndpointSet("web", model.SwitchSpec(listen=f"127.0.0.2:{port}"),
                                            (a.endpoint(),)))
        assert proxy.services()["web"]["listening"]
        await proxy.close()
    run(main())


def test_least_connections_follows_open_connections(run):
    async def main():
        a, b = await Backend("a", mode="hold").start(), await Backend("b", mode="hold").start()
        port = free_port()
        proxy = Proxy()
        await proxy.apply(eset(port, a.endpoint(1.0), b.endpoint(2.0), policy="weighted-least-connections"))
        held = []
        for _ in range(30):
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), REQUEST_TIMEOUT)
            held.append((await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT), writer))
        assert Counter(name for name, _ in held) == {b"a\n": 10, b"b\n": 20}
        assert proxy.services()["web"]["active"] == {"a": 10, "b": 20}
        # Let 10 of b's connections end: the next 5 go to b, (10+1)/1 > (10+5)/2.
        for name, writer in [h for h in held if h[0] == b"b\n"][:10]:
            writer.close()
        for _ in range(100):
            if proxy.services()["web"]["active"]["b"] == 10:
                break
            await asyncio.sleep(0.02)
        for _ in range(5):
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), REQUEST_TIMEOUT)
            assert await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT) == b"b\n"
            held.append((b"b\n", writer))
        for _, writer in held:
            writer.close()
        await settle(proxy)
        assert proxy.services()["web"]["active"] == {"a": 0, "b": 0}
        await proxy.close()
    run(main())


def test_close_lets_open_connections_finish_then_cuts_the_rest(run):
    async def main():
        echo = await Backend("echo", mode="echo").start()
        port = free_port()
        proxy = Proxy()
        await proxy.apply(eset(port, echo.endpoint()))
        finishing = await asyncio.open_connection("127.0.0.1", port)
        stuck = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.05)
        closing = asyncio.create_task(proxy.close(drain_seconds=1.0))
        await asyncio.sleep(0.05)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)
        finishing[1].write(b"bye")
        finishing[1].write_eof()
        assert await asyncio.wait_for(finishing[0].read(), REQUEST_TIMEOUT) == b"echo:bye"
        await asyncio.wait_for(closing, REQUEST_TIMEOUT)
        assert proxy.active_connections() == 0
        # The stuck one was cut when the drain time ran out.
        assert await asyncio.wait_for(stuck[0].read(), REQUEST_TIMEOUT) == b""
        for _, writer in (finishing, stuck):
            writer.close()
    run(main())


def test_a_node_that_stops_reading_stalls_the_client_not_the_proxys_memory(run):
    async def main():
        release = asyncio.Event()
        received = []

        async def stall(reader, writer):
            await release.wait()
            received.append(len(await reader.read()))
            writer.close()
        backend = await asyncio.start_server(stall, "127.0.0.1", 0)
        bport = backend.sockets[0].getsockname()[1]
        port = free_port()
        proxy = Proxy()
        await proxy.apply(eset(port, model.Endpoint("slow", "127.0.0.1", bport, 1.0, True)))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        total, chunk = 256 << 20, b"z" * (1 << 20)
        sent = 0

        async def send():
            nonlocal sent
            while sent < total:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
            writer.write_eof()
        sender = asyncio.create_task(send())
        await asyncio.sleep(1.0)
        # Back-pressure reached the client: only socket buffers' worth is in flight,
        # and the proxy itself holds at most about one read's worth per direction.
        assert sent < total // 4, sent
        (relay,) = proxy._relays
        assert relay.upstream.transport.get_write_buffer_size() <= 1 << 20
        release.set()
        await asyncio.wait_for(sender, 30)
        await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT)
        writer.close()
        await settle(proxy)
        assert received == [total]
        backend.close()
        await proxy.close()
    run(main())


def test_node_that_never_answers_is_given_up_after_connect_timeout(run, caplog):
    async def main():
        # A listener whose accept queue is full: the kernel drops further SYNs,
        # so a connect to it hangs like one to a dead guest.
        blackhole = socket.socket()
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        filler = socket.create_connection(blackhole.getsockname(), timeout=1)
        try:
            a = await Backend("a").start()
            port = free_port()
            proxy = Proxy(connect_timeout=0.3)
            hung = model.Endpoint("hung", "127.0.0.1", blackhole.getsockname()[1], 1.0, True)
            await proxy.apply(eset(port, hung, a.endpoint()))
            with caplog.at_level(logging.WARNING, logger="soda.switch.proxy"):
                got = await names(port, 6)
            assert got == ["a"] * 6
            assert "cannot connect to hung" in caplog.text and "no answer within 0.3 s" in caplog.text
            stats = proxy.services()["web"]["stats"]
            assert stats.connect_failures == 1 and stats.failovers == 1
            await settle(proxy)
            assert proxy.services()["web"]["active"] == {"a": 0, "hung": 0}
            await proxy.close()
        finally:
            filler.close()
            blackhole.close()
    run(main())
