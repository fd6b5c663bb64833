"""A service spec: what an ASP asks for (image, virtual nodes and their
resources, how the Switch serves it) and the rules it must obey.

`parse_spec` turns a YAML/flag dict into a validated `ServiceSpec`; the
Master validates again whatever reaches it over gRPC (`validate_spec`).
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from soda.addresses import split_host_port
from soda.errors import InvalidSpec
from soda.model.names import (SERVICE_NAME_MAX, check_dns_label, check_hypervisor_name,
                              check_image_ref)

POLICIES = ("weighted-round-robin", "weighted-least-connections")
DEFAULT_POLICY = "weighted-round-robin"
# How the Switch forwards a service: its userspace proxy, or the kernel (nftables DNAT).
SWITCH_MODES = ("proxy", "l4")
DEFAULT_SWITCH_MODE = "proxy"
# Active health checks: a TCP connect, an HTTP GET of a path, or none.
HEALTH_KINDS = ("tcp", "http", "none")
DEFAULT_PORT = 80
MAX_VNODES_PER_SERVICE = 1000
# A service's boot_timeout: seconds from a guest's start to its port
# answering, past which the guest is FAILED (and retried with backoff).
# 0 = its driver's default, sized to the kernel it boots.
BOOT_TIMEOUT_MIN, BOOT_TIMEOUT_MAX = 1.0, 3600.0

# Bounds that catch typos (64000 cores, negative memory) before scheduling;
# a request inside them that no node can hold is NoCapacity, not InvalidSpec.
RESOURCE_BOUNDS = {
    "cpu": (0.01, 1024.0),
    "memory": (16, 16 * 1024 * 1024),        # MiB: 16 MiB .. 16 TiB
    "bandwidth": (1, 400_000),               # Mbit/s
    "disk": (16, 1024 * 1024 * 1024),        # MiB: 16 MiB .. 1 PiB
}
RESOURCE_UNITS = {"cpu": "cores", "memory": "MiB", "bandwidth": "Mbit/s", "disk": "MiB"}
RESOURCE_DEFAULTS = {"cpu": 1.0, "memory": 64, "bandwidth": 100, "disk": 256}


@dataclass(frozen=True)
class Resources:
    cpu: float = 0.0
    memory: int = 0          # MiB
    bandwidth: int = 0       # Mbit/s
    disk: int = 0            # MiB

    def __add__(self, other: "Resources") -> "Resources":
        return Resources(self.cpu + other.cpu, self.memory + other.memory,
                         self.bandwidth + other.bandwidth, self.disk + other.disk)

    def __sub__(self, other: "Resources") -> "Resources":
        return Resources(self.cpu - other.cpu, self.memory - other.memory,
                         self.bandwidth - other.bandwidth, self.disk - other.disk)

    def as_dict(self) -> dict:
        return {"cpu": round(self.cpu, 6), "memory": self.memory,
                "bandwidth": self.bandwidth, "disk": self.disk}


@dataclass(frozen=True)
class HealthCheck:
    """How the Switch checks a virtual node: `rise` passes in a row make it
    healthy, `fall` failures in a row make it unhealthy."""
    kind: str = "tcp"
    path: str = ""              # http only: the path to GET
    expect_status: int = 200    # http only
    interval: float = 1.0       # seconds between checks
    timeout: float = 1.0        # seconds one check may take
    rise: int = 2
    fall: int = 2

    def as_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "expect_status": self.expect_status,
                "interval": self.interval, "timeout": self.timeout, "rise": self.rise,
                "fall": self.fall}


@dataclass(frozen=True)
class SwitchSpec:
    listen: str = ""
    policy: str = DEFAULT_POLICY
    mode: str = DEFAULT_SWITCH_MODE
    health: HealthCheck = field(default_factory=HealthCheck)
    # A leaving endpoint gets no new connections; open ones get this long to finish.
    drain_seconds: float = 30.0

    def as_dict(self) -> dict:
        return {"listen": self.listen, "policy": self.policy, "mode": self.mode,
                "health": self.health.as_dict(), "drain_seconds": self.drain_seconds}


IDLE_POLICIES = ("freeze", "stop")


@dataclass(frozen=True)
class OnDemand:
    """Deploy on first request (Dynasoar): the Switch holds a connection that
    arrives while no node is ready and asks the Master for one; after
    `idle_seconds` without connections the service goes back to its idle
    state: `warm` virtual nodes booted and frozen (a first connection thaws
    one instead of booting), none when `warm` is 0. `idle` says where the
    pool comes from: "freeze" freezes the guests that served (the others are
    stopped), "stop" stops them all and boots the pool afresh."""
    max_nodes: int
    idle_seconds: float
    resources: Resources        # of each virtual node deployed on demand
    warm: int = 0
    idle: str = "freeze"

    def as_dict(self) -> dict:
        return {"max_nodes": self.max_nodes, "idle_seconds": self.idle_seconds,
                "resources": self.resources.as_dict(), "warm": self.warm, "idle": self.idle}


@dataclass(frozen=True)
class EgressRule:
    """Where a guest may open connections beyond its own service: a network
    and a port range (TCP and UDP). Written `CIDR:PORT` or `CIDR:LOW-HIGH`."""
    network: str                # normalised, e.g. "192.0.2.0/24"
    port_low: int
    port_high: int

    def __str__(self) -> str:
        ports = str(self.port_low) if self.port_low == self.port_high else f"{self.port_low}-{self.port_high}"
        return f"{self.network}:{ports}"


@dataclass(frozen=True)
class NetworkSpec:
    """What a service's guests may reach and be reached by, beyond the
    Switch's connections to its port and the replies to them (the node's
    policy, soda.agent.policy): its own other virtual nodes (`peers`), and
    the `egress` rules. By default peers talk to each other and nothing
    else is reachable."""
    peers: bool = True
    egress: tuple[EgressRule, ...] = ()

    def as_dict(self) -> dict:
        return {"peers": self.peers, "egress": [str(rule) for rule in self.egress]}


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    image: str
    nodes: int
    resources: tuple[Resources, ...]     # one per virtual node
    hypervisor: str = ""
    port: int = DEFAULT_PORT
    switch: SwitchSpec = field(default_factory=SwitchSpec)
    # CPU as a hard cap (CFS quota) on top of the proportional share.
    cpu_cap: bool = False
    on_demand: OnDemand | None = None
    # Resources of a virtual node added later when none is left to copy: the
    # last node's (or the one value given for all). A service at zero nodes
    # keeps what it was given here, so that growing it asks for that.
    template: Resources = Resources(**RESOURCE_DEFAULTS)
    network: NetworkSpec = NetworkSpec()
    boot_timeout: float = 0.0            # seconds; 0 = the driver's default

    def as_dict(self) -> dict:
        out = {
            "name": self.name, "image": self.image, "hypervisor": self.hypervisor,
            "nodes": self.nodes, "port": self.port, "cpu_cap": self.cpu_cap,
            # With no nodes, the resources it was given (its template).
            "resources": (resource_columns(self.resources) if self.nodes
                          else self.template.as_dict()),
            "switch": self.switch.as_dict(),
        }
        if self.on_demand is not None:
            out["on_demand"] = self.on_demand.as_dict()
        if self.network != NetworkSpec():
            out["network"] = self.network.as_dict()
        if self.boot_timeout:
            out["boot_timeout"] = self.boot_timeout
        return out


def resource_columns(resources: tuple[Resources, ...]) -> dict:
    """The spec form: {cpu: 0.5, memory: [64, 128], ...}, a scalar where all agree."""
    out = {}
    for key in RESOURCE_BOUNDS:
        values = [r.as_dict()[key] for r in resources]
        out[key] = values[0] if values and len(set(values)) == 1 else values
    return out


def _plain(value: float) -> str:
    """A number as people write it: 16777216, 0.01, 1e+11 only when huge."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}"


