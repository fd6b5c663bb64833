"""Deploy on first request: the Master's idempotent EnsureNodes / ReleaseNodes
over real gRPC, and the Switch's hold / single-flight / back-to-zero logic
with a real Proxy on loopback, real backends and a fake Master client."""

import asyncio
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from soda import model
from soda.errors import InvalidSpec, NoCapacity, Unavailable, WrongState
from soda.switch import ondemand
from soda.switch.proxy import Proxy
from tests.support import free_port, master_client
from tests.unit.test_switch_proxy import Backend, run  # noqa: F401 - `run` is a fixture

CAP = model.Resources(2, 4096, 1000, 100_000)


# ---- the Master ------------------------------------------------------------

@pytest.fixture
def client(master, image_file):
    c = master_client(master[1])
    for i in range(2):
        c.register_node(f"n{i}", f"127.0.0.{i + 1}", CAP, ["fake"])
    c.push_image(image_file, name="busybox")
    yield c
    c.close()


def od_spec(name="od", nodes=0, max_nodes=2, **extra):
    return model.parse_spec({"name": name, "image": "busybox", "nodes": nodes,
                             "resources": {"cpu": 0.5, "memory": 64},
                             "on_demand": {"max_nodes": max_nodes, "idle_seconds": 5,
                                           "resources": {"cpu": 0.25, "memory": 96}}, **extra})


def live(service):
    return sorted(v.name for v in service.vnodes if not v.deleting)


def test_ensure_is_idempotent_and_uses_the_template(client):
    client.create_service(od_spec())
    assert live(client.get_service("od")) == []
    first = client.ensure_nodes("od")
    assert live(first) == ["od-0"]
    [v] = first.vnodes
    assert (v.resources.cpu, v.resources.memory) == (0.25, 96) and v.node
    again = client.ensure_nodes("od")
    assert live(again) == ["od-0"] and again.vnodes[0].node == v.node
    assert client.get_service("od").spec.nodes == 1


