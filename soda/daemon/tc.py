"""Traffic shaping of a virtual node's TAP, both ways, with pyroute2.

Owns the qdiscs on a TAP and the IFB that carries its inbound traffic:

    to the guest:   TAP egress   root HTB 1: (default 1:10), class 1:10
    from the guest: TAP ingress  ffff: + u32 match-all -> mirred redirect
                                 to the IFB; IFB egress root HTB 1:, class 1:10

The IFB's name is derived from the virtual node (and the Daemon's scope, its
cgroup parent), and its alias records the virtual node and its TAP, so a
restarted Daemon finds and releases everything from the kernel alone.

This is the only Daemon module that imports pyroute2. It must never delete
the TAP (the Agent owns it). Netlink errors are matched by errno.

Every netlink call runs on one thread (soda.netlink.NetlinkThread), which
enters the TAPs' namespace without forking: a started gRPC server must not
fork.
"""

from __future__ import annotations

import abc
import errno
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

from pyroute2 import IPRoute, protocols
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import TC_H_INGRESS, TC_H_ROOT
from pyroute2.netlink.rtnl.tcmsg.common import TIME_UNITS_PER_SEC, tick_in_usec

from soda import errors
from soda.netlink import NetlinkThread

log = logging.getLogger(__name__)

IFNAMSIZ = 15                     # usable characters of a Linux link name
IFB_PREFIX = "ifb-"
ALIAS_TAG = "soda-daemon"
HTB_ROOT = 0x10000                # 1:
HTB_CLASS = 0x10010               # 1:10
HTB_DEFAULT = 0x10                # unclassified traffic goes to 1:10
INGRESS = 0xFFFF0000              # ffff:
FILTER_PRIO = 10
# An IFB comes with a 32-packet queue, and the HTB leaf under it inherits
# that limit: a guest's TCP burst overflows it and the drops cost ~9 % of
# the rate (8.8 instead of 9.6 Mbit/s at 10). A TAP has 1000; so does this.
IFB_QUEUE_PACKETS = 1000


@dataclass(frozen=True)
class Shaping:
    """What the kernel has for one virtual node."""
    tap: str                      # "" if the TAP is gone
    ifb: str
    rate_bit: int = 0             # of the TAP's class 1:10 (or the IFB's if the TAP is gone)
    burst_bytes: int = 0


@dataclass(frozen=True)
class TrafficCounters:
    bytes_to_guest: int = 0
    bytes_from_guest: int = 0
    drops_to_guest: int = 0
    drops_from_guest: int = 0


def ifb_name(scope: str, vnode: str) -> str:
    """A stable link name within IFNAMSIZ; the scope keeps two Daemons (or
    a test's Daemon) with the same virtual node names apart."""
    digest = hashlib.sha256(f"{scope}/{vnode}".encode()).hexdigest()
    return IFB_PREFIX + digest[:IFNAMSIZ - len(IFB_PREFIX) - 1]


def check_link_name(name: str) -> str:
    if (not isinstance(name, str) or not name or len(name) > IFNAMSIZ or name in (".", "..")
            or any(c in name for c in "/:") or any(c.isspace() for c in name)):
        raise errors.InvalidSpec(f"invalid TAP name {name!r}: at most {IFNAMSIZ} characters, "
                                 "no '/', ':' or spaces")
    return name


def netlink_error(exc: NetlinkError, what: str) -> errors.SodaError:
    """A netlink refusal as a SodaError, chosen by errno (never by message)."""
    code = exc.code
    return errors.from_errno(code, f"{what}: {errno.errorcode.get(code, code)} "
                                   f"({exc.args[1] if len(exc.args) > 1 else exc})")


class Shaper(abc.ABC):
    """Bandwidth limits of virtual nodes (an interface, so tests use a fake)."""

    @abc.abstractmethod
    def apply(self, vnode: str, tap: str, rate_bit: int, burst_bytes: int) -> str:
        """Shape `tap` both ways at `rate_bit`, creating or changing in place;
        returns the IFB's name."""

    @abc.abstractmethod
    def release(self, vnode: str) -> bool:
        """Remove the qdiscs on the TAP and the IFB; True if there was any."""

    @abc.abstractmethod
    def read(self, vnode: str) -> Shaping | None:
        """What the kernel has for `vnode`, None if it is not shaped."""

    @abc.abstractmethod
    def counters(self, vnode: str) -> TrafficCounters | None:
        """Bytes and drops through its classes, None if it is not shaped."""

    def close(self) -> None:
        pass


