"""Guest networking of one physical node: the backend interface, and its
bridge + TAP implementation.

`NetworkBackend` is what the Agent asks of any way of networking guests
(after os-vif's plugins): `describe()` it, `configure_node()` with the
addresses the Master's IPAM handed this node, `plug()` a virtual node in
before its guest boots (returning what its driver needs: the TAP, the
namespace) and `unplug()` it after. Address decisions are not made here:
the node's subnet, gateway and uplink address come from the Master.

`NodeNetwork`, the bridge + TAP backend, owns through pyroute2 (never shell
strings):
- the node bridge (`soda0` by default) holding the node's gateway address
  from the subnet the Master handed out;
- one TAP per virtual node, attached to the bridge, named deterministically
  from the virtual node so that a restarted Agent finds it again; its alias
  records the guest's address, so that unplugging needs nothing but the
  kernel's state;
- a permanent neighbour entry (address -> the guest's MAC) for each guest
  on the bridge and, when namespaced, on the host end of the uplink: the
  platform knows both before the guest boots, so the first packet towards a
  guest never waits for an ARP retry (about a second) and no guest has to
  announce itself;
- the node's guard against its guests (soda.agent.policy), in the
  namespace of the bridge: each TAP's anti-spoofing rules, installed with
  the TAP and removed with it, and the node policy's tables, switched on
  with `guarded=True` and removed by `teardown()`;
- optionally, a network namespace that holds all of the above (tests and
  the demo run nodes that way, so that guest traffic stays inside a
  namespace they created), joined to the host by a veth "uplink": its
  namespace end is a bridge port, its host end holds the last address of the
  node's subnet, so the host (the Switch) reaches guests directly, without
  forwarding.

It knows nothing of the Master, the Daemon or hypervisors. Every netlink
call runs on a netlink thread per namespace (soda.netlink): pyroute2 would
otherwise fork to reach the node's namespace, from whichever pool thread
asked, in a process whose gRPC threads are live.
"""

from __future__ import annotations

import abc
import errno
import hashlib
import ipaddress
import logging
import os
import socket
import time

from pyroute2 import IPRoute, NetlinkError, netns as pr_netns
from pyroute2.netlink.rtnl.ndmsg import states as neigh_states

from soda.agent.policy import TABLE as POLICY_TABLE, GuestGuard, NodePolicy, Nft, PolicyError
from soda.errors import SodaError
from soda.netlink import NetlinkThread

log = logging.getLogger(__name__)

IFNAMSIZ = 15
NUD_PERMANENT = neigh_states["permanent"]
TAP_ALIAS_TAG = "soda-tap"
# The guard's and the policy's counters are read for all guests at once, at
# most this often (usage goes out with heartbeats, every few seconds).
REFUSED_READ_SECONDS = 1.0


def short_name(prefix: str, key: str) -> str:
    """A link name no longer than the kernel allows, stable for `key`."""
    return prefix + hashlib.sha1(key.encode()).hexdigest()[:IFNAMSIZ - len(prefix)]


def tap_name(vnode: str) -> str:
    return short_name("st", vnode)


def bridge_mac(gateway: str) -> str:
    """The bridge's MAC, fixed and made from the gateway address (02:51:...;
    guests' MACs are 02:50:...). A bridge that picks its own MAC takes the
    lowest of its ports' and changes it as TAPs come and go; every change
    flushes the bridge's neighbour entries (the permanent ones too) and
    leaves guests holding a stale MAC for their gateway."""
    return "02:51:" + ":".join(f"{int(octet):02x}" for octet in gateway.split("."))


def _tap_alias_fields(alias: str | None) -> dict[str, str]:
    """The fields (vnode=, address=) of a TAP's alias; none for a link that
    is not a virtual node's TAP."""
    words = (alias or "").split()
    if not words or words[0] != TAP_ALIAS_TAG:
        return {}
    return dict(word.split("=", 1) for word in words[1:] if "=" in word)


def _tap_owner(ipr: IPRoute, index: int) -> int | None:
    """The uid owning TAP `index`; None when it has none."""
    info = ipr.link("get", index=index)[0].get_attr("IFLA_LINKINFO")
    data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
    return data.get_attr("IFLA_TUN_OWNER") if data is not None else None


class NetworkError(SodaError):
    """Node networking could not be set up or torn down."""