def _number(key: str, value: Any, integer: bool) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise InvalidSpec(f"{key}: {value!r} is not a number") from None
        else:
            raise InvalidSpec(f"{key}: {value!r} is not a number")
    if not math.isfinite(value):
        raise InvalidSpec(f"{key}: {value!r} is not a finite number")
    lo, hi = RESOURCE_BOUNDS[key]
    if value < lo or value > hi:
        raise InvalidSpec(f"{key} must be between {_plain(lo)} and {_plain(hi)} {RESOURCE_UNITS[key]}, "
                          f"got {_plain(value)}")
    if integer:
        if value != int(value):
            raise InvalidSpec(f"{key} must be a whole number of {RESOURCE_UNITS[key]}, got {value:g}")
        return int(value)
    return float(value)


def expand_resources(nodes: int, resources: Mapping[str, Any] | None) -> tuple[Resources, ...]:
    """One Resources per virtual node from `{cpu: 0.5 | [0.5, 1.0], ...}`."""
    resources = dict(resources or {})
    unknown = sorted(set(resources) - set(RESOURCE_BOUNDS))
    if unknown:
        raise InvalidSpec(f"unknown resource field(s): {', '.join(unknown)} "
                          f"(known: {', '.join(RESOURCE_BOUNDS)})")
    columns: dict[str, list] = {}
    for key in RESOURCE_BOUNDS:
        value = resources.get(key, RESOURCE_DEFAULTS[key])
        if value is None:
            value = RESOURCE_DEFAULTS[key]
        if isinstance(value, (list, tuple)):
            if len(value) != nodes:
                raise InvalidSpec(f"{key}: {len(value)} values given for {nodes} virtual nodes; "
                                  "give one value, or one per virtual node")
            values = list(value)
        else:
            values = [value] * nodes
        columns[key] = [_number(key, v, integer=(key != "cpu")) for v in values]
    return tuple(Resources(columns["cpu"][i], columns["memory"][i], columns["bandwidth"][i],
                           columns["disk"][i]) for i in range(nodes))


