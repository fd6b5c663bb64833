"""soda.rpc.streams.StreamLimit on a real in-process gRPC server: streams
beyond the limit are refused at once with RESOURCE_EXHAUSTED naming the
setting, single calls are still answered while streams hold every slot,
and a slot is free again when its stream ends."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

from soda.rpc.streams import StreamLimit, reserve_for

SERVICE = "test.Held"
WORKERS = 10


@pytest.fixture
def server():
    release = threading.Event()
    started = threading.Semaphore(0)

    def hold(request, context):
        started.release()
        yield b"started"
        release.wait(10)
        yield b"done"

    def ping(request, context):
        return b"pong"

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Hold": grpc.unary_stream_rpc_method_handler(hold),
        "Ping": grpc.unary_unary_rpc_method_handler(ping),
    })
    limit = StreamLimit(WORKERS)
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS), interceptors=[limit])
    srv.add_generic_rpc_handlers((handler,))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, limit, release, started
    finally:
        release.set()
        channel.close()
        srv.stop(None)


def test_reserve_sizes():
    assert reserve_for(10) == 8 and reserve_for(2048) == 256 and reserve_for(1) == 0


def test_streams_beyond_the_limit_are_refused_and_single_calls_still_served(server):
    channel, limit, release, started = server
    hold = channel.unary_stream(f"/{SERVICE}/Hold")
    ping = channel.unary_unary(f"/{SERVICE}/Ping")
    assert limit.limit == 2
    held = [hold(b"") for _ in range(limit.limit)]
    for stream in held:
        assert next(stream) == b"started"
    assert limit.open == 2
    with pytest.raises(grpc.RpcError) as refused:
        next(hold(b""))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "raise max_workers" in refused.value.details()
    # Single calls get the reserved threads.
    assert [ping(b"", timeout=5) for _ in range(5)] == [b"pong"] * 5
    release.set()
    for stream in held:
        assert list(stream) == [b"done"]
    # The slots are free again.
    again = hold(b"")
    assert next(again) == b"started" and list(again) == [b"done"]


def test_a_cancelled_stream_gives_its_slot_back(server):
    channel, limit, release, started = server
    hold = channel.unary_stream(f"/{SERVICE}/Hold")
    stream = hold(b"")
    assert next(stream) == b"started"
    stream.cancel()
    release.set()
    deadline = threading.Event()
    for _ in range(100):
        if limit.open == 0:
            break
        deadline.wait(0.05)
    assert limit.open == 0