class NetworkBackend(abc.ABC):
    """How the guests of one physical node are networked."""

    @abc.abstractmethod
    def describe(self) -> dict[str, str]:
        """What this backend is and where its parts are (for logs and status)."""

    @abc.abstractmethod
    def configure_node(self, subnet: str, gateway: str, uplink: str) -> None:
        """Set the node up for the addresses the Master handed it; idempotent,
        run after every registration."""

    @abc.abstractmethod
    def plug(self, vnode: str, address: str, mac: str, *, owner: int = 0) -> dict[str, str]:
        """Give the virtual node its network before its guest boots;
        idempotent. `owner`: the uid its VMM runs as (0 = root). Returns
        the GuestSpec fields its driver needs."""

    @abc.abstractmethod
    def unplug(self, vnode: str) -> None:
        """Take the virtual node's network away; nothing to remove is fine."""

    def refused_packets(self, vnode: str) -> int:
        """Packets the virtual node's guest sent that the node refused
        (spoofed, or to where its policy does not let it go)."""
        return 0

    @abc.abstractmethod
    def plugged(self) -> set[str]:
        """Every virtual node that has a network here, whichever Agent gave
        it (a restarted Agent takes away what no guest of its own needs)."""


class NodeNetwork(NetworkBackend):
    def __init__(self, netns: str = "", bridge: str = "soda0", guarded: bool = True):
        self.netns = netns
        self.bridge = bridge
        # The guests' guard (anti-spoofing per TAP) and the node policy;
        # off only to measure what they cost (bench) and in tests of the
        # plain bridge.
        nft = Nft(netns)
        self.guard = GuestGuard(nft) if guarded else None
        self.policy = NodePolicy(nft) if guarded else None
        self.addresses: tuple[str, str, str] | None = None      # subnet, gateway, uplink once configured
        self._guest_addresses: dict[str, str] = {}      # vnode -> address, of what this object plugged
        self._refused: tuple[float, dict[str, int], dict[str, int]] = (0.0, {}, {})
        self.uplink_host = short_name("su", netns) if netns else ""
        self.uplink_node = "uplink0"
        self._created_netns = False
        # Made in the Agent's main() before any gRPC channel exists: creating
        # a namespace is the one thing here that forks.
        if netns and netns not in pr_netns.listnetns():
            pr_netns.create(netns)
            self._created_netns = True
            log.info("created network namespace %s", netns)
        self.host = NetlinkThread()
        self.node = NetlinkThread(netns) if netns else self.host

    def close(self) -> None:
        if self.node is not self.host:
            self.node.close()
        self.host.close()

    # ---- helpers (run on a netlink thread) -----------------------------
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

    @staticmethod
    def _set_neighbour(ipr: IPRoute, link: str, address: str, mac: str) -> None:
        index = NodeNetwork._index(ipr, link)
        if index is None:
            raise NetworkError(f"{link} does not exist: the node is not configured")
        ipr.neigh("replace", dst=address, lladdr=mac, ifindex=index, state=NUD_PERMANENT)

    @staticmethod
    def _del_neighbour(ipr: IPRoute, link: str, address: str) -> None:
        index = NodeNetwork._index(ipr, link)
        if index is None:
            return
        try:
            ipr.neigh("del", dst=address, ifindex=index)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise

    # ---- the node ------------------------------------------------------
    def describe(self) -> dict[str, str]:
        return {"kind": "bridge", "bridge": self.bridge, "netns": self.netns,
                "uplink": self.uplink_host}

    def configure_node(self, subnet: str, gateway: str, uplink: str) -> None:
        """Bridge with the gateway address (and, when namespaced, the uplink
        whose host end holds `uplink`)."""
        try:
            index = self.node.run(self._configure_bridge, subnet, gateway)
            if self.netns:
                self._configure_uplink(subnet, uplink, index)
        except NetlinkError as exc:
            raise NetworkError(f"cannot set up bridge {self.bridge}: {os.strerror(exc.code)}") from None
        if self.policy is not None:
            try:
                self.policy.prepare()
            except PolicyError as exc:
                raise NetworkError(str(exc)) from None
        self.addresses = (subnet, gateway, uplink)

    def policy_scope(self) -> tuple[str, tuple[str, ...]] | None:
        """The node's guest subnet and its own addresses in it (the policy
        keeps them open to the node), or None until it is configured."""
        if self.addresses is None:
            return None
        subnet, gateway, uplink = self.addresses
        return subnet, (gateway, uplink)

    @staticmethod
    def _check_no_overlap(ipr: IPRoute, subnet: str, ours: set[str]) -> None:
        """NetworkError if a link other than `ours` holds an address in (or
        around) `subnet`: the host's own network and the guests' would
        route over each other, silently."""
        network = ipaddress.ip_network(subnet)
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for addr in ipr.get_addr(family=socket.AF_INET):
            link = names.get(addr["index"], "?")
            held = ipaddress.ip_interface(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}")
            if link not in ours and held.network.overlaps(network) and not held.ip.is_loopback:
                raise NetworkError(f"the subnet {subnet} the Master handed this node overlaps {held} on "
                                   f"{link}, a network of this host: give the Master a cluster_cidr "
                                   f"that no host network uses")

    def _configure_bridge(self, ipr: IPRoute, subnet: str, gateway: str) -> int:
        prefix = ipaddress.ip_network(subnet).prefixlen
        self._check_no_overlap(ipr, subnet, {self.bridge, self.uplink_node})
        if self.netns:
            ipr.link("set", index=self._index(ipr, "lo"), state="up")
        index = self._index(ipr, self.bridge)
        if index is None:
            ipr.link("add", ifname=self.bridge, kind="bridge")
            index = self._index(ipr, self.bridge)
            log.info("created bridge %s", self.bridge)
        self._ensure_addr(ipr, index, gateway, prefix)
        ipr.link("set", index=index, address=bridge_mac(gateway), state="up")
        return index

    def _configure_uplink(self, subnet: str, uplink: str, bridge_index: int) -> None:
        def host_end(ipr: IPRoute) -> None:
            if self._index(ipr, self.uplink_host) is None:
                ipr.link("add", ifname=self.uplink_host, kind="veth",
                         peer={"ifname": self.uplink_node, "net_ns_fd": self.netns})

        def node_end(ipr: IPRoute) -> None:
            ipr.link("set", index=self._index(ipr, self.uplink_node), master=bridge_index, state="up")

        def host_address(ipr: IPRoute) -> None:
            self._check_no_overlap(ipr, subnet, {self.uplink_host})
            index = self._index(ipr, self.uplink_host)
            self._ensure_addr(ipr, index, uplink, ipaddress.ip_network(subnet).prefixlen)
            ipr.link("set", index=index, state="up")

        self.host.run(host_end)
        self.node.run(node_end)
        self.host.run(host_address)

    def teardown(self) -> None:
        """Remove the uplink, the bridge and (if this object made it) the
        namespace. TAPs go with their virtual nodes."""
        def remove(ipr: IPRoute, name: str) -> None:
            index = self._index(ipr, name)
            if index is not None:
                ipr.link("del", index=index)

        if self.uplink_host:
            self.host.run(remove, self.uplink_host)
        self.node.run(remove, self.bridge)
        for part in (self.guard, self.policy):
            if part is not None:
                part.remove()

    def remove_netns(self) -> None:
        if self.netns and self.netns in pr_netns.listnetns():
            self.close()
            pr_netns.remove(self.netns)

    @classmethod
    def remove_node(cls, netns: str = "", bridge: str = "soda0") -> list[str]:
        """Remove what an Agent made on this host for a node that leaves the
        cluster (`soda-agent --teardown`): with `netns`, that namespace and
        everything in it (bridge, TAPs, SODA's nft tables; the uplink's host
        end goes with its peer); else the bridge and SODA's nft tables of
        this namespace. What it removed, as lines to show; nothing the second
        time. Forks to delete a namespace: call before any gRPC channel."""
        if netns:
            if netns not in pr_netns.listnetns():
                return []
            pr_netns.remove(netns)
            return [f"network namespace {netns} (its bridge, TAPs and nft tables with it)"]
        net = cls(bridge=bridge, guarded=True)
        try:
            removed = [f"nft table {family} {POLICY_TABLE}" for family in ("inet", "bridge")
                       if net.policy.nft.objects(family)]
            if net.node.run(lambda ipr: cls._index(ipr, bridge)) is not None:
                removed.insert(0, f"bridge {bridge}")
            try:
                net.teardown()
            except NetlinkError as exc:
                raise NetworkError(f"cannot remove bridge {bridge}: {os.strerror(exc.code)}") from None
            except PolicyError as exc:
                raise NetworkError(str(exc)) from None
            return removed
        finally:
            net.close()

    # ---- guests --------------------------------------------------------
    def plug(self, vnode: str, address: str, mac: str, *, owner: int = 0) -> dict[str, str]:
        """The virtual node's TAP, on the bridge and up (created if missing),
        and the neighbour entries that make `address` reachable at `mac` at
        once. `owner`: the uid (and gid) the guest's VMM runs as, which may
        then open the TAP without privileges; 0 = none (only root opens
        it). A TAP that exists with another owner is made again."""
        name = tap_name(vnode)
        try:
            self.node.run(self._plug, name, vnode, address, mac, owner)
            if self.netns:
                self.host.run(self._set_neighbour, self.uplink_host, address, mac)
        except NetlinkError as exc:
            raise NetworkError(f"cannot plug {vnode} in (TAP {name}): {os.strerror(exc.code)}") from None
        if self.guard is not None:
            try:
                self.guard.guard(name, mac, address)
            except PolicyError as exc:
                raise NetworkError(f"cannot guard {vnode}'s TAP {name}: {exc}") from None
        self._guest_addresses[vnode] = address
        return {"tap": name, "netns": self.netns}

    def refused_packets(self, vnode: str) -> int:
        """From the guard's and the policy's counters, read at most once a
        second for all guests (each read runs nft twice)."""
        if self.guard is None or self.policy is None:
            return 0
        read_at, spoofed, dropped = self._refused
        if time.monotonic() - read_at > REFUSED_READ_SECONDS:
            try:
                spoofed, dropped = self.guard.drops(), self.policy.drops()
            except PolicyError as exc:
                log.debug("cannot read the policy's counters: %s", exc)
            self._refused = (time.monotonic(), spoofed, dropped)
        return spoofed.get(tap_name(vnode), 0) + dropped.get(self._guest_addresses.get(vnode, ""), 0)

    def _plug(self, ipr: IPRoute, name: str, vnode: str, address: str, mac: str,
              owner: int = 0) -> None:
        index = self._index(ipr, name)
        if index is not None and _tap_owner(ipr, index) != (owner or None):
            # The owner is set when a TAP is made (TUNSETOWNER needs the
            # device attached): another owner means making it again.
            ipr.link("del", index=index)
            index = None
        if index is None:
            ownership = {"uid": owner, "gid": owner} if owner else {}
            ipr.link("add", ifname=name, kind="tuntap", mode="tap", **ownership)
            index = self._index(ipr, name)
        bridge = self._index(ipr, self.bridge)
        if bridge is None:
            raise NetworkError(f"bridge {self.bridge} does not exist: the node is not configured")
        ipr.link("set", index=index, master=bridge, state="up",
                 ifalias=f"{TAP_ALIAS_TAG} vnode={vnode} address={address}")
        self._set_neighbour(ipr, self.bridge, address, mac)

    def unplug(self, vnode: str) -> None:
        """Remove the virtual node's neighbour entries and TAP; nothing to
        remove is fine. The TAP goes last: its alias is the record of the
        guest's address, so an unplug cut short (the Agent killed, a netlink
        error) is finished by the next one, or by the next Agent's sweep of
        leftovers, and never leaves a neighbour entry nothing names."""
        name = tap_name(vnode)
        try:
            address = self.node.run(self._tap_address, name)
            if address and self.netns:
                self.host.run(self._del_neighbour, self.uplink_host, address)
            self.node.run(self._unplug, name, address)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise NetworkError(f"cannot unplug {vnode} (TAP {name}): {os.strerror(exc.code)}") from None
        self._guest_addresses.pop(vnode, None)
        if self.guard is not None:
            try:
                self.guard.unguard(name)
            except PolicyError as exc:
                raise NetworkError(f"cannot remove the guard of {vnode}'s TAP {name}: {exc}") from None

    def _tap_address(self, ipr: IPRoute, name: str) -> str:
        """The guest address TAP `name`'s alias records; "" without the TAP."""
        index = self._index(ipr, name)
        if index is None:
            return ""
        return _tap_alias_fields(ipr.link("get", index=index)[0].get_attr("IFLA_IFALIAS")).get("address", "")

    def _unplug(self, ipr: IPRoute, name: str, address: str) -> None:
        if address:
            self._del_neighbour(ipr, self.bridge, address)
        index = self._index(ipr, name)
        if index is not None:
            ipr.link("del", index=index)

    def plugged(self) -> set[str]:
        """The virtual nodes whose TAP is here, read from the TAPs' aliases."""
        def vnodes(ipr: IPRoute) -> set[str]:
            found = (_tap_alias_fields(link.get_attr("IFLA_IFALIAS")).get("vnode")
                     for link in ipr.get_links())
            return {name for name in found if name}
        try:
            return self.node.run(vnodes)
        except NetlinkError as exc:
            raise NetworkError(f"cannot list the TAPs: {os.strerror(exc.code)}") from None

    def taps(self) -> list[str]:
        def names(ipr: IPRoute) -> list[str]:
            return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
        return [n for n in self.node.run(names) if (n or "").startswith("st")]
