"""SodaError <-> gRPC status, the one mapping in the project.

Servers wrap every handler with `handle_errors`; clients turn a failed call
back into a SodaError with `from_rpc_error`.
"""

from __future__ import annotations

import functools
import inspect
import logging

import grpc

from soda import errors

log = logging.getLogger(__name__)

_TO_CODE: list[tuple[type[errors.SodaError], grpc.StatusCode]] = [
    (errors.InvalidSpec, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.WrongState, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Conflict, grpc.StatusCode.ABORTED),
    (errors.NoCapacity, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.TemporaryError, grpc.StatusCode.UNAVAILABLE),
    (errors.CommandError, grpc.StatusCode.INTERNAL),
]

_FROM_CODE: dict[grpc.StatusCode, type[errors.SodaError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidSpec,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidSpec,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.WrongState,
    grpc.StatusCode.ABORTED: errors.Conflict,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.NoCapacity,
    grpc.StatusCode.DATA_LOSS: errors.DataLoss,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.TemporaryError,
}


def status_code(exc: errors.SodaError) -> grpc.StatusCode:
    for cls, code in _TO_CODE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def from_rpc_error(exc: grpc.RpcError, target: str = "", peer: str = "SODA Master") -> errors.SodaError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        where = f" at {target}" if target else ""
        return errors.Unavailable(f"cannot reach the {peer}{where}: {detail or 'unavailable'}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return errors.TemporaryError(f"the {peer} did not answer in time{f' ({target})' if target else ''}")
    cls = _FROM_CODE.get(code, errors.SodaError)
    return cls(detail or code.name.lower())


def _abort(context, exc: errors.SodaError):
    context.abort(status_code(exc), exc.message)


def handle_errors(method):
    """Decorate a servicer method (unary or streaming) so that a SodaError
    becomes its gRPC status and anything else becomes INTERNAL, logged once
    with its traceback here and never shown to the client."""

    def unexpected(context, exc):
        log.exception("internal error in %s", method.__name__)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method.__name__}: "
                      f"{type(exc).__name__} (see the server's log)")

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except errors.SodaError as exc:
                _abort(context, exc)
            except Exception as exc:  # noqa: BLE001 - the one place that converts
                if context.is_active() is False and isinstance(exc, grpc.RpcError):
                    return
                unexpected(context, exc)
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except errors.SodaError as exc:
            _abort(context, exc)
        except Exception as exc:  # noqa: BLE001
            unexpected(context, exc)
    return unary
