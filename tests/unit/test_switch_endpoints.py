"""Endpoint lists into the proxy: the watcher thread (reconnect, backoff,
stop) with a fake client, the in-order sync with its post-reconnect resync,
and the whole Switch against an in-process Master on loopback."""

import asyncio
import os
import threading
import time
from collections import Counter

import pytest

from soda import model
from soda.backoff import Backoff
from soda.errors import Unavailable
from soda.switch.endpoints import EndpointSync, EndpointWatcher, StreamLost, StreamOpened
from soda.switch.main import Switch, SwitchConfig
from tests.support import free_port, make_ext4_image, master_client, master_config

TIMEOUT = 10.0


def es(name, listen="127.0.0.1:1", deleted=False):
    return model.EndpointSet(service=name, switch=model.SwitchSpec(listen=listen), deleted=deleted)


class FakeTarget:
    def __init__(self):
        self.calls = []

    async def apply(self, e):
        self.calls.append(("apply", e.service))

    async def remove(self, name):
        self.calls.append(("remove", name))


class FakeClient:
    """watch_endpoints() plays one script per call: a list of EndpointSets,
    then an exception to raise or "block" to wait until close()."""

    def __init__(self, scripts):
        self.scripts = list(scripts)
        self.calls = []
        self.closed = threading.Event()

    def watch_endpoints(self, service=""):
        self.calls.append(time.monotonic())
        events, end = self.scripts.pop(0) if self.scripts else ([], "block")
        yield from events
        if end == "block":
            self.closed.wait(TIMEOUT)
            return
        if end is not None:
            raise end

    def close(self):
        self.closed.set()


def run_watcher(client, n_events, **kw):
    """Run a watcher against `client` until it delivered `n_events`; returns them."""
    async def main():
        got = []
        watcher = EndpointWatcher(client, asyncio.get_running_loop(), got.append, **kw)
        watcher.start()
        for _ in range(int(TIMEOUT / 0.01)):
            if len(got) >= n_events:
                break
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, watcher.stop)
        assert time.monotonic() - started < 2, "stop must unblock a waiting watch"
        assert not watcher._thread.is_alive()
        return got
    return asyncio.run(asyncio.wait_for(main(), 2 * TIMEOUT))


def test_watcher_reconnects_with_backoff_and_delivers_in_order():
    down = Unavailable("the Master at 127.0.0.1:1 is unreachable")
    client = FakeClient([
        ([], down),
        ([], down),
        ([es("a"), es("b")], down),          # a stream that delivered resets the backoff
        ([es("a", deleted=True)], "block"),
    ])
    got = run_watcher(client, 10, backoff=Backoff(0.05, 0.1, jitter=0))
    assert got == [StreamOpened(), StreamLost(str(down)),
                   StreamOpened(), StreamLost(str(down)),
                   StreamOpened(), es("a"), es("b"), StreamLost(str(down)),
                   StreamOpened(), es("a", deleted=True)]
    gaps = [b - a for a, b in zip(client.calls, client.calls[1:])]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1      # doubled, then capped
    assert 0.05 <= gaps[2] < 0.1                   # reset after a stream with events


def test_watcher_probe_failure_opens_no_stream():
    probes = []

    def probe():
        probes.append(1)
        if len(probes) < 3:
            raise Unavailable("down")
    client = FakeClient([([es("a")], "block")])
    got = run_watcher(client, 4, probe=probe, backoff=Backoff(0.01, 0.01, jitter=0))
    assert got == [StreamLost("down"), StreamLost("down"), StreamOpened(), es("a")]
    assert len(client.calls) == 1


def run_sync(events, target, *, settle=0.05, extra_wait=0.2):
    async def main():
        sync = EndpointSync(target, settle_seconds=settle, settle_max_seconds=1.0)
        task = asyncio.create_task(sync.run())
        for event in events:
            if event == "wait":
                await asyncio.sleep(extra_wait)
            else:
                sync.handle(event)
        await asyncio.sleep(extra_wait)
        task.cancel()
        return sync
    return asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_sync_applies_in_order_and_removes_deleted():
    target = FakeTarget()
    sync = run_sync([StreamOpened(), es("a"), es("b"), es("a", deleted=True)], target)
    assert target.calls == [("apply", "a"), ("apply", "b"), ("remove", "a")]
    assert sync.services == {"b"} and sync.synced.is_set()


def test_sync_after_reconnect_removes_services_missing_from_the_snapshot():
    target = FakeTarget()
    sync = run_sync([StreamOpened(), es("a"), es("b"), es("c"), "wait",
                     StreamLost("down"), "wait",
                     StreamOpened(), es("b"), "wait"], target)
    assert target.calls[3:] == [("apply", "b"), ("remove", "a"), ("remove", "c")]
    assert sync.services == {"b"}


def test_sync_keeps_everything_when_the_stream_breaks_mid_snapshot():
    target = FakeTarget()
    run_sync([StreamOpened(), es("a"), es("b"), "wait",
              StreamOpened(), es("b"), StreamLost("down"), "wait"], target)
    assert ("remove", "a") not in target.calls


def test_sync_of_an_empty_master_removes_everything():
    target = FakeTarget()
    run_sync([StreamOpened(), es("a"), "wait", StreamLost("down"), StreamOpened(), "wait"], target)
    assert target.calls == [("apply", "a"), ("remove", "a")]


