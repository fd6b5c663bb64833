"""What the Master knows of the Service Switches, from their reports.

Owns, in memory only, the latest `model.SwitchReport` of every Switch (a
Switch reports every few seconds, so a restarted Master knows again within
one period) and three decisions taken from them:

- per-virtual-node figures for `sodactl service get` (`vnode_stats`);
- whether a listen address may be given to a new service (`check_listen`):
  its host must be one a live Switch may bind (its `listen_hosts`; empty
  means any) and no other process may already listen on that port at the
  Switch's host (the Switch reports the TCP listeners it sees there, its own
  excluded). A report is up to one period old, so an address taken in that
  window is still caught by the Switch, whose bind error then shows in
  `service get`; with no live Switch there is nothing to check against and
  the address is accepted;
- draining (`holds`): a virtual node that leaves (scale-down, delete) keeps
  its guest while a live Switch serving its service still routes to it or
  relays connections to it, up to the service's `switch.drain_seconds`.
  A report received before the node left proves nothing, so a node is
  released only by a report newer than its leaving (or by the deadline).
  Holds live in memory: a Master restarted meanwhile stops leaving nodes at
  once (their open connections are cut, as before draining existed).
Pure: the clock is passed in; the Controller calls it under its lock.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from soda import model
from soda.addresses import split_host_port
from soda.errors import AlreadyExists, InvalidSpec

# A Switch silent for this long is taken as gone: its report no longer
# decides anything (it reports every SWITCH_REPORT_SECONDS, soda.switch.main).
STALE_SECONDS = 10.0
WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class _Received:
    at: float
    report: model.SwitchReport


@dataclass(frozen=True)
class _Leaving:
    service: str
    since: float
    deadline: float


def _host_port(address: str) -> tuple[str, int] | None:
    try:
        return split_host_port(address)
    except InvalidSpec:
        return None


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def _same_host(a: str, b: str) -> bool:
    """Whether listeners on hosts `a` and `b` (same port) would collide."""
    return a in WILDCARDS or b in WILDCARDS or _same_address(a, b)


class SwitchRegistry:
    def __init__(self, stale_seconds: float = STALE_SECONDS):
        self.stale_seconds = stale_seconds
        self._reports: dict[str, _Received] = {}
        self._leaving: dict[str, _Leaving] = {}     # vnode -> when it left

    def record(self, report: model.SwitchReport, now: float) -> None:
        if not report.switch:
            raise InvalidSpec("a Switch report needs the Switch's name")
        self._reports[report.switch] = _Received(now, report)

    def _live(self, now: float) -> list[_Received]:
        return [r for r in self._reports.values() if now - r.at <= self.stale_seconds]

    # ---- figures -------------------------------------------------------
    def vnode_stats(self, now: float) -> dict[str, model.SwitchVnodeStats]:
        """vnode -> its figures, summed over the live Switches."""
        out: dict[str, model.SwitchVnodeStats] = {}
        for received in self._live(now):
            for svc in received.report.services:
                for v in svc.vnodes:
                    out[v.vnode] = v if v.vnode not in out else _add(out[v.vnode], v)
        return out

    def services(self, now: float) -> set[str]:
        """The services a live Switch serves (listed in its last report,
        whether or not any of their virtual nodes is)."""
        return {svc.service for received in self._live(now) for svc in received.report.services}

    # ---- admission -----------------------------------------------------
    def check_listen(self, listen: str, now: float) -> None:
        parsed = _host_port(listen)
        if parsed is None:
            return      # parse_spec has refused it already
        host, port = parsed
        live = [r.report for r in self._live(now)]
        if not live:
            return
        allowed = [r for r in live if not r.listen_hosts or any(_same_address(host, h) for h in r.listen_hosts)]
        if not allowed:
            hosts = sorted({h for r in live for h in r.listen_hosts})
            raise InvalidSpec(f"switch address {listen}: host {host} is not one the Switch may listen on "
                              f"(listen_hosts: {', '.join(hosts)})")
        for r in allowed:
            for busy in r.busy:
                other = _host_port(busy)
                if other is not None and other[1] == port and _same_host(host, other[0]):
                    raise AlreadyExists(f"switch address {listen} is in use at Switch {r.switch}: "
                                        f"another process listens on {busy}")

    # ---- draining ------------------------------------------------------
    def leaving(self, vnodes: list[model.VirtualNode], drain_seconds: float, now: float) -> None:
        """`vnodes` of one service were just marked deleting (or frozen)."""
        for v in vnodes:
            self._leaving.setdefault(v.name, _Leaving(v.service, now, now + drain_seconds))

    def holds(self, vnode: str, now: float) -> bool:
        """Whether the guest of deleting (or freezing) `vnode` must keep running for a Switch."""
        leaving = self._leaving.get(vnode)
        if leaving is None:
            return False
        if now >= leaving.deadline:
            del self._leaving[vnode]
            return False
        for received in self._live(now):
            for svc in received.report.services:
                if svc.service != leaving.service:
                    continue
                if received.at < leaving.since:
                    return True     # this Switch may not know yet
                if any(v.vnode == vnode and (v.routable or v.open) for v in svc.vnodes):
                    return True
        del self._leaving[vnode]
        return False

    def expired(self, now: float) -> list[str]:
        """Leaving vnodes whose hold ends now (deadline or a Switch let go)."""
        return [name for name in list(self._leaving) if not self.holds(name, now)]

    def forget(self, vnode: str) -> None:
        self._leaving.pop(vnode, None)


def _add(a: model.SwitchVnodeStats, b: model.SwitchVnodeStats) -> model.SwitchVnodeStats:
    busier = a if a.total >= b.total else b
    return model.SwitchVnodeStats(
        vnode=a.vnode, routable=a.routable or b.routable, healthy=a.healthy or b.healthy,
        open=a.open + b.open, total=a.total + b.total, bytes_in=a.bytes_in + b.bytes_in,
        bytes_out=a.bytes_out + b.bytes_out, connect_failures=a.connect_failures + b.connect_failures,
        ttfb_p50=busier.ttfb_p50, ttfb_last=busier.ttfb_last,
        ttfb_mean=(a.ttfb_mean * a.total + b.ttfb_mean * b.total) / max(1, a.total + b.total))
