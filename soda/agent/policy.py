"""The node's guard against its own guests, in nftables: SODA's tables
`bridge soda` and `inet soda` in the namespace that holds the node's
bridge. Guests are hostile: nothing a guest sends is trusted.

- `GuestGuard` (bridge family, prerouting, per TAP): a guest's frames leave
  its TAP only with its own MAC, and as IPv4 or ARP with its own address;
  IPv6 (the guest kernel's link-local chatter; the fabric is IPv4) is
  dropped; anything else (another MAC or address, a gratuitous ARP for
  someone else's address, VLAN tags) is dropped and counted in the TAP's
  counter `spoof_<tap>`. Installed when the TAP is plugged, removed with it.
- `NodePolicy` (inet family; bridged traffic reaches it through
  br_netfilter, which it switches on): what each local guest may reach and
  be reached by, matched by address, so that it holds for guests on other
  nodes too. A guest receives only connections to its service port from
  anything that is not a guest (the Switch hosts, the node's health
  checks), replies to its own traffic, and (spec `network.peers`) traffic
  of its own service's other virtual nodes, wherever they run. It sends
  only replies, to its peers, and to the spec's `network.egress` rules:
  other services' guests, the node's addresses (gateway, uplink, anything
  local), the Master and the fabric are closed. A local address the policy
  does not know yet (a guest placed a moment ago) is closed both ways.
  Packets a guest sends that the policy drops count in `drop_<address>`.
- `desired_policy()` (pure) turns the Master's endpoint sets into what the
  node needs; `render_policy()` (pure) turns that into one nft script
  that replaces every chain, set and map at once (one nft transaction:
  atomic) while keeping the counters of guests that stay.
- `PolicyFollower`: a thread that follows the Master's endpoint stream
  (`watch_endpoints`, as the Switch does) and syncs the policy.

nft runs as a program (argv lists, `ip netns exec` for a namespace): one
script is one transaction. Both tables go with `remove()` (node teardown);
they outlive the Agent on purpose, like the routes: guests stay fenced
while no Agent runs.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from soda.backoff import Backoff
from soda.errors import SodaError
from soda.follow import Watching, follow
from soda.model.spec import EgressRule, NetworkSpec
from soda.model.switching import EndpointSet

log = logging.getLogger(__name__)

TABLE = "soda"
NFT_TIMEOUT = 30.0
BR_NETFILTER = "net.bridge.bridge-nf-call-iptables"
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
# A new stream's snapshot is taken as complete once no event came for this
# long: only then are services it did not name dropped (see PolicyFollower).
SETTLE_SECONDS = 1.0
# Events arriving together are applied in one nft run.
BATCH_SECONDS = 0.05


class PolicyError(SodaError):
    """The node's policy could not be read or written."""


# ---- running nft --------------------------------------------------------------

class Nft:
    """nft in one network namespace ("" = this process's). Every script is
    one transaction: it applies whole or not at all."""

    def __init__(self, netns: str = ""):
        self.netns = netns

    def _argv(self, *args: str) -> list[str]:
        return (["ip", "netns", "exec", self.netns] if self.netns else []) + list(args)

    def _run(self, argv: list[str], stdin: str | None = None) -> str:
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=NFT_TIMEOUT)
        except FileNotFoundError:
            raise PolicyError(f"{argv[0]} is not installed: install nftables") from None
        except subprocess.TimeoutExpired:
            raise PolicyError(f"{' '.join(argv)} did not finish within {NFT_TIMEOUT:.0f} s") from None
        if done.returncode != 0:
            raise PolicyError(" ".join(done.stderr.split()) or f"{argv[0]} exited {done.returncode}")
        return done.stdout

    def apply(self, script: str) -> None:
        if script.strip():
            try:
                self._run(self._argv("nft", "-f", "-"), script)
            except PolicyError as exc:
                raise PolicyError(f"nft refused the node policy{self._where()}: {exc}") from None

    def objects(self, family: str) -> dict[str, dict[str, dict]]:
        """kind ("chain", "set", "map", "counter") -> name -> its JSON, of
        SODA's table of `family`; empty when there is no such table."""
        try:
            text = self._run(self._argv("nft", "-j", "list", "table", family, TABLE))
        except PolicyError as exc:
            if "No such file or directory" in str(exc):
                return {}
            raise PolicyError(f"cannot read table {family} {TABLE}{self._where()}: {exc}") from None
        found: dict[str, dict[str, dict]] = {}
        for item in json.loads(text).get("nftables", []):
            for kind, body in item.items():
                if kind in ("chain", "set", "map", "counter"):
                    found.setdefault(kind, {})[body["name"]] = body
        return found

    def counters(self, family: str) -> dict[str, int]:
        """Packets counted by each named counter of SODA's `family` table."""
        return {name: body.get("packets", 0) for name, body in self.objects(family).get("counter", {}).items()}

    def delete_table(self, family: str) -> None:
        if self.objects(family):
            self.apply(f"delete table {family} {TABLE}\n")

    def enable_bridge_filtering(self) -> None:
        """Bridged IPv4 through the inet hooks (br_netfilter), with conntrack:
        guests on one bridge reach each other without routing, and only so
        does the policy see them."""
        try:
            self._run(self._argv("sysctl", "-q", "-w", f"{BR_NETFILTER}=1"))
        except PolicyError as exc:
            raise PolicyError(f"cannot switch on {BR_NETFILTER}{self._where()} ({exc}): the kernel needs "
                              f"br_netfilter (modprobe br_netfilter) for guests on one bridge to be "
                              f"kept apart") from None

    def _where(self) -> str:
        return f" in network namespace {self.netns}" if self.netns else ""


