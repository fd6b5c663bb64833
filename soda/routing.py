"""Host routes to the guest subnets of other nodes (flannel's "host-gw"
model), in one network namespace.

Owns every route SODA puts in a host's main routing table: one per other
node, "that node's guest subnet via that node's address", so that a guest
(or a Switch) on this host reaches a guest on another host through the
shared L2 fabric, with no tunnel and no NAT. Nothing else in SODA writes
host routes.

- `desired_routes()` (pure): the routes a node list calls for, seen from
  the host of node `own_node` ("" for a host that is no node, such as a
  Switch host): every other node that has a subnet and an address, except
  nodes whose address is loopback (the whole cluster runs on this host:
  their guests are reached through their own uplink, not routed).
- `HostRoutes`: makes the kernel's table match a node list (`sync`) and
  takes its own routes away again (`clear`). It finds its own routes by a
  route protocol number of its own (`RTPROT_SODA`), so it never touches a
  route it did not make, and a restarted process finds what an earlier one
  installed. A route is installed only when its gateway is a neighbour (the
  kernel's route to it has no gateway of its own), and not when this host
  already reaches the subnet by a route that is not ours (a local node's
  uplink holds it). Whatever goes wrong for one node (a gateway elsewhere,
  a route the kernel refuses) is a problem string for that node, never an
  exception out of `sync` and never a reason to leave the other routes out.
- `RouteFollower`: a thread that follows the Master's node list
  (`watch_nodes`) and syncs on every node set.

The routes outlive the process on purpose: guest traffic must not depend on
a SODA process running. A node that leaves the node list takes its route
with it at the next sync, whichever process makes it.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

from pyroute2 import IPRoute, NetlinkError

from soda.backoff import Backoff
from soda.errors import SodaError, from_errno
from soda.follow import Watching, follow
from soda.model.state import Node
from soda.netlink import NetlinkThread

log = logging.getLogger(__name__)

# The route protocol (rtm_protocol) SODA's routes carry, so that sync tells
# its own routes from everyone else's. 93 (0x5d) is in no registry: not in
# the kernel's RTPROT_* values (0-4 and the daemons' 8-18, 42, 99, 186-192
# in iproute2's rt_protos) and used by no routing daemon we know of (bird
# 12, zebra/FRR 11 and 186-192, babel 42, keepalived 18, openr 99, calico
# 80). `ip route show proto 93` lists them.
RTPROT_SODA = 93
MAIN_TABLE = 254
# The ways `route get` fails for an address no route leads to.
_UNREACHABLE_ERRNOS = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL)

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0


@dataclass(frozen=True)
class HostRoute:
    """Node `node`'s guest subnet, reached via its address `gateway`."""
    node: str
    subnet: str
    gateway: str


class Reach(enum.Enum):
    """How this host reaches an address, from the kernel's route to it."""
    NEIGHBOUR = "neighbour"         # on a network this host is attached to
    LOCAL = "local"                 # an address of this host
    VIA_GATEWAY = "via gateway"     # only through a router
    UNREACHABLE = "unreachable"     # no route at all


@dataclass(frozen=True)
class TableRoute:
    """A route of the main table, as far as sync needs it."""
    subnet: str
    gateway: str
    ours: bool


def desired_routes(nodes: Iterable[Node], own_node: str = "") -> tuple[list[HostRoute], list[str]]:
    """The routes `nodes` call for on the host of `own_node`, and the
    problems of the nodes that cannot have one (an address that is no IP
    address, or of another family than the subnet's)."""
    routes: list[HostRoute] = []
    problems: list[str] = []
    claimed: dict[str, str] = {}
    for node in sorted(nodes, key=lambda n: n.name):
        if node.name == own_node or not node.subnet or not node.address:
            continue
        try:
            gateway = ipaddress.ip_address(node.address)
        except ValueError:
            problems.append(f"node {node.name} ({node.address}): its address is not an IP address; "
                            f"SODA routes guest subnets via node addresses")
            continue
        try:
            subnet = ipaddress.ip_network(node.subnet)
        except ValueError:
            problems.append(f"node {node.name}: its subnet {node.subnet!r} is not a network")
            continue
        if gateway.is_loopback:
            # All of the cluster that uses this address runs on this host;
            # its guests are behind that node's own uplink, not routed.
            log.debug("node %s (%s): loopback address, its subnet %s is not routed",
                      node.name, gateway, subnet)
            continue
        if gateway.version != subnet.version:
            problems.append(f"node {node.name} ({gateway}): an IPv{gateway.version} address cannot "
                            f"route its IPv{subnet.version} subnet {subnet}")
            continue
        if str(subnet) in claimed:
            problems.append(f"node {node.name}: subnet {subnet} is node {claimed[str(subnet)]}'s too; "
                            f"neither is routed")
            routes = [r for r in routes if r.subnet != str(subnet)]
            continue
        claimed[str(subnet)] = node.name
        routes.append(HostRoute(node.name, str(subnet), str(gateway)))
    return routes, problems


