"""What the Switch measures per virtual node, and how it is exported.

Owns the counters (`VnodeStats`: open and total connections, bytes in and
out, failed connects, time to first byte), their Prometheus text rendering,
the small HTTP listener that serves it at GET /metrics (address from the
Switch config, loopback by default), and the conversion into the report the
Switch sends the Master (`model.SwitchReport`), which `sodactl service get`
shows per virtual node.

"in" is traffic towards the virtual node (client -> node), "out" from it,
as in the Daemon's usage figures. Time to first byte runs from the moment
the Switch accepted the client to the first byte the node sent back: what a
client waits, including the Switch's own connect (and failover).
The counters are plain attributes bumped by the proxy's relay protocols:
no locks (one event loop) and no work per byte beyond an addition.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from soda import model

log = logging.getLogger("soda.switch.metrics")

# Time-to-first-byte samples kept per virtual node for the median.
TTFB_WINDOW = 256
REQUEST_LIMIT = 8192


@dataclass
class VnodeStats:
    open: int = 0               # relayed connections open now
    total: int = 0              # relayed connections ever (to this node)
    bytes_in: int = 0           # client -> node
    bytes_out: int = 0          # node -> client
    connect_failures: int = 0
    ttfb_count: int = 0
    ttfb_sum: float = 0.0
    ttfb_last: float = 0.0
    ttfb_recent: deque = field(default_factory=lambda: deque(maxlen=TTFB_WINDOW))

    def record_ttfb(self, seconds: float) -> None:
        self.ttfb_count += 1
        self.ttfb_sum += seconds
        self.ttfb_last = seconds
        self.ttfb_recent.append(seconds)

    @property
    def ttfb_mean(self) -> float:
        return self.ttfb_sum / self.ttfb_count if self.ttfb_count else 0.0

    @property
    def ttfb_p50(self) -> float:
        """Median of the last TTFB_WINDOW samples (0 when none)."""
        return statistics.median(self.ttfb_recent) if self.ttfb_recent else 0.0


@dataclass(frozen=True)
class VnodeView:
    """One virtual node as a report or /metrics sees it."""
    vnode: str
    stats: VnodeStats
    routable: bool              # in the Master's ready set: may get new connections if healthy
    healthy: bool


@dataclass(frozen=True)
class ServiceView:
    service: str
    listen: str
    listening: bool
    bind_error: str
    vnodes: tuple[VnodeView, ...]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


# (name, type, help, value of a VnodeView)
_SERIES: tuple[tuple[str, str, str, Callable[[VnodeView], float]], ...] = (
    ("soda_switch_connections_open", "gauge", "Relayed connections open now.", lambda v: v.stats.open),
    ("soda_switch_connections_total", "counter", "Relayed connections.", lambda v: v.stats.total),
    ("soda_switch_bytes_in_total", "counter", "Bytes relayed to the virtual node.", lambda v: v.stats.bytes_in),
    ("soda_switch_bytes_out_total", "counter", "Bytes relayed from the virtual node.",
     lambda v: v.stats.bytes_out),
    ("soda_switch_connect_failures_total", "counter", "Failed connects to the virtual node.",
     lambda v: v.stats.connect_failures),
    ("soda_switch_ttfb_seconds_sum", "counter", "Sum of times to first byte.", lambda v: v.stats.ttfb_sum),
    ("soda_switch_ttfb_seconds_count", "counter", "Times to first byte measured.",
     lambda v: v.stats.ttfb_count),
    ("soda_switch_ttfb_p50_seconds", "gauge", "Median time to first byte of the recent connections.",
     lambda v: v.stats.ttfb_p50),
    ("soda_switch_ttfb_last_seconds", "gauge", "Time to first byte of the last connection.",
     lambda v: v.stats.ttfb_last),
    ("soda_switch_endpoint_routable", "gauge", "1 while the Master lists the node as ready.",
     lambda v: int(v.routable)),
    ("soda_switch_endpoint_healthy", "gauge", "1 while the node passes its health checks.",
     lambda v: int(v.healthy)),
)


def render_prometheus(services: list[ServiceView]) -> str:
    """The Prometheus text exposition (format 0.0.4) of every service's vnodes."""
    lines = []
    for name, kind, help_text, value in _SERIES:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for svc in services:
            for v in svc.vnodes:
                lines.append(f'{name}{{service="{_label(svc.service)}",vnode="{_label(v.vnode)}"}} '
                             f"{float(value(v)):.9g}")
    lines.append("# HELP soda_switch_listening 1 while the service's listener is bound.")
    lines.append("# TYPE soda_switch_listening gauge")
    for svc in services:
        lines.append(f'soda_switch_listening{{service="{_label(svc.service)}",listen="{_label(svc.listen)}"}} '
                     f"{int(svc.listening)}")
    return "\n".join(lines) + "\n"


def to_report(switch: str, listen_hosts: tuple[str, ...], busy: tuple[str, ...],
              services: list[ServiceView]) -> model.SwitchReport:
    return model.SwitchReport(
        switch=switch, listen_hosts=tuple(listen_hosts), busy=tuple(busy),
        services=tuple(model.SwitchServiceStats(
            service=s.service, listen=s.listen, listening=s.listening, bind_error=s.bind_error,
            vnodes=tuple(model.SwitchVnodeStats(
                vnode=v.vnode, routable=v.routable, healthy=v.healthy, open=v.stats.open,
                total=v.stats.total, bytes_in=v.stats.bytes_in, bytes_out=v.stats.bytes_out,
                connect_failures=v.stats.connect_failures, ttfb_p50=v.stats.ttfb_p50,
                ttfb_mean=v.stats.ttfb_mean, ttfb_last=v.stats.ttfb_last) for v in s.vnodes))
            for s in services))


class MetricsServer:
    """GET /metrics over plain HTTP/1.0 on one address; anything else is 404."""

    def __init__(self, source: Callable[[], list[ServiceView]]):
        self.source = source
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._handle, host, port)

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1] if self.server else 0

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head[:REQUEST_LIMIT].split(b"\r\n", 1)[0].split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                body, status = render_prometheus(self.source()).encode(), b"200 OK"
            else:
                body, status = b"not found\n", b"404 Not Found"
            writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Type: text/plain; version=0.0.4\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


# ---- what else listens at the Switch's host ---------------------------------
TCP_LISTEN = "0A"


def _hex_address(text: str) -> str:
    """/proc/net/tcp{,6} "0100007F" / 32 hex digits -> an address string: the
    kernel prints each 32-bit word in host (little-endian) order."""
    raw = bytes.fromhex(text)
    swapped = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(swapped)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def tcp_listeners(paths: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) -> set[tuple[str, int]]:
    """(host, port) of every TCP socket in LISTEN state in this network namespace."""
    out = set()
    for path in paths:
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != TCP_LISTEN:
                continue
            host, _, port = fields[1].partition(":")
            try:
                out.add((_hex_address(host), int(port, 16)))
            except ValueError:
                continue
    return out
