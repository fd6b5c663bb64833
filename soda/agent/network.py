"""Guest networking of one physical node: the bridge, the TAPs, the uplink.

Owns, through pyroute2 (never shell strings):
- the node bridge (`soda0` by default) holding the node's gateway address
  from the subnet the Master handed out;
- one TAP per virtual node, attached to the bridge, named deterministically
  from the virtual node so that a restarted Agent finds it again;
- optionally, a network namespace that holds all of the above (tests and
  the demo run nodes that way, so that guest traffic stays inside a
  namespace they created), joined to the host by a veth "uplink": its
  namespace end is a bridge port, its host end holds the last address of the
  node's subnet, so the host (the Switch) reaches guests directly, without
  forwarding.

It knows nothing of the Master, the Daemon or hypervisors.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os

from pyroute2 import IPRoute, NetlinkError, netns as pr_netns

from soda.errors import SodaError

log = logging.getLogger(__name__)

IFNAMSIZ = 15


def short_name(prefix: str, key: str) -> str:
    """A link name no longer than the kernel allows, stable for `key`."""
    return prefix + hashlib.sha1(key.encode()).hexdigest()[:IFNAMSIZ - len(prefix)]


def tap_name(vnode: str) -> str:
    return short_name("st", vnode)


def uplink_address(subnet: str) -> str:
    """The host end of a namespaced node's uplink: the subnet's last host
    address (the Master never hands it to a guest)."""
    return str(list(ipaddress.ip_network(subnet).hosts())[-1])


class NetworkError(SodaError):
    """Node networking could not be set up or torn down."""


class NodeNetwork:
    def __init__(self, netns: str = "", bridge: str = "soda0"):
        self.netns = netns
        self.bridge = bridge
        self.uplink_host = short_name("su", netns) if netns else ""
        self.uplink_node = "uplink0"
        self._created_netns = False
        # Netlink handles are opened here, in the Agent's main() before any
        # gRPC channel exists: pyroute2 forks to enter a namespace.
        if netns and netns not in pr_netns.listnetns():
            pr_netns.create(netns)
            self._created_netns = True
            log.info("created network namespace %s", netns)
        self.host = IPRoute()
        self.node = IPRoute(netns=netns) if netns else self.host

    def close(self) -> None:
        if self.node is not self.host:
            self.node.close()
        self.host.close()

    # ---- helpers -------------------------------------------------------
    @staticmethod
    def _index(ipr: IPRoute, name: str) -> int | None:
        found = ipr.link_lookup(ifname=name)
        return found[0] if found else None

    @staticmethod
    def _ensure_addr(ipr: IPRoute, index: int, address: str, prefix: int) -> None:
        try:
            ipr.addr("add", index=index, address=address, prefixlen=prefix)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise NetworkError(f"cannot add {address}/{prefix}: {os.strerror(exc.code)}") from None

    # ---- the node ------------------------------------------------------
    def configure(self, subnet: str, gateway: str) -> None:
        """Bridge with the gateway address (and the uplink when namespaced).
        Idempotent: run after every registration."""
        prefix = ipaddress.ip_network(subnet).prefixlen
        try:
            if self.netns:
                lo = self._index(self.node, "lo")
                self.node.link("set", index=lo, state="up")
            index = self._index(self.node, self.bridge)
            if index is None:
                self.node.link("add", ifname=self.bridge, kind="bridge")
                index = self._index(self.node, self.bridge)
                log.info("created bridge %s", self.bridge)
            self._ensure_addr(self.node, index, gateway, prefix)
            self.node.link("set", index=index, state="up")
            if self.netns:
                self._configure_uplink(subnet, index)
        except NetlinkError as exc:
            raise NetworkError(f"cannot set up bridge {self.bridge}: {os.strerror(exc.code)}") from None

    def _configure_uplink(self, subnet: str, bridge_index: int) -> None:
        host_index = self._index(self.host, self.uplink_host)
        if host_index is None:
            self.host.link("add", ifname=self.uplink_host, kind="veth",
                           peer={"ifname": self.uplink_node, "net_ns_fd": self.netns})
            host_index = self._index(self.host, self.uplink_host)
        node_index = self._index(self.node, self.uplink_node)
        self.node.link("set", index=node_index, master=bridge_index, state="up")
        prefix = ipaddress.ip_network(subnet).prefixlen
        self._ensure_addr(self.host, host_index, uplink_address(subnet), prefix)
        self.host.link("set", index=host_index, state="up")

    def teardown(self) -> None:
        """Remove the uplink, the bridge and (if this object made it) the
        namespace. TAPs go with their virtual nodes."""
        index = self._index(self.host, self.uplink_host) if self.uplink_host else None
        if index is not None:
            self.host.link("del", index=index)
        index = self._index(self.node, self.bridge)
        if index is not None:
            self.node.link("del", index=index)

    def remove_netns(self) -> None:
        if self.netns and self.netns in pr_netns.listnetns():
            self.close()
            pr_netns.remove(self.netns)

    # ---- TAPs ----------------------------------------------------------
    def ensure_tap(self, vnode: str) -> str:
        """The virtual node's TAP, on the bridge and up; created if missing."""
        name = tap_name(vnode)
        try:
            index = self._index(self.node, name)
            if index is None:
                self.node.link("add", ifname=name, kind="tuntap", mode="tap")
                index = self._index(self.node, name)
            bridge = self._index(self.node, self.bridge)
            if bridge is None:
                raise NetworkError(f"bridge {self.bridge} does not exist: the node is not configured")
            self.node.link("set", index=index, master=bridge, state="up")
        except NetlinkError as exc:
            raise NetworkError(f"cannot set up TAP {name} for {vnode}: {os.strerror(exc.code)}") from None
        return name

    def remove_tap(self, vnode: str) -> None:
        name = tap_name(vnode)
        index = self._index(self.node, name)
        if index is None:
            return
        try:
            self.node.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise NetworkError(f"cannot remove TAP {name} of {vnode}: {os.strerror(exc.code)}") from None

    def taps(self) -> list[str]:
        return [link.get_attr("IFLA_IFNAME") for link in self.node.get_links()
                if (link.get_attr("IFLA_IFNAME") or "").startswith("st")]
