"""Images fetched by URL: the Master downloads an image (or a layer) over
HTTP(S) itself, as a stream of chunks for the image store to receive,
hash and check like a push.

It owns the download: the size the server announces (Content-Length; none
is refused, as the store must reserve room before the first byte), a stall
timeout per read, a deadline for the whole, and retries that resume where
the last attempt stopped (a Range request; a server that ignores it has the
bytes already taken skipped). What the server sends is never trusted: the
bytes past the announced size are never read, a resumed answer must be the
same resource (same total, the range asked for), and the store checks the
digest and the filesystem at the end.

A tenant may fetch only from public addresses: the Master must not become
a way into its own network (loopback, private, link-local and the like are
refused; the name is resolved once and that address is the one dialled).
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import re
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Iterator

from soda.errors import DataLoss, InvalidSpec, NotFound, PermissionDenied, Unavailable

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
STALL_SECONDS = 30.0          # defaults of MasterConfig.image_fetch_stall_seconds,
DEADLINE_SECONDS = 3600.0     # .image_fetch_timeout_seconds
ATTEMPTS = 5
_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)$")


@dataclass(frozen=True)
class FetchLimits:
    stall_seconds: float = STALL_SECONDS
    deadline_seconds: float = DEADLINE_SECONDS
    attempts: int = ATTEMPTS
    backoff_seconds: float = 0.5      # before the second attempt; doubles, at most 8 s


def check_url(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidSpec(f"image URL {url!r} must be http:// or https:// with a host")
    return parts


def _address(parts: urllib.parse.SplitResult, public_only: bool) -> str:
    """The address to dial for the URL's host; for a tenant a public one."""
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise Unavailable(f"cannot resolve the host of {parts.geturl()}: {exc.strerror}") from None
    address = infos[0][4][0]
    if public_only and not ipaddress.ip_address(address).is_global:
        raise PermissionDenied(f"a tenant's image URL must be on a public address; {parts.hostname} is "
                               f"{address} (an operator may fetch from it)")
    return address


class _Connection(http.client.HTTPConnection):
    """HTTP to a fixed address, whatever the host name says (no second lookup)."""

    def __init__(self, host: str, port: int | None, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _TlsConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int | None, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


class UrlDownload:
    """One image's download: `size` once opened, then its chunks."""

    def __init__(self, url: str, limits: FetchLimits = FetchLimits(), public_only: bool = False,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.url = url
        self._parts = check_url(url)
        self._limits = limits
        self._public_only = public_only
        self._clock = clock
        self._sleep = sleep
        self._deadline = clock() + limits.deadline_seconds
        self.size = 0
        self.resumed = 0              # attempts that resumed a cut download
        self._response: http.client.HTTPResponse | None = None
        self._connection: http.client.HTTPConnection | None = None

    def open(self) -> int:
        """Ask for the whole resource; its size (Content-Length)."""
        response = self._request(0)
        length = response.getheader("Content-Length")
        if length is None or not length.isdigit():
            self.close()
            raise InvalidSpec(f"{self.url} does not announce its size (no Content-Length): the Master "
                              f"must know it before it reserves room")
        self.size = int(length)
        self._response = response
        return self.size

    def _request(self, start: int) -> http.client.HTTPResponse:
        self.close()
        p = self._parts
        address = _address(p, self._public_only)
        kind = _TlsConnection if p.scheme == "https" else _Connection
        timeout = max(0.1, min(self._limits.stall_seconds, self._deadline - self._clock()))
        self._connection = kind(p.hostname, p.port, address, timeout)
        path = p.path or "/"
        if p.query:
            path += "?" + p.query
        headers = {"User-Agent": "soda-master", "Accept-Encoding": "identity"}
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            self._connection.request("GET", path, headers=headers)
            response = self._connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise Unavailable(f"cannot fetch {self.url}: {exc}") from None
        if response.status == 404:
            self.close()
            raise NotFound(f"{self.url} answered 404 Not Found; nothing was stored")
        if response.status not in (200, 206):
            self.close()
            raise Unavailable(f"{self.url} answered {response.status} {response.reason}; nothing was stored")
        return response

    def chunks(self) -> Iterator[bytes]:
        """The content, resuming after a cut or a stall, at most `attempts` tries."""
        done = 0
        attempt = 1
        backoff = self._limits.backoff_seconds
        response = self._response
        while done < self.size:
            try:
                if response is None:
                    response = self._resume(done)
                want = min(CHUNK_SIZE, self.size - done)
                chunk = response.read(want)
                if not chunk:
                    raise http.client.IncompleteRead(b"", self.size - done)
            except (OSError, http.client.HTTPException, Unavailable) as exc:
                if self._clock() >= self._deadline:
                    raise Unavailable(f"fetching {self.url} took longer than "
                                      f"{self._limits.deadline_seconds:g} s; nothing was stored") from None
                if attempt >= self._limits.attempts:
                    raise Unavailable(f"fetching {self.url} failed after {done} of {self.size} bytes "
                                      f"and {attempt} attempts ({_why(exc)}); nothing was stored") from None
                log.info("fetch of %s cut after %d of %d bytes (%s); resuming", self.url, done, self.size,
                         _why(exc))
                attempt += 1
                self._sleep(min(backoff, max(0.0, self._deadline - self._clock())))
                backoff = min(backoff * 2, 8.0)
                response = None
                continue
            done += len(chunk)
            yield chunk
        self.close()

    def _resume(self, done: int) -> http.client.HTTPResponse:
        response = self._request(done)
        self.resumed += 1
        if response.status == 206:
            match = _RANGE.match(response.getheader("Content-Range") or "")
            if not match or int(match.group(1)) != done or int(match.group(3)) != self.size:
                self.close()
                raise DataLoss(f"{self.url} answered a resumed request with range "
                               f"{response.getheader('Content-Range')!r}, not bytes {done}- of {self.size}; "
                               f"nothing was stored")
            return response
        # No ranges: the whole again; what was taken already is skipped.
        length = response.getheader("Content-Length")
        if length != str(self.size):
            self.close()
            raise DataLoss(f"{self.url} changed size while it was fetched ({self.size} bytes, now "
                           f"{length}); nothing was stored")
        skip = done
        while skip:
            got = response.read(min(CHUNK_SIZE, skip))
            if not got:
                raise http.client.IncompleteRead(b"", skip)
            skip -= len(got)
        return response

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._response = None


def _why(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "stalled"
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed early"
    return str(exc) or type(exc).__name__