class NetlinkShaper(Shaper):
    def __init__(self, netlink: NetlinkThread, scope: str):
        self.netlink = netlink
        self.scope = scope

    def close(self) -> None:
        self.netlink.close()

    # ---- the interface (each call is one job on the netlink thread) ----
    def apply(self, vnode: str, tap: str, rate_bit: int, burst_bytes: int) -> str:
        check_link_name(tap)
        if rate_bit <= 0:
            raise errors.InvalidSpec(f"rate must be positive, got {rate_bit}")
        return self.netlink.run(self._apply, vnode, tap, rate_bit, burst_bytes)

    def release(self, vnode: str) -> bool:
        return self.netlink.run(self._release, vnode)

    def read(self, vnode: str) -> Shaping | None:
        return self.netlink.run(self._read, vnode)

    def counters(self, vnode: str) -> TrafficCounters | None:
        return self.netlink.run(self._counters, vnode)

    # ---- on the netlink thread -----------------------------------------
    def _where(self) -> str:
        return f" in network namespace {self.netlink.netns}" if self.netlink.netns else ""

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NetlinkError as exc:
            raise netlink_error(exc, what + self._where()) from None

    @staticmethod
    def _index(ipr: IPRoute, name: str) -> int | None:
        found = ipr.link_lookup(ifname=name)
        return found[0] if found else None

    def _alias(self, vnode: str, tap: str) -> str:
        return f"{ALIAS_TAG} scope={self.scope} vnode={vnode} tap={tap}"

    @staticmethod
    def _parse_alias(alias: str | None) -> dict[str, str]:
        words = (alias or "").split()
        if not words or words[0] != ALIAS_TAG:
            return {}
        return dict(w.split("=", 1) for w in words[1:] if "=" in w)

    def _ifb(self, ipr: IPRoute, vnode: str) -> tuple[str, int | None, dict[str, str]]:
        """The IFB's name, index (None if absent) and alias fields."""
        name = ifb_name(self.scope, vnode)
        idx = self._index(ipr, name)
        if idx is None:
            return name, None, {}
        links = self._call(f"cannot read link {name}", ipr.get_links, idx)
        meta = self._parse_alias(links[0].get_attr("IFLA_IFALIAS") if links else None)
        if meta.get("scope") != self.scope or meta.get("vnode") != vnode:
            raise errors.AlreadyExists(f"link {name}{self._where()} exists and is not the IFB "
                                       f"of virtual node {vnode}; remove it by hand")
        return name, idx, meta

    def _apply(self, ipr: IPRoute, vnode: str, tap: str, rate_bit: int, burst_bytes: int) -> str:
        tap_idx = self._index(ipr, tap)
        if tap_idx is None:
            raise errors.NotFound(f"TAP {tap} of virtual node {vnode} does not exist{self._where()}")
        name, ifb_idx, meta = self._ifb(ipr, vnode)
        old_tap = meta.get("tap")
        if ifb_idx is not None and old_tap and old_tap != tap:
            # The virtual node moved to another TAP: leave nothing behind on the old one.
            old_idx = self._index(ipr, old_tap)
            if old_idx is not None:
                self._clear_tap(ipr, old_idx, old_tap)
        new_ifb = ifb_idx is None
        if new_ifb:
            # Created (with its alias) before any qdisc refers to it, so a
            # half-done apply is still found and released through the IFB.
            self._call(f"cannot create IFB {name}", ipr.link, "add", ifname=name, kind="ifb",
                       ifalias=self._alias(vnode, tap))
            ifb_idx = self._index(ipr, name)
            if ifb_idx is None:
                raise errors.TemporaryError(f"IFB {name} vanished right after it was created")
        self._call(f"cannot bring up IFB {name}", ipr.link, "set", index=ifb_idx, state="up",
                   ifalias=self._alias(vnode, tap), txqlen=IFB_QUEUE_PACKETS)
        # What is known is not read back: each listing is a netlink round
        # trip (~2 ms of pyroute2), and a new guest's fence is on the way of
        # its boot. The TAP's qdiscs are listed once (its root and ingress),
        # a new IFB's not at all (it has none of its own yet).
        tap_qdiscs = self._qdiscs(ipr, tap_idx, tap)
        self._ensure_htb(ipr, tap_idx, tap, rate_bit, burst_bytes, tap_qdiscs)
        self._ensure_htb(ipr, ifb_idx, name, rate_bit, burst_bytes, [] if new_ifb else None)
        self._ensure_redirect(ipr, tap_idx, tap, ifb_idx, tap_qdiscs)
        return name

    def _qdiscs(self, ipr: IPRoute, idx: int, dev: str) -> list:
        return self._call(f"cannot list qdiscs of {dev}", ipr.get_qdiscs, idx)

    @staticmethod
    def _root_of(qdiscs: list):
        return next((q for q in qdiscs if q.get("parent") == TC_H_ROOT), None)

    @staticmethod
    def _ingress_in(qdiscs: list) -> bool:
        return any(q.get("parent") == TC_H_INGRESS and q.get_attr("TCA_KIND") == "ingress"
                   for q in qdiscs)

    def _root(self, ipr: IPRoute, idx: int, dev: str):
        return self._root_of(self._qdiscs(ipr, idx, dev))

    def _has_ingress(self, ipr: IPRoute, idx: int, dev: str) -> bool:
        return self._ingress_in(self._qdiscs(ipr, idx, dev))

    def _ensure_htb(self, ipr: IPRoute, idx: int, dev: str, rate_bit: int, burst: int,
                    qdiscs: list | None = None) -> None:
        """`qdiscs`: the device's, if already listed."""
        root = self._root_of(self._qdiscs(ipr, idx, dev) if qdiscs is None else qdiscs)
        classes = None
        if root is None or root.get("handle") != HTB_ROOT or root.get_attr("TCA_KIND") != "htb":
            if root is not None and root.get("handle"):
                # Someone else's root: "replace" cannot change the kind of a
                # qdisc with the same handle, so remove it first (kind None:
                # pyroute2 would demand the old kind's parameters).
                self._call(f"cannot remove root qdisc of {dev}", ipr.tc, "del", None, idx,
                           root.get("handle"), parent=TC_H_ROOT)
            # "replace" swaps the device's default root qdisc (handle 0).
            self._call(f"cannot add HTB to {dev}", ipr.tc, "replace", "htb", idx, HTB_ROOT,
                       default=HTB_DEFAULT)
            classes = []            # a new root qdisc has no classes
        params = dict(parent=HTB_ROOT, rate=f"{rate_bit}bit", ceil=f"{rate_bit}bit",
                      burst=burst, cburst=burst)
        if classes is None:
            classes = self._call(f"cannot list classes of {dev}", ipr.get_classes, idx)
        exists = any(c.get("handle") == HTB_CLASS for c in classes)
        command = "change-class" if exists else "add-class"
        self._call(f"cannot set rate {rate_bit} bit/s on {dev}", ipr.tc, command, "htb", idx,
                   HTB_CLASS, **params)

    def _ensure_redirect(self, ipr: IPRoute, tap_idx: int, tap: str, ifb_idx: int,
                         qdiscs: list) -> None:
        """`qdiscs`: the TAP's, as listed before its root was set (which
        leaves its ingress as it was)."""
        if self._ingress_in(qdiscs):
            filters = self._call(f"cannot list filters of {tap}", ipr.get_filters, tap_idx,
                                 parent=INGRESS)
            if _mirred_targets(filters) == [ifb_idx]:
                return
            # Wrong or missing redirect: rebuild (deleting ingress drops its filters).
            self._call(f"cannot remove ingress of {tap}", ipr.tc, "del", "ingress", tap_idx, INGRESS)
        self._call(f"cannot add ingress to {tap}", ipr.tc, "add", "ingress", tap_idx, INGRESS)
        self._call(f"cannot redirect {tap} to its IFB", ipr.tc, "add-filter", "u32", tap_idx,
                   parent=INGRESS, prio=FILTER_PRIO, protocol=protocols.ETH_P_ALL,
                   target=0x1, keys=["0x0/0x0+0"],
                   action=dict(kind="mirred", direction="egress", action="redirect",
                               ifindex=ifb_idx))

    def _clear_tap(self, ipr: IPRoute, idx: int, tap: str) -> None:
        root = self._root(ipr, idx, tap)
        if root is not None and root.get("handle") == HTB_ROOT and root.get_attr("TCA_KIND") == "htb":
            self._delete_qdisc(ipr, "htb", idx, HTB_ROOT, tap)
        if self._has_ingress(ipr, idx, tap):
            self._delete_qdisc(ipr, "ingress", idx, INGRESS, tap)

    def _delete_qdisc(self, ipr: IPRoute, kind: str, idx: int, handle: int, dev: str) -> None:
        try:
            ipr.tc("del", kind, idx, handle)
        except NetlinkError as exc:
            # Gone meanwhile (the TAP went away, or another release won).
            if exc.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL) and \
                    self._index(ipr, dev) is None:
                return
            raise netlink_error(exc, f"cannot remove {kind} qdisc of {dev}{self._where()}") from None

    def _release(self, ipr: IPRoute, vnode: str) -> bool:
        name, ifb_idx, meta = self._ifb(ipr, vnode)
        if ifb_idx is None:
            return False
        tap = meta.get("tap", "")
        tap_idx = self._index(ipr, tap) if tap else None
        if tap_idx is not None:
            self._clear_tap(ipr, tap_idx, tap)
        try:
            ipr.link("del", index=ifb_idx)
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise netlink_error(exc, f"cannot delete IFB {name}{self._where()}") from None
        log.info("released traffic shaping of %s (TAP %s, IFB %s)", vnode, tap or "-", name)
        return True

    def _class(self, ipr: IPRoute, idx: int | None, dev: str):
        if idx is None:
            return None
        for c in self._call(f"cannot list classes of {dev}", ipr.get_classes, idx):
            if c.get("handle") == HTB_CLASS:
                return c
        return None

    def _read(self, ipr: IPRoute, vnode: str) -> Shaping | None:
        name, ifb_idx, meta = self._ifb(ipr, vnode)
        if ifb_idx is None:
            return None
        tap = meta.get("tap", "")
        tap_idx = self._index(ipr, tap) if tap else None
        cls = self._class(ipr, tap_idx, tap) or self._class(ipr, ifb_idx, name)
        rate, burst = _htb_rate(cls) if cls is not None else (0, 0)
        return Shaping(tap=tap if tap_idx is not None else "", ifb=name, rate_bit=rate,
                       burst_bytes=burst)

    def _counters(self, ipr: IPRoute, vnode: str) -> TrafficCounters | None:
        name, ifb_idx, meta = self._ifb(ipr, vnode)
        if ifb_idx is None:
            return None
        tap = meta.get("tap", "")
        to_guest = _class_stats(self._class(ipr, self._index(ipr, tap) if tap else None, tap))
        from_guest = _class_stats(self._class(ipr, ifb_idx, name))
        return TrafficCounters(bytes_to_guest=to_guest[0], drops_to_guest=to_guest[1],
                               bytes_from_guest=from_guest[0], drops_from_guest=from_guest[1])