def test_concurrent_ensures_give_one_node(client):
    client.create_service(od_spec())
    barrier = threading.Barrier(10)
    results, failures = [], []

    def ask():
        barrier.wait()
        try:
            results.append(live(client.ensure_nodes("od")))
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
    threads = [threading.Thread(target=ask) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert failures == [] and results == [["od-0"]] * 10
    assert live(client.get_service("od")) == ["od-0"]
    assert sum(n.vnodes for n in client.list_nodes()) == 1


def test_ensure_never_goes_above_max_nodes_and_refuses_plain_services(client):
    client.create_service(od_spec(max_nodes=2))
    assert live(client.ensure_nodes("od", at_least=2)) == ["od-0", "od-1"]
    with pytest.raises(InvalidSpec, match="max_nodes"):
        client.ensure_nodes("od", at_least=3)
    with pytest.raises(InvalidSpec):         # a resize is held to max_nodes too
        client.resize_service("od", nodes=3)
    client.create_service(model.parse_spec({"name": "plain", "image": "busybox", "nodes": 0}))
    for call in (client.ensure_nodes, client.release_nodes):
        with pytest.raises(WrongState, match="no on_demand"):
            call("plain")
    with pytest.raises(Exception) as exc:
        client.ensure_nodes("ghost")
    assert type(exc.value).__name__ == "NotFound"


def test_release_goes_to_zero_and_a_new_ensure_gets_a_fresh_node(client):
    client.create_service(od_spec())
    client.ensure_nodes("od")
    released = client.release_nodes("od")
    assert live(released) == [] and [v.deleting for v in released.vnodes] == [True]
    assert released.spec.nodes == 0
    assert live(client.release_nodes("od")) == []            # idempotent
    # The old node is still stopping: the new one must not wait for it.
    fresh = client.ensure_nodes("od")
    assert live(fresh) == ["od-1"]
    endpoints = next(client.watch_endpoints("od"))
    assert [e.vnode for e in endpoints.endpoints] == ["od-1"]


def test_resize_from_zero_uses_the_on_demand_template(client):
    client.create_service(od_spec())
    [v] = client.resize_service("od", nodes=1).vnodes
    assert (v.resources.cpu, v.resources.memory) == (0.25, 96)


def test_no_room_for_the_template_is_no_capacity_and_leaves_nothing(client):
    spec = model.parse_spec({"name": "big", "image": "busybox", "nodes": 0,
                             "on_demand": {"max_nodes": 1, "resources": {"cpu": 64}}})
    client.create_service(spec)
    with pytest.raises(NoCapacity):
        client.ensure_nodes("big")
    assert client.get_service("big").vnodes == () and client.get_service("big").spec.nodes == 0


# ---- the Switch ------------------------------------------------------------

class FakeMaster:
    """ensure_nodes publishes (after `boot` seconds) a ready endpoint at the
    backend, as the Master does once a guest runs; release_nodes publishes
    none. Called from worker threads, like MasterClient."""

    def __init__(self, loop, switch_spec, backend, boot=0.2, release_delay=0.0):
        self.loop, self.switch_spec, self.backend = loop, switch_spec, backend
        self.boot, self.release_delay = boot, release_delay
        self.target = None
        self.ensures = 0
        self.releases = 0
        self.refuse: Exception | None = None
        self.unreachable = 0            # first calls that fail as if the Master were down
        self.generation = 0
        self.on_demand = model.OnDemand(max_nodes=1, idle_seconds=0.3, resources=model.Resources(0.5, 64))
        self.lock = threading.Lock()
        self.pool = False               # idle: one frozen endpoint (a warm pool), not none

    def endpoint_set(self, ready):
        eps = ((model.Endpoint(f"svc-{self.generation}", "127.0.0.1", self.backend.port, 1.0, True),)
               if ready else ())
        if not ready and self.pool:
            eps = (model.Endpoint(f"svc-{self.generation}", "127.0.0.1", self.backend.port, 1.0, False,
                                  frozen=True),)
        return model.EndpointSet("svc", switch=self.switch_spec, endpoints=eps, on_demand=self.on_demand)

    def ensure_nodes(self, name):
        with self.lock:
            if self.unreachable:
                self.unreachable -= 1
                raise Unavailable("cannot reach the SODA Master")
            if self.refuse:
                raise self.refuse
            self.ensures += 1
            self.generation += 1
        self.loop.call_soon_threadsafe(self.loop.create_task, self._publish(True, self.boot))
        return SimpleNamespace(vnodes=(SimpleNamespace(name=f"svc-{self.generation}", deleting=False),))

    def release_nodes(self, name):
        time.sleep(self.release_delay)
        with self.lock:
            self.releases += 1
        self.loop.call_soon_threadsafe(self.loop.create_task, self._publish(False, 0))
        return SimpleNamespace(vnodes=())

    async def _publish(self, ready, after):
        await asyncio.sleep(after)
        await self.target.apply(self.endpoint_set(ready))


async def setup_switch(hold_seconds=5.0, boot=0.2, release_delay=0.0, mode="proxy"):
    backend = await Backend("svc-backend").start()
    port = free_port()
    switch_spec = model.SwitchSpec(listen=f"127.0.0.1:{port}", mode=mode)
    fake = FakeMaster(asyncio.get_running_loop(), switch_spec, backend, boot, release_delay)
    proxy = Proxy()
    od = ondemand.attach(proxy, fake, hold_seconds=hold_seconds)
    fake.target = od
    await od.apply(fake.endpoint_set(False))        # the service rests at zero
    return SimpleNamespace(proxy=proxy, od=od, fake=fake, backend=backend, port=port)


async def request(port, timeout=10.0):
    """One HTTP-ish request; returns (answer, seconds); b"" when refused."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:        # closed with our request unread: refused
        answer = b""
    finally:
        writer.close()
    return answer, time.monotonic() - started


def test_ten_first_connections_are_held_and_start_one_node(run):
    async def scenario():
        s = await setup_switch(boot=0.3)
        results = await asyncio.gather(*(request(s.port) for _ in range(10)))
        assert all(answer.endswith(b"svc-backend") for answer, _ in results), results
        assert s.fake.ensures == 1 and s.od.asked == 1
        # Held about as long as the node took to boot, not the hold timeout.
        assert all(0.25 <= seconds < 3.0 for _, seconds in results), results
        # Warm: straight through, no new ask.
        answer, _ = await request(s.port)
        assert answer.endswith(b"svc-backend") and s.fake.ensures == 1
        await s.od.stop()
        await s.proxy.close(0)
    run(scenario())


def test_idle_service_goes_back_to_zero_and_comes_back(run):
    async def scenario():
        s = await setup_switch(boot=0.1)
        s.od.start()
        await request(s.port)
        deadline = time.monotonic() + 5
        while s.fake.releases == 0:
            assert time.monotonic() < deadline, "no release after idle_seconds"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        assert s.proxy.services()["svc"]["endpoints"] == []
        answer, _ = await request(s.port)             # the next client brings it back
        assert answer.endswith(b"svc-backend") and s.fake.ensures == 2
        await s.od.stop()
        await s.proxy.close(0)
    run(scenario())


def test_a_warm_pools_frozen_endpoint_is_idle_already_and_is_not_released_again(run):
    async def scenario():
        s = await setup_switch(boot=0.05)
        s.fake.pool = True
        await s.od.apply(s.fake.endpoint_set(False))          # rests with its pool
        s.od.start()
        await asyncio.sleep(1.0)                               # > 2 idle_seconds
        assert s.fake.releases == 0, "a frozen pool was sent back to idle"
        answer, _ = await request(s.port)                      # thawed for the client
        assert answer.endswith(b"svc-backend") and s.fake.ensures == 1
        deadline = time.monotonic() + 5
        while s.fake.releases == 0:
            assert time.monotonic() < deadline, "no release after idle_seconds"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert s.fake.releases == 1                            # frozen again: idle, left alone
        answer, _ = await request(s.port)
        assert answer.endswith(b"svc-backend") and s.fake.ensures == 2
        await s.od.stop()
        await s.proxy.close(0)
    run(scenario())


def test_an_open_connection_keeps_the_service_up(run):
    async def scenario():
        s = await setup_switch(boot=0.1)
        s.backend.mode = "hold"
        s.od.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        assert (await asyncio.wait_for(reader.readline(), 5)) == b"svc-backend\n"
        await asyncio.sleep(1.0)                      # > idle_seconds (0.3), connection open
        assert s.fake.releases == 0
        writer.close()
        deadline = time.monotonic() + 5
        while s.fake.releases == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await s.od.stop()
        await s.proxy.close(0)
    run(scenario())


def test_l4_service_is_deployed_on_demand_but_not_released_when_idle(run):
    async def scenario():
        s = await setup_switch(boot=0.1, mode="l4")
        s.od.start()
        answer, _ = await request(s.port)
        assert answer.endswith(b"svc-backend") and s.fake.ensures == 1
        await asyncio.sleep(1.0)          # > idle_seconds: the kernel may be forwarding connections
        assert s.fake.releases == 0
        await s.od.stop()
        await s.proxy.close(0)
    run(scenario())


def test_connection_racing_a_release_is_held_and_served(run):
    async def scenario():
        s = await setup_switch(boot=0.1, release_delay=0.5)
        await request(s.port)
        while s.proxy.services()["svc"]["connections"]:
            await asyncio.sleep(0.01)
        # The Switch decides to release; the Master takes 0.5 s to answer.
        s.od._states["svc"].last_used -= 10
        s.od.check_idle()
        assert s.od.services()["svc"]["releasing"]
        # A client arrives meanwhile: the old node still looks ready, but is going.
        answer, seconds = await request(s.port)
        assert answer.endswith(b"svc-backend")
        assert s.fake.releases == 1 and s.fake.ensures == 2 and seconds >= 0.4
        await s.od.stop()
        await s.proxy.close(0)
    run(scenario())


def test_refusal_closes_held_connections_at_once(run):
    async def scenario():
        s = await setup_switch(hold_seconds=10.0)
        s.fake.refuse = NoCapacity("not enough cpu", resource="cpu")
        results = await asyncio.gather(*(request(s.port) for _ in range(3)))
        assert all(answer == b"" and seconds < 3 for answer, seconds in results), results
        assert "not enough cpu" in s.od.services()["svc"]["error"]
        await s.proxy.close(0)
    run(scenario())


def test_a_bug_in_the_bring_up_does_not_leave_clients_hanging(run, caplog):
    async def scenario():
        s = await setup_switch(hold_seconds=10.0)
        s.fake.refuse = RuntimeError("boom")
        answer, seconds = await request(s.port)
        assert answer == b"" and seconds < 3
        await s.proxy.close(0)
    run(scenario())
    assert "on-demand task failed" in caplog.text


def test_unreachable_master_is_asked_again_within_the_hold(run):
    async def scenario():
        s = await setup_switch(boot=0.1)
        s.fake.unreachable = 2
        answer, _ = await request(s.port)
        assert answer.endswith(b"svc-backend") and s.fake.ensures == 1
        await s.proxy.close(0)
    run(scenario())


def test_hold_times_out_when_no_node_comes(run):
    async def scenario():
        s = await setup_switch(hold_seconds=0.5, boot=30)
        answer, seconds = await request(s.port)
        assert answer == b"" and 0.4 <= seconds < 3
        await s.od.stop()
        await s.proxy.close(0)
    run(scenario())


def test_node_that_is_ready_but_not_listening_yet_is_waited_for(run):
    async def scenario():
        s = await setup_switch(boot=0.0)
        # The endpoint says ready at once, but nothing listens there for 0.4 s.
        port = s.backend.port
        s.backend.server.close()
        await s.backend.server.wait_closed()

        async def listen_later():
            await asyncio.sleep(0.4)
            s.backend.server = await asyncio.start_server(s.backend._handle, "127.0.0.1", port)
        later = asyncio.create_task(listen_later())
        answer, seconds = await request(s.port)
        assert answer.endswith(b"svc-backend") and seconds >= 0.35
        await later
        await s.proxy.close(0)
    run(scenario())


def test_services_without_on_demand_pass_straight_through(run):
    async def scenario():
        backend = await Backend("plain").start()
        port = free_port()
        proxy = Proxy()
        master = SimpleNamespace(ensure_nodes=None, release_nodes=None)
        od = ondemand.attach(proxy, master)
        await od.apply(model.EndpointSet("plain", switch=model.SwitchSpec(listen=f"127.0.0.1:{port}"),
                                         endpoints=(model.Endpoint("p-0", "127.0.0.1", backend.port, 1, True),)))
        answer, _ = await request(port)
        assert answer.endswith(b"plain") and od.services() == {}
        # No endpoint and no on_demand: refused at once, not held.
        await od.apply(model.EndpointSet("plain", switch=model.SwitchSpec(listen=f"127.0.0.1:{port}")))
        answer, seconds = await request(port)
        assert answer == b"" and seconds < 1
        await od.remove("plain")
        with pytest.raises(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        await proxy.close(0)
    run(scenario())


# ---- sodactl ---------------------------------------------------------------

def test_sodactl_on_demand_flags_and_display():
    from tests.unit.test_sodactl import FakeClient
    from tests.unit.test_sodactl import run as ctl
    client = FakeClient()
    result = ctl(client, "service", "create", "od", "--image", "busybox-httpd", "--cpu", "0.5",
                 "--on-demand", "2", "--idle-seconds", "30", "--switch", "127.0.0.1:8080")
    assert result.exit_code == 0, result.output
    [(spec,), _] = client.called("create_service")[0]
    assert spec.nodes == 0 and spec.resources == ()
    assert (spec.on_demand.max_nodes, spec.on_demand.idle_seconds) == (2, 30)
    assert spec.on_demand.resources.cpu == 0.5         # the template comes from --cpu
    table = ctl(client, "service", "get", "od").stdout
    assert "On demand" in table and "up to 2 node(s)" in table and "after 30 s idle" in table
    as_json = ctl(client, "-o", "json", "service", "get", "od").stdout
    assert '"max_nodes": 2' in as_json
    # --idle-seconds alone is an error that says what is missing.
    bad = ctl(client, "service", "create", "x", "--image", "busybox-httpd", "--idle-seconds", "5")
    assert bad.exit_code != 0 and "max_nodes is required" in bad.output
    # --nodes still wins over the on-demand default of zero.
    ctl(client, "service", "create", "y", "--image", "busybox-httpd", "--nodes", "1", "--on-demand", "3")
    assert client.called("create_service")[-1][0][0].nodes == 1
