"""The Daemon over real gRPC on a temporary Unix socket, with a fake kernel."""

import os
import shutil
import socket
import tempfile

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from soda import errors
from soda.daemon.config import DaemonConfig
from soda.daemon.limits import LimitManager
from soda.daemon.main import DaemonServer, claim_socket_path
from soda.daemon.plan import MIB
from soda.daemon.tc import ifb_name
from soda.model.spec import Resources
from soda.proto.v1 import daemon_pb2 as pb
from soda.rpc import convert
from soda.rpc.daemon_client import DaemonClient

from tests.unit.test_daemon_limits import FakeKernelCgroups, FakeShaper


@pytest.fixture
def short_dir():
    # A Unix socket path must fit in 107 bytes; pytest's tmp_path may not.
    d = tempfile.mkdtemp(prefix="soda-dt-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(tmp_path, short_dir):
    cgroups = FakeKernelCgroups(tmp_path / "cg")
    shaper = FakeShaper()
    cfg = DaemonConfig(socket=os.path.join(short_dir, "daemon.sock"))
    server = DaemonServer(cfg, LimitManager(cgroups, shaper, cfg))
    server.start()
    yield server, cgroups, shaper
    server.stop(grace=0)


@pytest.fixture
def client(daemon):
    c = DaemonClient(daemon[0].socket_path)
    yield c
    c.close()


WEB = Resources(cpu=0.5, memory=64, bandwidth=10, disk=256)


def test_apply_returns_cgroup_dirs_and_limits(daemon, client):
    _, cgroups, shaper = daemon
    fence = client.apply_limits("web-0", WEB, "uml", 32, tap="tap-web0", cpu_cap=True)
    assert fence.name == "web-0"
    assert fence.cgroups == cgroups.paths("web-0")
    assert fence.cgroup_version == "v1"
    assert (fence.tap, fence.ifb) == ("tap-web0", ifb_name("soda", "web-0"))
    lim = fence.limits
    assert (lim.cpu_shares, lim.cpu_quota_us, lim.cpu_period_us) == (512, 50_000, 100_000)
    assert (lim.memory_bytes, lim.pids_max, lim.rate_bit) == (96 * MIB, 512, 10_000_000)
    assert lim.burst_bytes > 0


def test_the_memory_limit_adds_the_overhead_the_agents_driver_declares(daemon, client):
    # WEB has 64 MiB: the limit adds exactly what the driver declared,
    # whatever the driver's name (the Daemon knows no hypervisor).
    assert client.apply_limits("web-0", WEB, "uml", 32).limits.memory_bytes == 96 * MIB
    assert client.apply_limits("web-0", WEB, "uml", 10).limits.memory_bytes == 74 * MIB
    assert client.apply_limits("web-0", WEB, "uml", 0).limits.memory_bytes == 64 * MIB
    assert client.apply_limits("web-0", WEB, "xen", 7).limits.memory_bytes == 71 * MIB
    with pytest.raises(errors.InvalidSpec, match="memory overhead"):
        client.apply_limits("web-0", WEB, "uml", -1)
    # A request that does not say is refused, not given a guessed headroom.
    request = pb.ApplyLimitsRequest(name="web-0", resources=convert.resources_to_pb(WEB),
                                    hypervisor="uml")
    with pytest.raises(errors.InvalidSpec, match="memory_overhead_mib is required"):
        client._call("ApplyLimits", request)


def test_live_change_list_usage_release(daemon, client):
    _, cgroups, shaper = daemon
    client.apply_limits("web-0", WEB, "uml", 32, tap="tap-web0")
    client.apply_limits("web-1", Resources(cpu=1, memory=32), "fake", 0)
    changed = client.apply_limits("web-0", Resources(cpu=2, memory=64, bandwidth=20), "uml", 32,
                                  tap="tap-web0")
    assert changed.limits.cpu_shares == 2048 and changed.limits.rate_bit == 20_000_000
    listed = {f.name: f for f in client.list()}
    assert sorted(listed) == ["web-0", "web-1"]
    assert listed["web-0"] == changed
    assert listed["web-1"].tap == "" and listed["web-1"].limits.memory_bytes == 32 * MIB

    usage = client.usage("web-0")
    assert usage.name == "web-0"
    assert usage.memory_limit_bytes == 96 * MIB
    assert (usage.bytes_to_guest, usage.bytes_from_guest) == (100, 200)

    cgroups.add_pid("web-0", 777)
    done = client.release_limits("web-0")
    assert (done.name, done.existed, done.killed) == ("web-0", True, 1)
    assert [f.name for f in client.list()] == ["web-1"]
    assert client.release_limits("web-0").existed is False


@pytest.mark.parametrize("call, exc", [
    (lambda c: c.apply_limits("Bad_Name", WEB, "uml", 32), errors.InvalidSpec),
    (lambda c: c.apply_limits("web-0", WEB, "Bad Name", 32), errors.InvalidSpec),
    (lambda c: c.apply_limits("web-0", Resources(cpu=1, memory=0), "uml", 32), errors.InvalidSpec),
    (lambda c: c.apply_limits("web-0", WEB, "uml", 32, tap="tap-missing"), errors.NotFound),
    (lambda c: c.usage("web-9"), errors.NotFound),
    (lambda c: c.release_limits("../etc"), errors.InvalidSpec),
    (lambda c: c.freeze("web-9", True), errors.NotFound),
])
def test_errors_arrive_as_soda_errors(client, call, exc):
    with pytest.raises(exc) as info:
        call(client)
    assert info.value.message


def test_freeze_and_thaw_through_the_freezer_and_a_clear_refusal_without_one(tmp_path, short_dir):
    for freezer in (True, False):
        cgroups = FakeKernelCgroups(tmp_path / f"cg-{freezer}", freezer=freezer)
        cfg = DaemonConfig(socket=os.path.join(short_dir, f"d{int(freezer)}.sock"))
        server = DaemonServer(cfg, LimitManager(cgroups, FakeShaper(), cfg))
        server.start()
        client = DaemonClient(server.socket_path)
        try:
            client.apply_limits("web-0", WEB, "uml", 32, tap="tap-web0")
            if freezer:
                assert client.freeze("web-0", True).frozen
                assert [f.frozen for f in client.list()] == [True]
                assert not client.freeze("web-0", False).frozen
            else:
                with pytest.raises(errors.WrongState, match="no freezer"):
                    client.freeze("web-0", True)
        finally:
            client.close()
            server.stop(grace=0)


def test_unexpected_errors_are_internal_without_traceback(daemon, client, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("secret detail")
    monkeypatch.setattr(daemon[0].manager, "list", boom)
    with pytest.raises(errors.SodaError) as info:
        client.list()
    assert "secret detail" not in info.value.message


def test_health_service_serves(daemon):
    with grpc.insecure_channel(daemon[0].target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "soda.proto.v1.Daemon"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_socket_is_private_and_removed_on_stop(tmp_path, short_dir):
    path = os.path.join(short_dir, "sub", "d.sock")
    cfg = DaemonConfig(socket=path)
    shaper = FakeShaper()
    server = DaemonServer(cfg, LimitManager(FakeKernelCgroups(tmp_path / "cg"), shaper, cfg))
    server.start()
    assert os.stat(path).st_mode & 0o777 == 0o600
    server.stop(grace=0)
    assert not os.path.exists(path)
    assert shaper.closed


def test_second_daemon_on_the_same_socket_is_refused(daemon, tmp_path):
    cfg = DaemonConfig(socket=daemon[0].socket_path)
    with pytest.raises(errors.WrongState, match="another process is serving"):
        DaemonServer(cfg, LimitManager(FakeKernelCgroups(tmp_path / "cg2"), FakeShaper(), cfg))


def test_stale_socket_is_replaced(short_dir):
    path = os.path.join(short_dir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()                            # the file stays, nobody listens
    claim_socket_path(path)
    assert not os.path.exists(path)


def test_non_socket_in_the_way_is_refused(short_dir):
    path = os.path.join(short_dir, "file")
    open(path, "w").close()
    with pytest.raises(errors.WrongState, match="not a socket"):
        claim_socket_path(path)


def test_socket_path_too_long_is_invalid():
    with pytest.raises(errors.InvalidSpec, match="socket path"):
        claim_socket_path("/tmp/" + "x" * 200)


def test_client_without_daemon_is_unavailable(short_dir):
    with DaemonClient(os.path.join(short_dir, "nobody.sock"), timeout=2) as c:
        with pytest.raises(errors.Unavailable, match="SODA Daemon"):
            c.list()
        with pytest.raises(errors.Unavailable, match="not serving"):
            c.wait_ready(timeout=0.2)


def test_client_accepts_unix_prefix_and_waits_ready(daemon):
    with DaemonClient(daemon[0].target) as c:
        c.wait_ready(timeout=5)
        assert c.list() == []
