"""A minimal QMP (QEMU Machine Protocol) client for the QEMU driver.

Owns the wire protocol only: connect to a VMM's `-qmp unix:` socket, read
the greeting, negotiate capabilities (`qmp_capabilities`), send one command
and return its `return` value, skipping asynchronous events. A QMP server
serves one client at a time, so each call is one short connection.

It knows nothing about guests, records or processes (soda.hypervisors.qemu).
"""

from __future__ import annotations

import errno
import json
import socket
import time
from typing import Any

QMP_TIMEOUT = 2.0
MAX_REPLY = 1 << 20


class QmpError(OSError):
    """QEMU answered a command with an error (class and description)."""

    def __init__(self, command: str, error_class: str, desc: str):
        super().__init__(errno.EPROTO, f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class _Conn:
    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline
        self.buf = b""

    def message(self) -> dict:
        while b"\n" not in self.buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(errno.ETIMEDOUT, "QMP: no answer in time")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError(errno.ECONNRESET, "QMP: connection closed by QEMU")
            self.buf += chunk
            if len(self.buf) > MAX_REPLY:
                raise OSError(errno.EMSGSIZE, "QMP: reply too large")
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise OSError(errno.EPROTO, f"QMP: not JSON: {line[:80]!r}") from None
        if not isinstance(msg, dict):
            raise OSError(errno.EPROTO, f"QMP: unexpected message {line[:80]!r}")
        return msg

    def execute(self, command: str, arguments: dict | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            msg = self.message()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                err = msg["error"] or {}
                raise QmpError(command, err.get("class", "?"), err.get("desc", ""))
            # {"event": ...}: asynchronous, not our answer.


def qmp(path: str, command: str, arguments: dict | None = None,
        timeout: float = QMP_TIMEOUT) -> Any:
    """Run one QMP command on the socket at `path`; its `return` value.
    Raises OSError (QmpError for an error answer, TimeoutError, or the
    connect's own error) when QEMU cannot be asked."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        conn = _Conn(sock, deadline)
        greeting = conn.message()
        if "QMP" not in greeting:
            raise OSError(errno.EPROTO, f"QMP: unexpected greeting {str(greeting)[:80]}")
        conn.execute("qmp_capabilities")
        return conn.execute(command, arguments)
    except socket.timeout:
        raise TimeoutError(errno.ETIMEDOUT, f"QMP {command}: no answer within {timeout:g}s") \
            from None
    finally:
        sock.close()