def _name(text: str) -> str:
    """An nft identifier for an address or a service name (DNS labels hold
    no '_' and addresses no '_': the mapping is one to one)."""
    return text.replace(".", "_").replace("-", "_")


# ---- anti-spoofing ------------------------------------------------------------

class GuestGuard:
    """Per TAP: frames leave it only with the guest's MAC and address."""

    def __init__(self, nft: Nft):
        self.nft = nft

    @staticmethod
    def chain(tap: str) -> str:
        return f"guard_{tap}"

    @staticmethod
    def counter(tap: str) -> str:
        return f"spoof_{tap}"

    def guard(self, tap: str, mac: str, address: str) -> None:
        """Install (or replace) the TAP's guard; idempotent, one transaction."""
        ipaddress.IPv4Address(address)
        chain, counter = self.chain(tap), self.counter(tap)
        drop = f'counter name "{counter}" drop'
        lines = [
            f"add table bridge {TABLE}",
            f"add chain bridge {TABLE} prerouting {{ type filter hook prerouting priority -200; policy accept; }}",
            f"add map bridge {TABLE} guards {{ type ifname : verdict; }}",
            f"add counter bridge {TABLE} {counter}",
            f"add chain bridge {TABLE} {chain}",
            f"flush chain bridge {TABLE} {chain}",
            f"add rule bridge {TABLE} {chain} ether saddr != {mac} {drop}",
            f"add rule bridge {TABLE} {chain} arp saddr ether != {mac} {drop}",
            f"add rule bridge {TABLE} {chain} arp saddr ip != {address} {drop}",
            f"add rule bridge {TABLE} {chain} ether type arp return",
            f"add rule bridge {TABLE} {chain} ip saddr != {address} {drop}",
            f"add rule bridge {TABLE} {chain} ether type ip return",
            # The guest kernel has IPv6 for services that listen on [::]
            # (link-local only); the fabric is IPv4. Its neighbour and
            # multicast chatter is dropped but is not spoofing.
            f"add rule bridge {TABLE} {chain} ether type ip6 drop",
            f"add rule bridge {TABLE} {chain} {drop}",
        ]
        existing = self.nft.objects("bridge")
        # The map and the rule that dispatches on it come in one transaction:
        # a table with the map has the rule.
        if "guards" not in existing.get("map", {}):
            lines += [f"flush chain bridge {TABLE} prerouting",
                      f"add rule bridge {TABLE} prerouting iifname vmap @guards"]
        if tap in self._guarded(existing):
            lines.append(f'delete element bridge {TABLE} guards {{ "{tap}" }}')
        lines.append(f'add element bridge {TABLE} guards {{ "{tap}" : jump {chain} }}')
        self.nft.apply("\n".join(lines) + "\n")

    def unguard(self, tap: str) -> None:
        """Remove the TAP's guard and counter; nothing to remove is fine."""
        existing = self.nft.objects("bridge")
        lines = []
        if tap in self._guarded(existing):
            lines.append(f'delete element bridge {TABLE} guards {{ "{tap}" }}')
        if self.chain(tap) in existing.get("chain", {}):
            lines += [f"flush chain bridge {TABLE} {self.chain(tap)}",
                      f"delete chain bridge {TABLE} {self.chain(tap)}"]
        if self.counter(tap) in existing.get("counter", {}):
            lines.append(f"delete counter bridge {TABLE} {self.counter(tap)}")
        self.nft.apply("\n".join(lines) + "\n" if lines else "")

    def drops(self) -> dict[str, int]:
        """TAP -> frames dropped as spoofed."""
        return {name[len("spoof_"):]: packets for name, packets in self.nft.counters("bridge").items()
                if name.startswith("spoof_")}

    def _guarded(self, existing: Mapping[str, Mapping[str, dict]]) -> set[str]:
        body = existing.get("map", {}).get("guards", {})
        return {elem[0] for elem in body.get("elem", []) if isinstance(elem, list)}

    def remove(self) -> None:
        self.nft.delete_table("bridge")