def reach_problem(route: HostRoute, reach: Reach) -> str:
    """Why `route` cannot be installed when its gateway is reached so; ""
    when it can."""
    if reach is Reach.NEIGHBOUR:
        return ""
    return (f"node {route.node} ({route.gateway}): not on a network this host is attached to; "
            f"SODA routes guest subnets only between hosts on one L2 segment (host-gw)")


class RouteTable(Protocol):
    """What HostRoutes asks of a routing table (the kernel's, or a fake)."""

    def routes(self) -> list[TableRoute]: ...

    def reach(self, address: str) -> Reach: ...

    def replace(self, subnet: str, gateway: str) -> None: ...

    def delete(self, subnet: str, gateway: str) -> None: ...

    def close(self) -> None: ...


def _kernel_error(exc: NetlinkError, what: str) -> SodaError:
    return from_errno(exc.code, f"{what}: {os.strerror(exc.code) if exc.code else exc}")


class KernelRouteTable:
    """The main routing table of network namespace `netns` ("" = the
    process's own), through pyroute2 on a netlink thread of its own.
    Raises SodaError (soda.errors.from_errno) for what the kernel refuses."""

    def __init__(self, netns: str = ""):
        self.netns = netns
        self._netlink = NetlinkThread(netns)

    def close(self) -> None:
        self._netlink.close()

    def routes(self) -> list[TableRoute]:
        def dump(ipr: IPRoute) -> list[TableRoute]:
            out = []
            for msg in ipr.get_routes(table=MAIN_TABLE):
                if (msg.get_attr("RTA_TABLE") or msg["table"]) != MAIN_TABLE:
                    continue
                dst = msg.get_attr("RTA_DST")
                if dst is None:         # a default route: never ours, never a subnet's
                    continue
                subnet = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
                out.append(TableRoute(str(subnet), msg.get_attr("RTA_GATEWAY") or "",
                                      msg["proto"] == RTPROT_SODA))
            return out
        try:
            return self._netlink.run(dump)
        except NetlinkError as exc:
            raise _kernel_error(exc, "cannot list the routing table") from None

    def reach(self, address: str) -> Reach:
        def get(ipr: IPRoute) -> Reach:
            try:
                answers = ipr.route("get", dst=address)
            except NetlinkError as exc:
                if exc.code in _UNREACHABLE_ERRNOS:
                    return Reach.UNREACHABLE
                raise
            if not answers:
                return Reach.UNREACHABLE
            answer = answers[0]
            if answer["type"] == 2:         # RTN_LOCAL
                return Reach.LOCAL
            if answer.get_attr("RTA_GATEWAY") or answer.get_attr("RTA_VIA"):
                return Reach.VIA_GATEWAY
            return Reach.NEIGHBOUR
        try:
            return self._netlink.run(get)
        except NetlinkError as exc:
            raise _kernel_error(exc, f"cannot look up the route to {address}") from None

    @staticmethod
    def _route(subnet: str, gateway: str) -> dict[str, Any]:
        network = ipaddress.ip_network(subnet)
        return {"family": socket.AF_INET if network.version == 4 else socket.AF_INET6,
                "dst": str(network.network_address), "dst_len": network.prefixlen,
                "gateway": gateway, "proto": RTPROT_SODA, "table": MAIN_TABLE}

    def replace(self, subnet: str, gateway: str) -> None:
        try:
            self._netlink.run(lambda ipr: ipr.route("replace", **self._route(subnet, gateway)))
        except NetlinkError as exc:
            raise _kernel_error(exc, f"the kernel refused the route {subnet} via {gateway}") from None

    def delete(self, subnet: str, gateway: str) -> None:
        """Remove our route; one already gone is fine. The protocol is part of
        the match: a route someone else made is never taken."""
        try:
            self._netlink.run(lambda ipr: ipr.route("del", **self._route(subnet, gateway)))
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise _kernel_error(exc, f"cannot remove the route {subnet} via {gateway}") from None