def _htb_rate(cls) -> tuple[int, int]:
    """(rate in bit/s, burst in bytes) of an HTB class message."""
    opts = cls.get_attr("TCA_OPTIONS")
    parms = opts.get_attr("TCA_HTB_PARMS") if opts is not None else None
    if not parms:
        return 0, 0
    rate = opts.get_attr("TCA_HTB_RATE64") or parms["rate"]       # bytes/s
    # The kernel keeps the burst as a transmit time in ticks at `rate`.
    burst = round(parms["buffer"] / tick_in_usec / TIME_UNITS_PER_SEC * rate)
    return rate * 8, burst


def _class_stats(cls) -> tuple[int, int]:
    if cls is None:
        return 0, 0
    stats = cls.get_attr("TCA_STATS2")
    if stats is not None:
        basic = stats.get_attr("TCA_STATS_BASIC") or {}
        queue = stats.get_attr("TCA_STATS_QUEUE") or {}
        return basic.get("bytes", 0), queue.get("drops", 0)
    legacy = cls.get_attr("TCA_STATS") or {}
    return legacy.get("bytes", 0), legacy.get("drop", 0)


def _mirred_targets(filters) -> list[int]:
    """ifindexes that the u32 filters redirect to, in order."""
    targets = []
    for f in filters:
        opts = f.get_attr("TCA_OPTIONS")
        acts = opts.get_attr("TCA_U32_ACT") if opts is not None else None
        if acts is None:
            continue
        for attr in acts.get("attrs", []):
            if not attr[0].startswith("TCA_ACT_PRIO"):
                continue
            act_opts = attr[1].get_attr("TCA_ACT_OPTIONS")
            parms = act_opts.get_attr("TCA_MIRRED_PARMS") if act_opts is not None else None
            if parms:
                targets.append(parms["ifindex"])
    return targets