# ---- the policy ---------------------------------------------------------------

@dataclass(frozen=True)
class ServicePolicy:
    """What the node needs of one service that has a guest here."""
    name: str
    port: int
    network: NetworkSpec
    members: frozenset[str]          # every guest address of the service, on any node


@dataclass(frozen=True)
class DesiredPolicy:
    """The node's whole policy."""
    subnet: str                                     # this node's guest subnet
    open_addresses: tuple[str, ...]                 # the node's own addresses in it (gateway, uplink)
    local: Mapping[str, str] = field(default_factory=dict)        # local guest address -> service
    services: Mapping[str, ServicePolicy] = field(default_factory=dict)
    guests: frozenset[str] = frozenset()            # every guest address of the cluster


def desired_policy(sets: Iterable[EndpointSet], subnet: str, open_addresses: Iterable[str]) -> DesiredPolicy:
    """The policy the endpoint sets call for on the node of `subnet`."""
    network = ipaddress.IPv4Network(subnet)
    open_addresses = tuple(sorted(set(open_addresses)))
    local: dict[str, str] = {}
    services: dict[str, ServicePolicy] = {}
    guests: set[str] = set()
    for es in sets:
        if es.deleted:
            continue
        members = {e.address for e in es.endpoints if e.address}
        guests |= members
        here = [e for e in es.endpoints if e.address and ipaddress.IPv4Address(e.address) in network
                and e.address not in open_addresses]
        if not here:
            continue
        for e in here:
            local[e.address] = es.service
        services[es.service] = ServicePolicy(es.service, here[0].port, es.network, frozenset(members))
    return DesiredPolicy(subnet=str(network), open_addresses=open_addresses, local=local,
                         services=services, guests=frozenset(guests))


def _elements(items: Iterable[str]) -> str:
    return ", ".join(sorted(items))


def _egress_element(rule: EgressRule) -> str:
    ports = str(rule.port_low) if rule.port_low == rule.port_high else f"{rule.port_low}-{rule.port_high}"
    return f"{rule.network} . {ports}"


# The base chains, each named after its hook.
BASE_CHAINS = ("forward", "input", "output")