class HostRoutes:
    """SODA's routes to other nodes' guest subnets in one network namespace
    (`netns`, "" = the caller's), seen from the host of node `own_node`
    ("" = a host that is no node). Thread-safe: one sync at a time."""

    def __init__(self, own_node: str = "", netns: str = "", table: RouteTable | None = None):
        self.own_node = own_node
        self.netns = netns
        self._table = table if table is not None else KernelRouteTable(netns)
        self._lock = threading.Lock()
        self._logged: set[str] = set()      # problems said once, until they end
        self.problems: list[str] = []       # as of the last sync

    def close(self) -> None:
        """Let go of the netlink socket; the routes stay."""
        self._table.close()

    def sync(self, nodes: Iterable[Node]) -> list[str]:
        """Make our routes those `nodes` call for: add what is missing,
        replace a route whose node moved, remove ours whose node left.
        Idempotent. Returns the problems (one line each), never raises for
        one node's sake."""
        with self._lock:
            problems = self._sync(list(nodes))
            self._report(problems)
            self.problems = problems
            return list(problems)

    def _sync(self, nodes: list[Node]) -> list[str]:
        wanted, problems = desired_routes(nodes, self.own_node)
        try:
            table = self._table.routes()
        except SodaError as exc:
            return [*problems, f"cannot read the routing table: {exc}"]
        ours = {r.subnet: r.gateway for r in table if r.ours}
        others = {r.subnet for r in table if not r.ours}
        install: dict[str, HostRoute] = {}
        keep: set[str] = set()      # ours whose node could not be looked at now
        for route in wanted:
            if route.subnet in others:
                # This host reaches it already (a local node's uplink, an
                # operator's route): a route of ours would clash with it.
                log.debug("node %s: %s is reached here by a route SODA did not make; not routed",
                          route.node, route.subnet)
                continue
            try:
                reach = self._table.reach(route.gateway)
            except SodaError as exc:
                problems.append(f"node {route.node} ({route.gateway}): cannot look up the route "
                                f"to it: {exc}")
                keep.add(route.subnet)
                continue
            if reach is Reach.LOCAL:
                log.debug("node %s (%s): an address of this host; its subnet %s is not routed",
                          route.node, route.gateway, route.subnet)
                continue
            problem = reach_problem(route, reach)
            if problem:
                problems.append(problem)
                continue
            install[route.subnet] = route
        for route in install.values():
            if ours.get(route.subnet) == route.gateway:
                continue
            try:
                self._table.replace(route.subnet, route.gateway)
            except SodaError as exc:
                problems.append(f"node {route.node}: cannot route {route.subnet} via "
                                f"{route.gateway}: {exc}")
                continue
            if route.subnet in ours:
                log.info("node %s moved: %s now via %s (was %s)", route.node, route.subnet,
                         route.gateway, ours[route.subnet])
            else:
                log.info("node %s: routing %s via %s", route.node, route.subnet, route.gateway)
        for subnet, gateway in sorted(ours.items()):
            if subnet in install or subnet in keep:
                continue
            try:
                self._table.delete(subnet, gateway)
                log.info("removed the route %s via %s (no node holds it here any more)",
                         subnet, gateway)
            except SodaError as exc:
                problems.append(f"cannot remove the route {subnet} via {gateway}: {exc}")
        return problems

    def ours(self) -> list[TableRoute]:
        """The routes of ours in the table now (raises SodaError when it
        cannot be read)."""
        with self._lock:
            return [r for r in self._table.routes() if r.ours]

    def clear(self) -> list[str]:
        """Remove every route of ours; returns the problems (routes the
        kernel would not remove)."""
        with self._lock:
            try:
                ours = [r for r in self._table.routes() if r.ours]
            except SodaError as exc:
                return [f"cannot read the routing table: {exc}"]
            problems = []
            for route in ours:
                try:
                    self._table.delete(route.subnet, route.gateway)
                except SodaError as exc:
                    problems.append(f"cannot remove the route {route.subnet} via {route.gateway}: {exc}")
            if ours:
                log.info("removed %d route(s) to other nodes' guests", len(ours) - len(problems))
            self._logged.clear()
            self.problems = problems
            return problems

    def _report(self, problems: list[str]) -> None:
        """Each problem once while it lasts (a sync runs on every node set)."""
        for problem in problems:
            if problem not in self._logged:
                log.warning("%s", problem)
        for gone in self._logged - set(problems):
            log.info("resolved: %s", gone)
        self._logged = set(problems)


WATCHING = Watching(watch="node watch", followed="the Master's node list", purpose="the host routes",
                    keeps="stay as they are")


class RouteFollower:
    """A thread that follows the Master's node list and syncs `routes` on
    every node set; after an error it watches again after a capped,
    jittered backoff (`watch_nodes` is a stream: nothing polls). `client`
    (anything with `watch_nodes()` and `close()`) is the follower's own:
    `stop()` closes it, which is what ends a stream waiting for the next
    change. Stopping leaves the routes where they are."""

    def __init__(self, client: Any, routes: HostRoutes, backoff: Backoff | None = None):
        self.client = client
        self.routes = routes
        self.backoff = backoff or Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        self.syncs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        log.info("routing other nodes' guest subnets%s: following the Master's node list",
                 f" (this host is node {self.routes.own_node})" if self.routes.own_node else "")
        self._thread = threading.Thread(target=self.run, name="soda-routes", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.client.close()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the route follower did not stop within %.0f s", timeout)

    def run(self) -> None:
        follow(self.client.watch_nodes, self._sync, stop=self._stop, backoff=self.backoff, log=log,
               names=WATCHING)

    def _sync(self, nodes) -> None:
        self.routes.sync(nodes)
        self.syncs += 1
