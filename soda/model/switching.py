"""What the Switch and the Master tell each other: the endpoints of each
service the Switch serves, and the Switch's reports of what it measured."""

from __future__ import annotations

from dataclasses import dataclass, field

from soda.model.spec import NetworkSpec, OnDemand, SwitchSpec

@dataclass(frozen=True)
class Endpoint:
    """One virtual node as the Switch sees it."""
    vnode: str
    address: str
    port: int
    weight: float
    ready: bool
    frozen: bool = False        # kept frozen (a warm pool's): never ready, not in use
    moving: bool = False        # serves again soon (frozen for a move, thawing): connections may wait


@dataclass(frozen=True)
class SwitchVnodeStats:
    """One virtual node as a Switch sees it (soda.switch.metrics). "in" is
    traffic towards the node; times in seconds."""
    vnode: str
    routable: bool = False      # listed ready by the Master: may get new connections
    healthy: bool = False       # passes the service's health checks
    open: int = 0
    total: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    connect_failures: int = 0
    ttfb_p50: float = 0.0
    ttfb_mean: float = 0.0
    ttfb_last: float = 0.0


@dataclass(frozen=True)
class SwitchServiceStats:
    service: str
    listen: str = ""
    listening: bool = False
    bind_error: str = ""
    vnodes: tuple[SwitchVnodeStats, ...] = ()


@dataclass(frozen=True)
class SwitchReport:
    """What a Switch tells the Master every few seconds: the hosts it may
    listen on (empty: any), the TCP addresses something else listens on at
    its host, and per service its listener and virtual nodes."""
    switch: str
    listen_hosts: tuple[str, ...] = ()
    busy: tuple[str, ...] = ()
    services: tuple[SwitchServiceStats, ...] = ()


@dataclass(frozen=True)
class EndpointSet:
    """What the Switch needs of one service (how to serve it and where to),
    and what the nodes' policy needs (its guests' addresses, its network spec)."""
    service: str
    switch: SwitchSpec = field(default_factory=SwitchSpec)
    endpoints: tuple[Endpoint, ...] = ()
    deleted: bool = False
    on_demand: OnDemand | None = None
    network: NetworkSpec = field(default_factory=NetworkSpec)   # the nodes' policy for its guests

    @property
    def listen(self) -> str:
        return self.switch.listen

    @property
    def policy(self) -> str:
        return self.switch.policy