def check_listen(listen: Any) -> str:
    if listen in (None, ""):
        return ""
    split_host_port(listen, "switch.listen")
    return listen


_SPEC_FIELDS = {"name", "image", "hypervisor", "nodes", "port", "resources", "switch", "cpu_cap",
                "on_demand", "network", "boot_timeout"}
_NETWORK_FIELDS = {"peers", "egress"}
MAX_EGRESS_RULES = 64
_SWITCH_FIELDS = {"listen", "policy", "mode", "health", "drain_seconds"}
_HEALTH_FIELDS = set(HealthCheck.__dataclass_fields__)
_ON_DEMAND_FIELDS = {"max_nodes", "idle_seconds", "resources", "warm", "idle"}
_HTTP_PATH = re.compile(r"/[\x21-\x7e]*\Z")     # absolute, printable, no spaces


def _bounded(what: str, value: Any, low: float, high: float, *, integer: bool = False,
             default: Any = None) -> Any:
    """`value` (or `default` when absent) checked to lie in [low, high]."""
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or not low <= value <= high:
        kind = "a whole number" if integer else "a number"
        raise InvalidSpec(f"{what} must be {kind} from {low:g} to {high:g}, got {value!r}")
    return value if integer else float(value)


def parse_health(data: Any) -> HealthCheck:
    if data is None:
        return HealthCheck()
    if not isinstance(data, Mapping):
        raise InvalidSpec("switch.health must be a mapping like {kind: http, path: /healthz}")
    _check_fields("switch.health", data, _HEALTH_FIELDS)
    kind = data.get("kind") or ("http" if data.get("path") else "tcp")
    if kind not in HEALTH_KINDS:
        raise InvalidSpec(f"unknown health check kind {kind!r} (known: {', '.join(HEALTH_KINDS)})")
    path = data.get("path") or ""
    if kind == "http":
        path = path or "/"
        if not isinstance(path, str) or not _HTTP_PATH.match(path):
            raise InvalidSpec(f"switch.health.path {path!r} is not an HTTP path "
                              "(it must start with '/' and hold no spaces)")
    elif path:
        raise InvalidSpec(f"switch.health.path is only for kind http, not {kind}")
    defaults = HealthCheck()
    interval = _bounded("switch.health.interval", data.get("interval"), 0.05, 3600,
                        default=defaults.interval)
    timeout = _bounded("switch.health.timeout", data.get("timeout"), 0.01, 3600,
                       default=min(defaults.timeout, interval))
    return HealthCheck(
        kind=kind, path=path, interval=interval, timeout=timeout,
        expect_status=_bounded("switch.health.expect_status", data.get("expect_status"), 100, 599,
                               integer=True, default=defaults.expect_status),
        rise=_bounded("switch.health.rise", data.get("rise"), 1, 100, integer=True,
                      default=defaults.rise),
        fall=_bounded("switch.health.fall", data.get("fall"), 1, 100, integer=True,
                      default=defaults.fall))


def last_entries(resources: Mapping[str, Any] | None) -> dict:
    """`{cpu: [0.5, 1.0], memory: 64}` -> `{cpu: 1.0, memory: 64}`: what a
    virtual node added later gets."""
    return {key: (value[-1] if isinstance(value, (list, tuple)) and value else
                  None if isinstance(value, (list, tuple)) else value)
            for key, value in (resources or {}).items()}


