"""SODA's error types.

Every failure a user can cause or meet is one of these; `soda.rpc.errors`
maps them to gRPC status codes in one place, and `sodactl` prints their
message (never a traceback). This module must not import grpc.
"""


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
