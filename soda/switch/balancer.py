"""Balancing policies of the Service Switch: which virtual node gets the next connection.

Owns the per-service balancing state: the routable endpoints, their weights,
the smooth round-robin counters, active connection counts and passive
failure marks. Pure: no sockets, no clock, no logging, no asyncio; the proxy
passes in the time and tells it about connections. Policies are an explicit
registry keyed by the names in `soda.model.POLICIES`.

Weights are a virtual node's CPU share (0.5, 1.0 ...). They are turned into
whole milli-units so that the arithmetic is exact: weights 1:2 give exactly
1:2 over every three picks, however long the Switch runs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Collection, Iterable

from soda.errors import InvalidSpec
from soda.model.spec import DEFAULT_POLICY
from soda.model.switching import Endpoint

# Weights are cores with at most 0.01 resolution (model.RESOURCE_BOUNDS):
# milli-cores keep them exact as integers.
WEIGHT_SCALE = 1000


def scaled_weight(weight: float) -> int:
    """A weight as a whole number of milli-units; 0 means "route nothing here"."""
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return 0
    return max(1, round(weight * WEIGHT_SCALE))


@dataclass
class Peer:
    """One routable endpoint and the state the policies keep for it."""
    endpoint: Endpoint
    weight: int                 # milli-units, > 0
    current: int = 0            # smooth round-robin counter
    failed_until: float = 0.0   # passive health: skip until this time
    healthy: bool = True        # active health (soda.switch.health)

    @property
    def vnode(self) -> str:
        return self.endpoint.vnode


def smooth_pick(peers: list[Peer]) -> Peer:
    """nginx's smooth weighted round robin over `peers` (not empty).

    Every peer's counter grows by its weight, the largest wins and pays back
    the total. Weights 1:2 give A B B-like interleaving (never A A or B B B),
    and over any sum-of-weights picks each peer gets exactly its weight."""
    total = 0
    best = None
    for peer in peers:
        peer.current += peer.weight
        total += peer.weight
        if best is None or peer.current > best.current:
            best = peer
    best.current -= total
    return best


class Policy(ABC):
    """Chooses one peer among candidates; may update the peers' counters."""
    name = ""

    @abstractmethod
    def choose(self, candidates: list[Peer], active: dict[str, int]) -> Peer:
        """`candidates` is not empty; `active` maps vnode -> open connections."""


class WeightedRoundRobin(Policy):
    """Connections in proportion to weight, interleaved (smooth WRR)."""
    name = "weighted-round-robin"

    def choose(self, candidates: list[Peer], active: dict[str, int]) -> Peer:
        return smooth_pick(candidates)


class WeightedLeastConnections(Policy):
    """The peer whose load after taking this connection, (active+1)/weight,
    is lowest; ties go by smooth WRR among the tied peers, so that idle
    peers of equal weight still alternate."""
    name = "weighted-least-connections"

    def choose(self, candidates: list[Peer], active: dict[str, int]) -> Peer:
        tied: list[Peer] = []
        best_load = best_weight = 0
        for peer in candidates:
            load = active.get(peer.vnode, 0) + 1
            if not tied:
                tied, best_load, best_weight = [peer], load, peer.weight
                continue
            # load/weight < best_load/best_weight, in exact integers.
            lhs, rhs = load * best_weight, best_load * peer.weight
            if lhs < rhs:
                tied, best_load, best_weight = [peer], load, peer.weight
            elif lhs == rhs:
                tied.append(peer)
        return tied[0] if len(tied) == 1 else smooth_pick(tied)


POLICIES: dict[str, type[Policy]] = {
    WeightedRoundRobin.name: WeightedRoundRobin,
    WeightedLeastConnections.name: WeightedLeastConnections,
}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise InvalidSpec(f"unknown switch policy {name!r} (known: {', '.join(POLICIES)})") from None


class Balancer:
    """The balancing state of one service.

    `update` replaces the endpoint set; only ready endpoints with a positive
    weight are routable. Counters, failure marks and active counts of the
    endpoints that remain are kept, so an update does not restart the
    rotation. Active counts are kept per virtual node even after it leaves
    the set: its draining connections still release them."""

    def __init__(self, policy: str = DEFAULT_POLICY, endpoints: Iterable[Endpoint] = ()):
        self._policy = make_policy(policy)
        self._peers: list[Peer] = []
        self._active: dict[str, int] = {}
        self.update(endpoints)

    @property
    def policy(self) -> str:
        return self._policy.name

    def set_policy(self, name: str) -> None:
        """Switch policy; raises InvalidSpec for an unknown name."""
        if name != self._policy.name:
            self._policy = make_policy(name)

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        old = {p.vnode: p for p in self._peers}
        peers = []
        for ep in sorted(endpoints, key=lambda e: e.vnode):
            weight = scaled_weight(ep.weight)
            if not ep.ready or weight == 0:
                continue
            prev = old.get(ep.vnode)
            peer = Peer(ep, weight)
            if prev is not None:
                peer.current = prev.current
                # A virtual node that moved is a different socket: forget its failures.
                if (prev.endpoint.address, prev.endpoint.port) == (ep.address, ep.port):
                    peer.failed_until = prev.failed_until
                    peer.healthy = prev.healthy
            peers.append(peer)
        self._peers = peers

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The routable endpoints (ready, weight > 0), by vnode name."""
        return tuple(p.endpoint for p in self._peers)

    def pick(self, exclude: Collection[str] = (), now: float = 0.0) -> Endpoint | None:
        """The endpoint for the next connection, or None when there is none.

        `exclude` names virtual nodes already tried for this connection.
        Peers that failed their health checks or were marked failed (until a
        time after `now`) are skipped while another candidate exists; when
        all are, the healthy ones are tried first, then any, rather than
        turning every client away."""
        candidates = [p for p in self._peers if p.vnode not in exclude]
        if not candidates:
            return None
        good = [p for p in candidates if p.healthy and p.failed_until <= now]
        if not good:
            good = ([p for p in candidates if p.healthy] or [p for p in candidates if p.failed_until <= now]
                    or candidates)
        return self._policy.choose(good, self._active).endpoint

    def mark_failed(self, vnode: str, until: float) -> None:
        """Passive health: a connect to `vnode` failed; avoid it until `until`."""
        for peer in self._peers:
            if peer.vnode == vnode:
                peer.failed_until = max(peer.failed_until, until)

    def has_healthy_other(self, vnode: str) -> bool:
        """Whether a healthy peer other than `vnode` could take a connection."""
        return any(p.healthy and p.vnode != vnode for p in self._peers)

    def set_healthy(self, healthy: Collection[str]) -> None:
        """Active health: exactly the peers named in `healthy` pass their checks."""
        for peer in self._peers:
            peer.healthy = peer.vnode in healthy

    def mark_ok(self, vnode: str) -> None:
        for peer in self._peers:
            if peer.vnode == vnode:
                peer.failed_until = 0.0

    def acquire(self, vnode: str) -> None:
        self._active[vnode] = self._active.get(vnode, 0) + 1

    def release(self, vnode: str) -> None:
        left = self._active.get(vnode, 0) - 1
        if left > 0:
            self._active[vnode] = left
        else:
            self._active.pop(vnode, None)

    def active(self, vnode: str) -> int:
        return self._active.get(vnode, 0)

    def total_active(self) -> int:
        return sum(self._active.values())