def parse_on_demand(data: Any, nodes: int, template: Resources) -> OnDemand | None:
    """`on_demand: {max_nodes: N, idle_seconds: S}`; each node it deploys gets
    its own `resources`, else the spec's template."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise InvalidSpec("on_demand must be a mapping like {max_nodes: 2, idle_seconds: 300}")
    _check_fields("on_demand", data, _ON_DEMAND_FIELDS)
    if data.get("max_nodes") is None:
        raise InvalidSpec("on_demand.max_nodes is required (the most virtual nodes to deploy)")
    max_nodes = _bounded("on_demand.max_nodes", data.get("max_nodes"), 1, MAX_VNODES_PER_SERVICE,
                         integer=True)
    if nodes > max_nodes:
        raise InvalidSpec(f"nodes ({nodes}) is more than on_demand.max_nodes ({max_nodes})")
    idle = _bounded("on_demand.idle_seconds", data.get("idle_seconds"), 1, 30 * 86400,
                    default=300.0)
    own = data.get("resources")
    if own is not None and not isinstance(own, Mapping):
        raise InvalidSpec("on_demand.resources must be a mapping like {cpu: 0.5, memory: 64}")
    warm = _bounded("on_demand.warm", data.get("warm"), 0, max_nodes, integer=True, default=0)
    policy = data.get("idle", "freeze")
    if policy not in IDLE_POLICIES:
        raise InvalidSpec(f"on_demand.idle must be one of {', '.join(IDLE_POLICIES)} (what an idle "
                          f"service's guests become), got {policy!r}")
    return OnDemand(max_nodes=max_nodes, idle_seconds=idle,
                    resources=expand_resources(1, own)[0] if own is not None else template,
                    warm=int(warm), idle=policy)


def parse_egress(text: Any) -> EgressRule:
    """`CIDR:PORT` or `CIDR:LOW-HIGH` (an address alone is a /32)."""
    usage = "network.egress entries look like 192.0.2.0/24:443 or 10.1.0.0/16:8000-8099"
    if not isinstance(text, str) or ":" not in text:
        raise InvalidSpec(f"{usage}, got {text!r}")
    where, _, ports = text.rpartition(":")
    try:
        network = ipaddress.IPv4Network(where, strict=False)
    except ValueError:
        raise InvalidSpec(f"network.egress: {where!r} is not an IPv4 network ({usage})") from None
    low, dash, high = ports.partition("-")
    if not low.isdigit() or (dash and not high.isdigit()):
        raise InvalidSpec(f"network.egress: {ports!r} is not a port or a port range ({usage})")
    low_port, high_port = int(low), int(high) if dash else int(low)
    if not 1 <= low_port <= high_port <= 65535:
        raise InvalidSpec(f"network.egress: ports must lie from 1 to 65535, lowest first, got {ports!r}")
    return EgressRule(str(network), low_port, high_port)


def parse_network(data: Any) -> NetworkSpec:
    """`network: {peers: true, egress: [CIDR:PORT, ...]}`."""
    if data is None:
        return NetworkSpec()
    if not isinstance(data, Mapping):
        raise InvalidSpec("network must be a mapping like {peers: false, egress: ['192.0.2.0/24:443']}")
    _check_fields("network", data, _NETWORK_FIELDS)
    peers = data.get("peers", True)
    if peers is None:
        peers = True
    if not isinstance(peers, bool):
        raise InvalidSpec(f"network.peers must be true or false, got {peers!r}")
    egress = data.get("egress") or []
    if isinstance(egress, str):
        egress = [egress]
    if not isinstance(egress, (list, tuple)):
        raise InvalidSpec("network.egress must be a list like ['192.0.2.0/24:443']")
    if len(egress) > MAX_EGRESS_RULES:
        raise InvalidSpec(f"network.egress holds {len(egress)} rules; at most {MAX_EGRESS_RULES}")
    rules = tuple(dict.fromkeys(parse_egress(rule) for rule in egress))
    return NetworkSpec(peers=peers, egress=rules)


def parse_switch(data: Any) -> SwitchSpec:
    switch = data or {}
    if not isinstance(switch, Mapping):
        raise InvalidSpec("switch must be a mapping like {listen: '127.0.0.1:8080'}")
    _check_fields("switch", switch, _SWITCH_FIELDS)
    policy = switch.get("policy") or DEFAULT_POLICY
    if policy not in POLICIES:
        raise InvalidSpec(f"unknown switch policy {policy!r} (known: {', '.join(POLICIES)})")
    mode = switch.get("mode") or DEFAULT_SWITCH_MODE
    if mode not in SWITCH_MODES:
        raise InvalidSpec(f"unknown switch mode {mode!r} (known: {', '.join(SWITCH_MODES)})")
    return SwitchSpec(listen=check_listen(switch.get("listen")), policy=policy, mode=mode,
                      health=parse_health(switch.get("health")),
                      drain_seconds=_bounded("switch.drain_seconds", switch.get("drain_seconds"),
                                             0, 3600, default=SwitchSpec.drain_seconds))


def _check_fields(kind: str, data: Mapping, known: set[str]) -> None:
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise InvalidSpec(f"unknown {kind} field(s): {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(known))})")


def parse_spec(data: Any) -> ServiceSpec:
    """Validate a spec dict (YAML document, flags, or decoded protobuf)."""
    if not isinstance(data, Mapping):
        raise InvalidSpec("a service spec must be a mapping of fields")
    _check_fields("spec", data, _SPEC_FIELDS)
    name = check_dns_label("service", data.get("name"), SERVICE_NAME_MAX)
    image = check_image_ref(data.get("image"))
    nodes = data.get("nodes", 1)
    if isinstance(nodes, bool) or not isinstance(nodes, int):
        raise InvalidSpec(f"nodes: {nodes!r} is not a whole number")
    if not 0 <= nodes <= MAX_VNODES_PER_SERVICE:
        raise InvalidSpec(f"nodes must be between 0 and {MAX_VNODES_PER_SERVICE}, got {nodes}")
    hypervisor = data.get("hypervisor") or ""
    if hypervisor:
        check_hypervisor_name(hypervisor)
    port = data.get("port", DEFAULT_PORT)
    if port in (None, 0):
        port = DEFAULT_PORT
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidSpec(f"port must be a whole number from 1 to 65535, got {port!r}")
    resources = data.get("resources")
    if resources is not None and not isinstance(resources, Mapping):
        raise InvalidSpec("resources must be a mapping like {cpu: 0.5, memory: 64}")
    per_node = expand_resources(nodes, resources)
    # Checked whatever the node count: a service created at zero nodes keeps
    # these for the nodes it grows later.
    template = expand_resources(1, last_entries(resources))[0]
    switch = parse_switch(data.get("switch"))
    on_demand = parse_on_demand(data.get("on_demand"), nodes, template)
    cpu_cap = data.get("cpu_cap", False)
    if cpu_cap is None:
        cpu_cap = False
    if not isinstance(cpu_cap, bool):
        raise InvalidSpec(f"cpu_cap must be true or false, got {cpu_cap!r}")
    boot_timeout = data.get("boot_timeout")
    boot_timeout = 0.0 if boot_timeout in (None, 0) else _bounded(
        "boot_timeout (seconds)", boot_timeout, BOOT_TIMEOUT_MIN, BOOT_TIMEOUT_MAX)
    return ServiceSpec(
        name=name, image=image, nodes=nodes, hypervisor=hypervisor, port=port, cpu_cap=cpu_cap,
        resources=per_node, switch=switch, on_demand=on_demand, template=template,
        network=parse_network(data.get("network")), boot_timeout=boot_timeout)


def validate_spec(spec: ServiceSpec) -> ServiceSpec:
    """Re-check a spec that arrived already structured (over gRPC)."""
    if len(spec.resources) != spec.nodes:
        raise InvalidSpec(f"{len(spec.resources)} resource entries given for {spec.nodes} virtual "
                          "nodes; give one per virtual node")
    data = {
        "name": spec.name, "image": spec.image, "hypervisor": spec.hypervisor,
        "nodes": spec.nodes, "port": spec.port, "cpu_cap": spec.cpu_cap,
        "resources": ({key: [getattr(r, key) for r in spec.resources] for key in RESOURCE_BOUNDS}
                      if spec.nodes else spec.template.as_dict()),
        "switch": spec.switch.as_dict(),
    }
    if spec.on_demand is not None:
        data["on_demand"] = spec.on_demand.as_dict()
    data["network"] = spec.network.as_dict()
    data["boot_timeout"] = spec.boot_timeout
    return parse_spec(data)


def share_weight(resources: Resources) -> float:
    """A virtual node's balancing weight: its CPU share (the 1:2 rule of Jiang & Xu's SODA paper, README.rst)."""
    return resources.cpu
