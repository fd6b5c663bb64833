"""Every address decision of the cluster, in one place.

Owns the layout of addresses: the cluster range is cut into one subnet per
physical node (a /24 by default, kept for the node's life), and in each
subnet the first host address is the node's gateway (on its bridge), the
last is its uplink (the host end of a namespaced node's veth, by which the
Switch reaches the guests), and the hosts between go to guests. The Master
hands a node its subnet, gateway and uplink when it registers; nothing on
the node works them out for itself.

Pure functions over addresses: the controller stores what they decide.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable

from soda.errors import NoCapacity


@dataclass(frozen=True)
class NodeAddresses:
    subnet: str
    gateway: str
    uplink: str


def node_addresses(subnet: str) -> NodeAddresses:
    network = ipaddress.ip_network(subnet)
    first, last = _host_range(network)
    return NodeAddresses(subnet=str(network), gateway=str(network.network_address + first),
                         uplink=str(network.network_address + last))


def _host_range(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    """The offsets of the first and last host address in `network`, as
    `hosts()` counts them, by arithmetic: placement asks for one guest
    address per virtual node, and listing a /24's 254 addresses each time
    was a fifth of the Master's work in creating a service."""
    if network.num_addresses <= 2:              # /31, /32 (and v6 alike): every address
        return 0, network.num_addresses - 1
    if network.version == 6:                    # no broadcast; the subnet-router anycast is skipped
        return 1, network.num_addresses - 1
    return 1, network.num_addresses - 2


def allocate_subnet(cluster_cidr: str, node_prefix: int, used: Iterable[str]) -> NodeAddresses:
    """The first subnet of the cluster range that no node holds."""
    taken = set(used)
    cluster = ipaddress.ip_network(cluster_cidr)
    for subnet in cluster.subnets(new_prefix=node_prefix):
        if str(subnet) not in taken:
            return node_addresses(str(subnet))
    raise NoCapacity(f"no free /{node_prefix} subnet left in {cluster}", resource="subnets")


def allocate_guest(subnet: str, taken: Iterable[str]) -> str:
    """The lowest guest address of `subnet` not in `taken` (the gateway and
    the uplink are never handed out)."""
    network = ipaddress.ip_network(subnet)
    first, last = _host_range(network)
    base = int(network.network_address)
    used = {int(ipaddress.ip_address(a)) - base for a in taken if a}
    # Between the gateway (first) and the uplink (last): a candidate is
    # tried at most once per taken address, not once per address of the subnet.
    for offset in range(first + 1, last):
        if offset not in used:
            return str(network.network_address + offset)
    raise NoCapacity(f"no free guest address left in {subnet}", resource="addresses")
