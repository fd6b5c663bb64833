"""HOST:PORT addresses: the one parser and the one formatter every part
uses for listen, metrics and peer addresses. IPv6 hosts are written in
brackets ("[::1]:8080"); the host comes back without them.

Owns only the syntax: whether a host may be listened on, or is free, is
the caller's business."""

from __future__ import annotations

from typing import Any

from soda.errors import InvalidSpec


def split_host_port(address: Any, what: str = "listen address") -> tuple[str, int]:
    """"HOST:PORT" -> (host, port), with a host and a port from 1 to 65535;
    raises InvalidSpec naming `what` otherwise."""
    if not isinstance(address, str) or ":" not in address:
        raise InvalidSpec(f"{what} {address!r}: expected HOST:PORT")
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise InvalidSpec(f"{what} {address!r}: expected HOST:PORT, the host is missing")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidSpec(f"{what} {address!r}: expected HOST:PORT with a port from 1 to 65535")
    return host, int(port)


def host_of(address: str) -> str:
    """The host of "HOST:PORT" without brackets, the port not checked (a
    listen address may say port 0: any free one)."""
    host = address.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def join_host_port(host: str, port: int) -> str:
    """(host, port) -> "HOST:PORT", an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