# ---- the whole Switch against a real (in-process) Master -------------------

CAP = model.Resources(4, 4096, 1000, 100_000)
# Guest addresses come from the cluster range: put it on loopback, so the
# "virtual nodes" are plain servers on 127.77.0.x and all traffic stays local.
LOOPBACK_CLUSTER = "127.77.0.0/16"


def start_master_on(state_dir, port):
    from soda.master.main import MasterServer
    os.makedirs(state_dir, exist_ok=True)
    server = MasterServer(master_config(state_dir, listen=f"127.0.0.1:{port}",
                                        cluster_cidr=LOOPBACK_CLUSTER))
    server.start()
    return server


async def request(port):
    async def once():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            return (await reader.read()).decode()
        finally:
            writer.close()
    try:
        return await asyncio.wait_for(once(), 5)
    except (ConnectionError, asyncio.TimeoutError):
        return ""


async def wait_for(predicate, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def serve_name(address, port, name):
    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(name.encode())
        await writer.drain()
        writer.close()
    return await asyncio.start_server(handle, address, port)


def test_switch_routes_a_masters_service_and_survives_the_master(tmp_path):
    master_port, listen_port, guest_port = free_port(), free_port(), free_port()
    master = start_master_on(str(tmp_path / "m1"), master_port)
    target = f"127.0.0.1:{master_port}"
    admin = master_client(target)
    try:
        admin.register_node("n0", "127.0.0.1", CAP, ["fake"])
        admin.push_image(make_ext4_image(str(tmp_path / "img")), name="img")
        svc = admin.create_service(model.parse_spec({
            "name": "web", "image": "img", "nodes": 2, "port": guest_port,
            "resources": {"cpu": [0.5, 1.0]}, "switch": {"listen": f"127.0.0.1:{listen_port}"}}))
        vnodes = sorted(svc.vnodes, key=lambda v: v.index)
        assert all(v.address.startswith("127.77.") for v in vnodes)
    except BaseException:
        admin.close()
        master.stop(grace=0)
        raise

    async def main():
        backends = [await serve_name(v.address, guest_port, v.name) for v in vnodes]
        switch = Switch(SwitchConfig(master=target, reconnect_max_seconds=0.5, drain_seconds=1),
                        master_client(target))
        await switch.start()
        nonlocal master
        try:
            await asyncio.wait_for(switch.sync.synced.wait(), TIMEOUT)
            # Listening, but nothing is RUNNING yet: clients are turned away.
            assert switch.proxy.services()["web"]["listening"]
            assert await request(listen_port) == ""
            await asyncio.to_thread(admin.report_status, "n0", [
                model.VirtualNodeStatus(v.name, model.Phase.RUNNING, generation=v.generation) for v in vnodes])
            await wait_for(lambda: _routes(switch, 2), "both virtual nodes to be routed")
            got = [await request(listen_port) for _ in range(60)]
            assert Counter(got) == {"web-0": 20, "web-1": 40}

            # The Master goes away: the Switch keeps serving what it knew.
            master.stop(grace=0)
            await asyncio.sleep(0.5)
            assert Counter([await request(listen_port) for _ in range(6)]) == {"web-0": 2, "web-1": 4}

            # It comes back without the service (deleted while we were cut off):
            # after the reconnect's snapshot settles, the listener is gone.
            master = start_master_on(str(tmp_path / "m2"), master_port)
            await wait_for(lambda: _gone(switch), "the resync to drop the stale service", timeout=20)
            with pytest.raises(ConnectionRefusedError):
                await asyncio.wait_for(asyncio.open_connection("127.0.0.1", listen_port), 5)
        finally:
            await asyncio.wait_for(switch.stop(), TIMEOUT)
            for b in backends:
                b.close()
    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        admin.close()
        master.stop(grace=0)


async def _routes(switch, n):
    info = switch.proxy.services().get("web")
    return info is not None and len(info["endpoints"]) == n


async def _gone(switch):
    return "web" not in switch.proxy.services()


def test_switch_follows_deletes_live(master, tmp_path):
    _, target = master
    admin = master_client(target)
    listen_port = free_port()
    admin.push_image(make_ext4_image(str(tmp_path / "img")), name="img")
    admin.create_service(model.parse_spec({"name": "web", "image": "img", "nodes": 0,
                                           "switch": {"listen": f"127.0.0.1:{listen_port}"}}))

    async def main():
        switch = Switch(SwitchConfig(master=target, drain_seconds=0), master_client(target))
        await switch.start()
        try:
            await wait_for(lambda: _listening(switch), "the listener")
            await asyncio.to_thread(admin.delete_service, "web")
            await wait_for(lambda: _gone(switch), "the delete to close the listener")
            with pytest.raises(ConnectionRefusedError):
                await asyncio.wait_for(asyncio.open_connection("127.0.0.1", listen_port), 5)
        finally:
            await asyncio.wait_for(switch.stop(), TIMEOUT)
    try:
        asyncio.run(asyncio.wait_for(main(), 40))
    finally:
        admin.close()


async def _listening(switch):
    info = switch.proxy.services().get("web")
    return info is not None and info["listening"]