def render_policy(desired: DesiredPolicy, existing: Mapping[str, Mapping[str, Any]]) -> str:
    """One nft script that makes SODA's inet table `desired` from what
    exists (`Nft.objects("inet")`): every chain, set and map rebuilt,
    everything no longer wanted deleted, counters of guests that stay kept."""
    t = f"inet {TABLE}"
    out = [f"add table {t}"]
    for name in BASE_CHAINS:
        out.append(f"add chain {t} {name} {{ type filter hook {name} priority 0; policy accept; }}")
    out += [f"add map {t} from_guest {{ type ipv4_addr : verdict; }}",
            f"add map {t} to_guest {{ type ipv4_addr : verdict; }}",
            f"add set {t} guests {{ type ipv4_addr; }}"]
    chains, sets = [], []
    for svc in desired.services.values():
        n = _name(svc.name)
        chains += [f"out_{n}", f"in_{n}"]
        sets.append(f"m_{n}")
        if svc.network.egress:
            sets.append(f"e_{n}")
    counters = [f"drop_{_name(a)}" for a in desired.local]
    for name in counters:
        out.append(f"add counter {t} {name}")
    for name in sets:
        kind = "ipv4_addr . inet_service; flags interval" if name.startswith("e_") else "ipv4_addr"
        out.append(f"add set {t} {name} {{ type {kind}; }}")
    for name in chains:
        out.append(f"add chain {t} {name}")
    # Empty what stays, then delete what goes: nothing refers to it any more.
    for name in (*BASE_CHAINS, *chains):
        out.append(f"flush chain {t} {name}")
    out += [f"flush map {t} from_guest", f"flush map {t} to_guest", f"flush set {t} guests"]
    for name in sets:
        out.append(f"flush set {t} {name}")
    for name in sorted(set(existing.get("chain", {})) - set(BASE_CHAINS) - set(chains)):
        out += [f"flush chain {t} {name}", f"delete chain {t} {name}"]
    for name in sorted(set(existing.get("set", {})) - {"guests"} - set(sets)):
        out.append(f"delete set {t} {name}")
    for name in sorted(set(existing.get("counter", {})) - set(counters)):
        out.append(f"delete counter {t} {name}")

    # Contents.
    if desired.guests:
        out.append(f"add element {t} guests {{ {_elements(desired.guests)} }}")
    for svc in desired.services.values():
        n = _name(svc.name)
        mine = [a for a, s in desired.local.items() if s == svc.name]
        if svc.members:
            out.append(f"add element {t} m_{n} {{ {_elements(svc.members)} }}")
        if svc.network.egress:
            out.append(f"add element {t} e_{n} {{ {', '.join(_egress_element(r) for r in svc.network.egress)} }}")
        # What a guest of the service sends (forwarded: to other guests,
        # the fabric, the Master, anywhere).
        if svc.network.peers:
            out.append(f"add rule {t} out_{n} ip daddr @m_{n} accept")
        if svc.network.egress:
            out.append(f"add rule {t} out_{n} ip daddr . tcp dport @e_{n} accept")
            out.append(f"add rule {t} out_{n} ip daddr . udp dport @e_{n} accept")
        drop_map = ", ".join(f'{a} : "drop_{_name(a)}"' for a in sorted(mine))
        out.append(f"add rule {t} out_{n} counter name ip saddr map {{ {drop_map} }} drop")
        # What a guest of the service receives.
        if svc.network.peers:
            out.append(f"add rule {t} in_{n} ip saddr @m_{n} accept")
        out.append(f"add rule {t} in_{n} ip saddr @guests drop")
        out.append(f"add rule {t} in_{n} tcp dport {svc.port} accept")
        out.append(f"add rule {t} in_{n} drop")
        for a in sorted(mine):
            out.append(f"add element {t} from_guest {{ {a} : jump out_{n} }}")
            out.append(f"add element {t} to_guest {{ {a} : jump in_{n} }}")

    subnet, opened = desired.subnet, _elements(desired.open_addresses)
    unknown_from = f"ip saddr {subnet}" + (f" ip saddr != {{ {opened} }}" if opened else "")
    unknown_to = f"ip daddr {subnet}" + (f" ip daddr != {{ {opened} }}" if opened else "")
    local_drops = ""
    if desired.local:
        local_drops = ", ".join(f'{a} : "drop_{_name(a)}"' for a in sorted(desired.local))
    # forward: guest to guest (bridged or routed), guest to the fabric and
    # beyond, Switch hosts to guests.
    out += [f"add rule {t} forward ct state established,related accept",
            f"add rule {t} forward ip saddr vmap @from_guest",
            f"add rule {t} forward ip daddr vmap @to_guest",
            f"add rule {t} forward {unknown_from} drop",
            f"add rule {t} forward {unknown_to} drop"]
    # input: anything of this host (its addresses, its services) is closed
    # to every guest, this node's or another's, but for replies.
    out += [f"add rule {t} input ct state established,related accept"]
    if local_drops:
        out.append(f"add rule {t} input ip saddr @guests counter name ip saddr map {{ {local_drops} }} drop")
    out += [f"add rule {t} input ip saddr @guests drop",
            f"add rule {t} input {unknown_from} drop"]
    # output: this host's connections to its guests (health checks, a
    # Switch on this host) as any other host's.
    out += [f"add rule {t} output ct state established,related accept",
            f"add rule {t} output ip daddr vmap @to_guest",
            f"add rule {t} output {unknown_to} drop"]
    return "\n".join(out) + "\n"


class NodePolicy:
    """The inet half: what each guest of this node may reach."""

    def __init__(self, nft: Nft):
        self.nft = nft
        self.applied: DesiredPolicy | None = None

    def prepare(self) -> None:
        """Switch on br_netfilter in the node's namespace."""
        self.nft.enable_bridge_filtering()

    def sync(self, desired: DesiredPolicy) -> bool:
        """Make the kernel's policy `desired`; False when it already was."""
        if desired == self.applied:
            return False
        self.nft.apply(render_policy(desired, self.nft.objects("inet")))
        self.applied = desired
        return True

    def drops(self) -> dict[str, int]:
        """Guest address -> packets it sent that the policy dropped."""
        return {name[len("drop_"):].replace("_", "."): packets
                for name, packets in self.nft.counters("inet").items() if name.startswith("drop_")}

    def remove(self) -> None:
        self.nft.delete_table("inet")
        self.applied = None


