"""Several physical nodes on this machine: each a network namespace acting
as a host, all joined by one bridge, the fabric.

Owns the layout (`Layout.of`: the names and addresses of the fabric and of
every host, worked out from the cluster's config alone, so that teardown
needs nothing else) and the kernel objects behind it:
- the fabric bridge in the root namespace, holding the fabric's first
  address: the Master and the Switch are reached on it, as on a machine of
  the cluster's network;
- per host, a namespace (`<netns>-<i>`) with loopback up and IPv4
  forwarding on (its guests' traffic leaves through it, as through a
  router), and a veth whose host end `fabric0` holds the host's fabric
  address and whose other end is a port of the fabric bridge.
Each host's Daemon and Agent run inside its namespace (soda.netns.
netns_preexec: `ip netns exec` would remount /sys and hide the cgroup
hierarchy the Daemon fences guests in); they make their guest bridge and
TAPs there, and the routes to the other hosts' guest subnets come from the
Agents and the Switch (soda.routing), as on real hosts.

Everything goes through ip(8) argv lists; removing a namespace takes its
veth with it, removing the bridge takes the root namespace's routes over it.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from soda import command
from soda.agent.network import short_name
from soda.netns import NETNS_DIR

COMMAND_TIMEOUT = 10.0
HOST_LINK = "fabric0"


@dataclass(frozen=True)
class Host:
    """One physical node of the fabric."""
    index: int                # 1..N
    name: str                 # its node name
    netns: str
    address: str              # on the fabric
    link: str                 # the root namespace's end of its veth (a port of the fabric bridge)
    cgroup_parent: str


@dataclass(frozen=True)
class Layout:
    bridge: str
    gateway: str              # the root namespace's address on the fabric
    prefix: int
    hosts: tuple[Host, ...]

    @classmethod
    def of(cls, node: str, netns: str, cgroup_parent: str, nodes: int, cidr: str) -> Layout:
        network = ipaddress.ip_network(cidr)
        addresses = [str(a) for a in network.hosts()]
        if nodes + 1 > len(addresses):
            raise ValueError(f"fabric {cidr} has room for {len(addresses) - 1} hosts, not {nodes}")
        hosts = tuple(Host(index=i, name=host_name(node, i), netns=f"{netns}-{i}", address=addresses[i],
                           link=short_name("sf", f"{netns}-{i}"), cgroup_parent=f"{cgroup_parent}-{i}")
                      for i in range(1, nodes + 1))
        return cls(bridge=short_name("sb", netns), gateway=addresses[0], prefix=network.prefixlen,
                   hosts=hosts)

    def host(self, index: int) -> Host:
        return self.hosts[index - 1]


def host_name(node: str, index: int) -> str:
    """Node `index` named after the cluster's node name: a trailing -1 is
    the number's place (dev-node-1, dev-node-2, ...), else -<index> is added."""
    base = node[:-2] if node.endswith("-1") else node
    return f"{base}-{index}"


def _ip(*argv: str, ok: tuple[int, ...] = (0,)) -> None:
    command.run(["ip", *argv], timeout=COMMAND_TIMEOUT, ok=ok)


def make(layout: Layout) -> None:
    """The fabric bridge and every host on it; idempotent."""
    if not os.path.exists(f"/sys/class/net/{layout.bridge}"):
        _ip("link", "add", layout.bridge, "type", "bridge")
    _ip("addr", "replace", f"{layout.gateway}/{layout.prefix}", "dev", layout.bridge)
    _ip("link", "set", layout.bridge, "up")
    for host in layout.hosts:
        make_host(layout, host)


def make_host(layout: Layout, host: Host) -> None:
    if not os.path.exists(os.path.join(NETNS_DIR, host.netns)):
        _ip("netns", "add", host.netns)
    ns = ("-n", host.netns)
    _ip(*ns, "link", "set", "lo", "up")
    if not os.path.exists(f"/sys/class/net/{host.link}"):
        _ip("link", "add", host.link, "type", "veth", "peer", "name", HOST_LINK, "netns", host.netns)
    _ip("link", "set", host.link, "master", layout.bridge, "up")
    _ip(*ns, "addr", "replace", f"{host.address}/{layout.prefix}", "dev", HOST_LINK)
    _ip(*ns, "link", "set", HOST_LINK, "up")
    # The host forwards its guests' traffic to and from the fabric.
    command.run(["ip", "netns", "exec", host.netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
                timeout=COMMAND_TIMEOUT)


def set_link(host: Host, up: bool) -> None:
    """Cut a host off the fabric, or join it again (its namespace's end of
    the veth: the root namespace keeps its bridge port)."""
    _ip("-n", host.netns, "link", "set", HOST_LINK, "up" if up else "down")


def remove(layout: Layout) -> None:
    """Every host's namespace (its veth goes with it) and the bridge; gone
    already is fine."""
    for host in layout.hosts:
        _ip("link", "del", host.link, ok=(0, 1))
        if os.path.exists(os.path.join(NETNS_DIR, host.netns)):
            _ip("netns", "del", host.netns)
    _ip("link", "del", layout.bridge, ok=(0, 1))
