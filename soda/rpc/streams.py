"""Worker threads of a gRPC server, kept for the calls that must get one.

A sync gRPC server runs every call on a thread of a fixed pool, and a
streaming call holds its thread for as long as it lasts. Every Agent holds
two streams on the Master (its assignments and its log orders) and every
Switch its watches, so a pool that streams fill up serves nothing else:
no heartbeat, no registration, no `sodactl` call is answered again, and
every node is soon taken for LOST (seen with 500 Agents on a pool of 756).

`StreamLimit` admits at most `workers - reserve` streaming calls at once,
so the last `reserve` threads stay free for single calls; one stream more
is refused at once with RESOURCE_EXHAUSTED naming the setting to raise
(an Agent or Switch retries its watch with backoff meanwhile).

`HANDLER_KINDS` is the one table of gRPC's four handler kinds that the
interceptors wrapping handlers use.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

from soda.errors import NoCapacity
from soda.rpc.errors import status_code

log = logging.getLogger(__name__)

# (request streaming, response streaming) -> (the handler's attribute, its factory)
HANDLER_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}

# A refusal is logged at most this often: a fleet retrying its watches
# must not flood the log.
LOG_EVERY_SECONDS = 10.0


def reserve_for(workers: int) -> int:
    """The threads kept for single calls out of `workers`."""
    return min(max(8, workers // 8), max(workers - 1, 0))


class StreamLimit(grpc.ServerInterceptor):
    def __init__(self, workers: int):
        self.workers = workers
        self.reserve = reserve_for(workers)
        self.limit = max(1, workers - self.reserve)
        self._lock = threading.Lock()
        self._open = 0
        self._refused = 0
        self._logged = 0.0

    @property
    def open(self) -> int:
        """Streaming calls running now."""
        return self._open

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        attribute, make = HANDLER_KINDS[handler.request_streaming, handler.response_streaming]
        inner = getattr(handler, attribute)
        method = details.method
        if handler.response_streaming:
            # Taken and given back inside the generator: a stream cancelled
            # before it starts took nothing.
            def behaviour(request, context):
                self._take(context, method)
                try:
                    yield from inner(request, context)
                finally:
                    self._give()
        else:
            def behaviour(requests, context):
                self._take(context, method)
                try:
                    return inner(requests, context)
                finally:
                    self._give()
        return make(behaviour, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    def _take(self, context, method: str) -> None:
        with self._lock:
            if self._open < self.limit:
                self._open += 1
                return
        exc = NoCapacity(f"this server already serves {self.limit} streams, all its {self.workers} "
                         f"worker threads but the {self.reserve} kept for single calls: raise "
                         f"max_workers in its config", resource="streams")
        with self._lock:
            self._refused += 1
            now = time.monotonic()
            due = now - self._logged >= LOG_EVERY_SECONDS
            if due:
                self._logged, refused, self._refused = now, self._refused, 0
        if due:
            log.warning("%s refused: %s (%d refused since the last warning)", method.rsplit("/", 1)[-1],
                        exc.message, refused)
        context.abort(status_code(exc), exc.message)

    def _give(self) -> None:
        with self._lock:
            self._open -= 1