# ---- following the Master ------------------------------------------------------

WATCHING = Watching(watch="endpoint watch", followed="the Master's endpoints", purpose="the guest policy",
                    keeps="stays as it is")


class PolicyFollower:
    """A thread that follows the Master's endpoint stream and keeps the
    node's policy in step. `client` (anything with `watch_endpoints()` and
    `close()`) is the follower's own: `stop()` closes it. `where()` gives
    the node's subnet and its own addresses in it (gateway, uplink), or
    None until the node is registered and configured.

    A new stream starts with every service; services the follower knew
    but the new stream has not named are kept until the stream has been
    quiet for `settle_seconds` (a reconnect must not open a gap in the
    policy of guests whose sets are still on their way), then dropped."""

    def __init__(self, client: Any, policy: NodePolicy, where, *, backoff: Backoff | None = None,
                 settle_seconds: float = SETTLE_SECONDS, clock=time.monotonic):
        self.client = client
        self.policy = policy
        self.where = where
        self.backoff = backoff or Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        self.settle_seconds = settle_seconds
        self.clock = clock
        self.sets: dict[str, EndpointSet] = {}
        self.syncs = 0
        self.problem = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._applier: threading.Thread | None = None
        self._stream_seen: set[str] | None = None     # services the current stream named, until settled
        self._last_event = 0.0
        self._scope = None                             # where() when last applied
        self._opening = False                          # the next event is a new stream's first

    def start(self) -> None:
        log.info("guest network policy: following the Master's endpoints")
        self._thread = threading.Thread(target=self.run, name="soda-policy-watch", daemon=True)
        self._applier = threading.Thread(target=self._apply_loop, name="soda-policy", daemon=True)
        self._thread.start()
        self._applier.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._dirty.set()
        self.client.close()
        for thread in (self._thread, self._applier):
            if thread is not None:
                thread.join(timeout)

    # The watch: one thread reads the stream and marks the policy dirty;
    # another applies it, so that a burst of events is one nft run.
    def run(self) -> None:
        follow(self.client.watch_endpoints, self._record, stop=self._stop, backoff=self.backoff, log=log,
               names=WATCHING, on_open=self._stream_opens)

    def _stream_opens(self) -> None:
        with self._lock:
            self._opening = True

    def _record(self, es: EndpointSet) -> None:
        with self._lock:
            if self._opening:
                self._stream_seen = set()      # a new stream's snapshot begins
                self._opening = False
            if self._stream_seen is not None:       # None: this stream's snapshot is in
                self._stream_seen.add(es.service)
            self._last_event = self.clock()
            if es.deleted:
                self.sets.pop(es.service, None)
            else:
                self.sets[es.service] = es
        self._dirty.set()

    def _drop_unseen(self) -> None:
        """Once a new stream's snapshot is in (no event for `settle_seconds`),
        the services it did not name were deleted while the watch was down."""
        with self._lock:
            if self._stream_seen is None or self.clock() - self._last_event < self.settle_seconds:
                return
            gone = set(self.sets) - self._stream_seen
            for name in gone:
                del self.sets[name]
            self._stream_seen = None
        if gone:
            log.info("services gone while the endpoint watch was down: %s", ", ".join(sorted(gone)))
            self._dirty.set()

    def _apply_loop(self) -> None:
        failing = False
        while not self._stop.is_set():
            self._dirty.wait(self.settle_seconds)
            if self._stop.is_set():
                return
            self._drop_unseen()
            if self.where() != self._scope:
                self._dirty.set()       # the node was (re)configured: its subnet may be new
            if not self._dirty.is_set():
                continue
            time.sleep(BATCH_SECONDS)
            self._dirty.clear()
            try:
                self.apply_now()
                if failing:
                    log.info("guest network policy applied again")
                failing = False
                self.problem = ""
            except SodaError as exc:
                self.problem = str(exc)
                if not failing:
                    log.error("guest network policy: %s (retrying)", exc)
                failing = True
                self._stop.wait(1.0)
                self._dirty.set()

    def apply_now(self) -> bool:
        where = self._scope = self.where()
        if where is None:
            return False
        subnet, open_addresses = where
        with self._lock:
            sets = list(self.sets.values())
        changed = self.policy.sync(desired_policy(sets, subnet, open_addresses))
        if changed:
            self.syncs += 1
        return changed
