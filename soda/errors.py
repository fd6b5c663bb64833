"""SODA's error types.

Every failure a user can cause or meet is one of these; `soda.rpc.errors`
maps them to gRPC status codes in one place, and `sodactl` prints their
message (never a traceback). A kernel refusal (an errno, from a syscall or
from netlink) becomes one of them in one place too, `from_errno`. This
module must not import grpc.
"""

import errno as _errno


class SodaError(Exception):
    """Base of every error SODA raises on purpose."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidSpec(SodaError):
    """The request is malformed: bad name, bad resource, unknown field."""


class NotFound(SodaError):
    """A named service, node, image or virtual node does not exist."""


class AlreadyExists(SodaError):
    """Something with that name already exists."""


class WrongState(SodaError):
    """The object exists but cannot do that now (e.g. delete an image in use)."""


class Conflict(SodaError):
    """A change was based on a record that has changed since it was read
    (a stale revision): nothing was written; read again and retry."""


class NoCapacity(SodaError):
    """The platform has no room: names the resource that is short."""

    def __init__(self, message: str, resource: str = ""):
        super().__init__(message)
        self.resource = resource


class QuotaExceeded(NoCapacity):
    """A tenant's quota has no room for the request: names the quota."""


class PermissionDenied(SodaError):
    """The caller is who it says it is, but may not do this: names the
    identity and the action."""


class Unauthenticated(SodaError):
    """The caller did not prove who it is: no certificate, one from another
    CA, expired or revoked."""


class TemporaryError(SodaError):
    """Try again later: a peer is down or busy."""


class Unavailable(TemporaryError):
    """The Master (or another peer) cannot be reached."""


class DataLoss(SodaError):
    """Content did not arrive intact: digest mismatch, truncated upload."""


class CommandError(SodaError):
    """An external command failed."""

    def __init__(self, cmd, rc, out="", err=""):
        self.cmd = list(cmd)
        self.rc = rc
        self.out = out
        self.err = err
        tail = (err or out or "").strip().splitlines()
        detail = f": {tail[-1]}" if tail else ""
        super().__init__(f"command {self.cmd[0] if self.cmd else '?'} exited {rc}{detail}")


# Which SodaError a kernel refusal is, by errno (never by its message): what
# names a missing thing, a value the kernel will not take, a clash, a state
# that forbids it now, or a shortage that may pass.
_BY_ERRNO: dict[int, type[SodaError]] = {
    _errno.ENOENT: NotFound, _errno.ENODEV: NotFound,
    _errno.EINVAL: InvalidSpec, _errno.ERANGE: InvalidSpec,
    _errno.EEXIST: AlreadyExists,
    _errno.EPERM: WrongState, _errno.EACCES: WrongState, _errno.EBUSY: WrongState,
    _errno.EROFS: WrongState, _errno.ENOSPC: WrongState, _errno.EOPNOTSUPP: WrongState,
    _errno.EAGAIN: TemporaryError, _errno.ENOMEM: TemporaryError, _errno.ENOBUFS: TemporaryError,
    _errno.EINTR: TemporaryError,
}


def from_errno(code: int | None, detail: str) -> SodaError:
    """The SodaError for a kernel refusal with errno `code`; a plain
    SodaError for one no caller could act on differently."""
    return _BY_ERRNO.get(code, SodaError)(detail) if code is not None else SodaError(detail)
