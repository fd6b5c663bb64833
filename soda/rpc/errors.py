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
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
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
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.TemporaryError,
}


def status_code(exc: errors.SodaError) -> grpc.StatusCode:
    for cls, code in _TO_CODE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def from_code_name(name: str, message: str) -> errors.SodaError:
    """The SodaError for an error relayed in a message as its status code's
    name (status_code(exc).name), e.g. an Agent's answer to a log order."""
    code = grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)
    return _FROM_CODE.get(code, errors.SodaError)(message)


# What gRPC says when a TLS handshake failed: this client could not verify
# the server, or the server closed the connection during the handshake,
# which is how a Master refuses a client certificate (none, another CA,
# expired). Only the first is sure to be about certificates.
_HANDSHAKE_FAILED = "handshake failed"
_CLOSED_IN_HANDSHAKE = "socket closed"


def from_rpc_error(exc: grpc.RpcError, target: str = "", peer: str = "SODA Master",
                   secure: bool = False) -> errors.SodaError:
    """The SodaError for a failed call to `peer` at `target`; `secure`:
    the call went over TLS (its failures get a hint about certificates)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        where = f" at {target}" if target else ""
        lowered = (detail or "").lower()
        if _HANDSHAKE_FAILED in lowered:
            return errors.Unauthenticated(
                f"the {peer}{where} did not prove itself: its certificate is not one of this "
                f"cluster's CA for the address dialled, or it expects no TLS ({detail})")
        if _CLOSED_IN_HANDSHAKE in lowered:
            # Retried like any outage (an Agent waits it out), but named.
            likely = ("does not take this client's certificate (another CA, expired) or serves plaintext"
                      if secure else "serves TLS: give the CA, a certificate and its key "
                      "(--ca/--cert/--key or SODA_CA/SODA_CERT/SODA_KEY)")
            return errors.Unavailable(f"cannot reach the {peer}{where}: it closed the connection; if "
                                      f"this persists, it {likely}")
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
