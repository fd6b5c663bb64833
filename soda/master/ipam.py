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
    hosts = list(network.hosts())
    return NodeAddresses(subnet=str(network), gateway=str(hosts[0]), uplink=str(hosts[-1]))


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
    reserved = node_addresses(subnet)
    taken = set(taken) | {reserved.gateway, reserved.uplink}
    for host in ipaddress.ip_network(subnet).hosts():
        if str(host) not in taken:
            return str(host)
    raise NoCapacity(f"no free guest address left in {subnet}", resource="addresses")
