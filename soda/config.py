"""Configuration of SODA's daemons: YAML files into frozen dataclasses.

Defaults live in the dataclasses; a file may set any field; unknown keys are
an error. Loaded only from a daemon's `main()`, never at import time, and
the same way by all four (`effective`): defaults, then the file, then the
command-line flags that were given, then checked.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

from soda.errors import InvalidSpec

T = TypeVar("T")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class TlsConfig:
    """A party's TLS files, made by `sodactl pki`: the cluster CA's
    certificate, and this party's own certificate and key. All three or
    none; none means plaintext, which only a Master started with
    --insecure on loopback accepts."""
    ca: str = ""
    cert: str = ""
    key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.ca or self.cert or self.key)


@dataclass(frozen=True)
class MasterConfig:
    listen: str = "127.0.0.1:7070"
    # Mutual TLS on every connection (soda.master.access); `crl` is the
    # CA's revocation list ("" = crl.pem beside tls.ca), reloaded when it
    # changes. `insecure`: plaintext and every caller an operator, refused
    # unless every listen address is loopback (development only).
    tls: TlsConfig = field(default_factory=TlsConfig)
    crl: str = ""
    insecure: bool = False
    state_dir: str = "/var/lib/soda/master"
    # The largest image a push may announce; a larger one is refused before
    # its content is sent.
    image_max_bytes: int = 64 << 30
    # Free space the Master keeps on its state dir's filesystem (the store
    # and its journal live there too); a push that would eat into it is
    # refused, before it starts and while it runs.
    image_reserve_bytes: int = 1 << 30
    # An image fetched by URL (sodactl image push --url): a read that waits
    # longer than the stall time is retried from where it stopped; the
    # whole fetch must end within the timeout.
    image_fetch_stall_seconds: float = 30.0
    image_fetch_timeout_seconds: float = 3600.0
    # Cluster address range; every physical node gets its own /node_prefix.
    cluster_cidr: str = "10.233.0.0/16"
    node_prefix: int = 24
    heartbeat_seconds: int = 2
    # A node silent for this long is LOST and its virtual nodes placed again.
    node_lost_seconds: float = 10.0
    # gRPC worker threads (made as needed): every Agent holds two streams
    # (assignments, log orders) and every Switch a few watches, each a
    # thread for as long as it is open; the last eighth are kept for single
    # calls (soda.rpc.streams). 2048 serves ~900 nodes.
    max_workers: int = 2048
    log_level: str = "INFO"


@dataclass(frozen=True)
class CapacityConfig:
    """Zero means: measure it on this machine."""
    cpu: float = 0.0
    memory: int = 0
    bandwidth: int = 0
    disk: int = 0


@dataclass(frozen=True)
class AgentConfig:
    master: str = "127.0.0.1:7070"
    # This node's certificate (sodactl pki issue agent NAME) and the CA.
    tls: TlsConfig = field(default_factory=TlsConfig)
    name: str = ""                     # default: the host name
    # Where other hosts reach this node; "" = the address of the interface
    # that carries the default route, found at start (soda.agent.address).
    address: str = ""
    state_dir: str = "/var/lib/soda/agent"
    # Drivers to offer, in order of preference; empty = every real driver
    # (not `fake`) whose fingerprint finds it usable on this host.
    hypervisors: tuple[str, ...] = ()
    # KEY=VALUE labels the node registers (soda.model.labels); placement
    # spreads a service over `zone`s. --label adds to them.
    labels: Mapping[str, str] = field(default_factory=dict)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    # One section per hypervisor driver, `{uml: {kernel: ...}}`: each driver
    # owns its section's dataclass (`Driver.Config`), and the Agent's main()
    # builds and checks every section at load (build_section).
    drivers: Mapping[str, Any] = field(default_factory=dict)
    # Guest networking: the bridge, and the namespace that holds it ("" =
    # the host's own; tests and the demo give each node its own).
    bridge: str = "soda0"
    netns: str = ""
    # The local SODA Daemon that fences real guests ("" = none: only for fake).
    daemon_socket: str = "/run/soda/daemon.sock"
    # Route other nodes' guest subnets via their addresses in the Agent's
    # namespace (soda.routing, host-gw); off: something else routes them.
    routes: bool = True
    # Guests are hostile: nftables keeps each to its own MAC and address and
    # to what its service's spec allows (soda.agent.policy). False: the
    # bridge passes everything (only to measure what the policy costs).
    policy: bool = True
    max_parallel_boots: int = 8
    reconcile_seconds: float = 1.0
    # What the image cache (state_dir/images) may take on disk; past it the
    # least recently used images and disk bases no virtual node here uses
    # are evicted (soda.agent.images). 0 = no bound.
    image_cache_bytes: int = 16 << 30
    # Guests are hostile: each service's VMMs run here as a uid of its own
    # from this range (FIRST-LAST; soda.agent.uids), with no capabilities.
    guest_uids: str = "200000-265535"
    # False: VMMs run as root, as before (only to measure what the drop costs).
    guest_uid_drop: bool = True
    # The open-files limit (RLIMIT_NOFILE) of each guest's VMM.
    guest_open_files: int = 1024
    log_level: str = "INFO"


def build_section(cls: type[T], data: Any, where: str) -> T:
    """`data` (a mapping from YAML, or None) as `cls`; `where` names it in errors."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise InvalidSpec(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InvalidSpec(f"{where}: unknown key(s) {', '.join(map(str, unknown))} "
                          f"(known: {', '.join(fields)})")
    kwargs = {}
    for key, value in data.items():
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            kwargs[key] = build_section(type(default), value, f"{where}.{key}")
        elif isinstance(default, dict) and typing.get_type_hints(cls)[key] == Mapping[str, str]:
            kwargs[key] = _strings(value, f"{where}.{key}")
        elif isinstance(default, dict):
            # Sections whose dataclasses someone else owns: checked to be
            # mappings here, built by their owner.
            if not isinstance(value, dict) or not all(
                    v is None or isinstance(v, dict) for v in value.values()):
                raise InvalidSpec(f"{where}.{key}: expected a mapping of mappings")
            kwargs[key] = {str(k): v for k, v in value.items()}
        elif isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise InvalidSpec(f"{where}.{key}: expected a list")
            kwargs[key] = tuple(value)
        elif isinstance(default, bool) or not isinstance(default, (int, float)):
            if not isinstance(value, type(default)):
                raise InvalidSpec(f"{where}.{key}: expected {type(default).__name__}, got {value!r}")
            kwargs[key] = value
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidSpec(f"{where}.{key}: expected a number, got {value!r}")
            kwargs[key] = type(default)(value)
    return cls(**kwargs)


