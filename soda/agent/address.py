"""The address a node registers when none is configured: the one other
hosts reach it on.

That is the address of the interface carrying the default route (IPv4
first, then IPv6), the lowest metric winning when there are several. With
no such interface the node can only be reached from itself, and it falls
back to loopback: a cluster of one host. Everything is read from /proc and
one ioctl, never from a subprocess, so it runs in any thread and before or
after the Agent bans fork.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Callable

LOOPBACK = "127.0.0.1"

_RTF_UP = 0x0001
_RTF_REJECT = 0x0200
_SIOCGIFADDR = 0x8915
_IFNAMSIZ = 16
# if_inet6 flags that make an address unfit to be reached on.
_IFA_F_DADFAILED = 0x08
_IFA_F_DEPRECATED = 0x20
_IFA_F_TENTATIVE = 0x40
_IPV6_SCOPE_GLOBAL = 0x00


@dataclass(frozen=True)
class NodeAddress:
    address: str
    interface: str = ""     # "" when no interface carries a default route (loopback)


def _default_routes(lines: list[list[str]], *, iface: int, dest: int, mask: int, metric: int,
                    metric_base: int, flags: int, zero_dest: str, zero_mask: str) -> list[str]:
    """The interfaces of the up, non-reject default routes among `lines`
    (a route table's fields, at the positions given), lowest metric first."""
    found = []
    for order, fields in enumerate(lines):
        try:
            if fields[dest] != zero_dest or fields[mask] != zero_mask or fields[iface] == "lo":
                continue
            bits = int(fields[flags], 16)
            if not bits & _RTF_UP or bits & _RTF_REJECT:
                continue
            found.append((int(fields[metric], metric_base), order, fields[iface]))
        except (IndexError, ValueError):
            continue        # a line this parser does not understand is no default route
    return [name for _, _, name in sorted(found)]


def ipv4_default_interfaces(route_table: str) -> list[str]:
    """Interfaces of the usable IPv4 default routes in /proc/net/route's
    text, lowest metric first."""
    rows = [line.split() for line in route_table.splitlines()[1:]]
    return _default_routes(rows, iface=0, dest=1, mask=7, metric=6, metric_base=10, flags=3,
                           zero_dest="00000000", zero_mask="00000000")


def ipv6_default_interfaces(route_table: str) -> list[str]:
    """Interfaces of the usable IPv6 default routes in /proc/net/ipv6_route's
    text, lowest metric first."""
    rows = [line.split() for line in route_table.splitlines()]
    return _default_routes(rows, iface=9, dest=0, mask=1, metric=5, metric_base=16, flags=8,
                           zero_dest="0" * 32, zero_mask="00")


def ipv6_global_address(if_inet6: str, interface: str) -> str | None:
    """The first global, settled IPv6 address of `interface` in
    /proc/net/if_inet6's text."""
    for line in if_inet6.splitlines():
        fields = line.split()
        try:
            if len(fields) < 6 or fields[5] != interface:
                continue
            if int(fields[3], 16) != _IPV6_SCOPE_GLOBAL:
                continue
            if int(fields[4], 16) & (_IFA_F_DADFAILED | _IFA_F_DEPRECATED | _IFA_F_TENTATIVE):
                continue
            return str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
        except ValueError:
            continue
    return None


def interface_ipv4(interface: str) -> str | None:
    """The primary IPv4 address of `interface` (SIOCGIFADDR), None if it has none."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            answer = fcntl.ioctl(s.fileno(), _SIOCGIFADDR,
                                 struct.pack(f"{_IFNAMSIZ}s{256 - _IFNAMSIZ}x",
                                             interface.encode()[:_IFNAMSIZ - 1]))
    except OSError:
        return None
    return socket.inet_ntoa(answer[20:24])


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""           # no IPv6 in this kernel, or no /proc: no route found there


def find_node_address(proc: str = "/proc",
                      ipv4_of: Callable[[str], str | None] = interface_ipv4) -> NodeAddress:
    """The address of the interface carrying the default route, or loopback
    (with no interface) when none does or none of them has an address."""
    for interface in ipv4_default_interfaces(_read(os.path.join(proc, "net", "route"))):
        address = ipv4_of(interface)
        if address:
            return NodeAddress(address, interface)
    if_inet6 = _read(os.path.join(proc, "net", "if_inet6"))
    for interface in ipv6_default_interfaces(_read(os.path.join(proc, "net", "ipv6_route"))):
        address = ipv6_global_address(if_inet6, interface)
        if address:
            return NodeAddress(address, interface)
    return NodeAddress(LOOPBACK)