def _strings(data: Any, where: str) -> dict[str, str]:
    """A mapping of names to short strings (`labels: {zone: a, rack: 1}`):
    YAML's integers are taken as their digits; anything else is refused
    (YAML reads an unquoted `no` or `on` as a boolean: quote it)."""
    if not isinstance(data, dict):
        raise InvalidSpec(f"{where}: expected a mapping of names to strings, got {data!r}")
    out = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InvalidSpec(f"{where}.{key}: expected a string, got {value!r} (quote it)")
        out[str(key)] = str(value)
    return out


def load(cls: type[T], path: str | None) -> T:
    """Read `path` (YAML) into `cls`; no path means all defaults."""
    if not path:
        return cls()
    import yaml         # here, not at the top: sodactl reads no config file, and starts faster
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise InvalidSpec(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InvalidSpec(f"config {path} is not valid YAML: {exc}") from None
    return build_section(cls, data, os.path.basename(path))


def with_overrides(config: T, **overrides: Any) -> T:
    """Apply command-line flags that were given (None means not given)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(config, **given) if given else config


def effective(cls: type[T], path: str | None, check: Callable[[T], T] | None = None,
              **flags: Any) -> T:
    """The config a daemon runs with: `cls`'s defaults, the YAML file at
    `path`, the flags that were given (None = not given), then checked: the
    log level here, the daemon's own rules in `check`. Raises InvalidSpec
    with a one-line reason."""
    config = with_overrides(load(cls, path), **flags)
    level = str(getattr(config, "log_level", "INFO")).upper()
    if level not in LOG_LEVELS:
        raise InvalidSpec(f"log_level {level.lower()!r}: use one of {', '.join(LOG_LEVELS)}")
    config = dataclasses.replace(config, log_level=level)
    return check(config) if check is not None else config
