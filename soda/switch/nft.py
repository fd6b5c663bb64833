"""The Switch's kernel data path (`switch.mode: l4`): nftables DNAT maps.

Owns one nftables table per Switch (`ip soda_switch` by default; the name is
configurable so that tests and benchmarks use their own) and everything in
it. For every l4 service with at least one routable virtual node (ready,
weight > 0 and, when a health source is given, healthy), the table holds one
rule that DNATs new connections to the service's listen address with
`numgen inc mod W map {slot: address . port}`, each virtual node holding a
number of the W slots proportional to its weight, in smooth weighted
round-robin order (1:2 interleaves A B B, it does not burst). NAT applies to
the first packet of a connection only: connections already set up keep
their virtual node when the map changes, which is what draining needs.

The table is always rewritten whole, in one `nft -f -` transaction (the
kernel commits a batch atomically: a packet sees the old or the new rules,
never none). While the Switch runs, the base chains are only deleted with
the table in the transaction that recreates them (a new route_localnet
record, below), so the NAT hooks stay registered and established
connections keep working.
The table's comment names the Switch process that wrote it (pid and start
time): `start()` takes over a table of its name left by a Switch that is
gone and leaves alone one whose Switch still runs. A table taken over keeps
forwarding as it is (established connections keep their NAT, new ones go
where they went) until `take_over()`, called once the Master's endpoints
are known, replaces it whole in one transaction: a restarted Switch leaves
no moment without rules. `close()` stops new connections, lets open ones
drain, then deletes the table.

The userspace proxy keeps a listener on every l4 service's address too: the
DNAT (prerouting/output) takes new connections before they reach it, and
it answers whenever the kernel has nowhere to send one (no ready or healthy
node: the service gets no rule; a service held at zero nodes; nft failing).
Each DNATed connection holds a conntrack entry until it ends (TIME_WAIT:
120 s by default); a host serving many short connections needs
`nf_conntrack_max` sized for that, which the Switch does not change.

Hooks: prerouting for clients elsewhere, output for clients on this host.
Connections the table DNATs are masqueraded on their way out (all of them by
default, so the return path does not depend on the virtual nodes' routes;
with `masquerade_all=False` only those from loopback sources, which cannot
leave the host). A service listening on 127.0.0.0/8 also needs
`route_localnet` on the devices that lead to its virtual nodes, or the
kernel drops the rewritten packets as martians; the path sets it on those
devices and restores them on close. The values it found are kept in the
kernel, in the table's comment after the owner (`localnet DEVICE=VALUE,...`),
written before any device is changed: a Switch that takes over the table of
one that was killed restores them when it stops (or hands them on, if it is
killed too). nft keeps a comment to 128 characters: a device whose value does
not fit is still set, with a warning that only a clean stop restores it. The
kernel takes a table's comment when it creates the table only, so recording a
new device rewrites the table as `replace` does (one transaction still).

Only this module runs nft. Commands are argv lists through an
injectable async runner, so unit tests see the generated ruleset without a
kernel. IPv4 only: an l4 service on an IPv6 address is refused with a
clear error (the userspace proxy still serves it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from functools import reduce
from typing import Awaitable, Callable, Collection, Iterable, Protocol

from soda import command
from soda.addresses import split_host_port
from soda.errors import CommandError, InvalidSpec, SodaError, WrongState
from soda.model.switching import Endpoint, EndpointSet
from soda.procid import proc_starttime
from soda.switch.balancer import Peer, scaled_weight, smooth_pick

log = logging.getLogger("soda.switch.nft")

MODE_L4 = "l4"
DEFAULT_TABLE = "soda_switch"
# Upper bound of a service's numgen modulus: enough to hold weights to 1 %
# of each other, small enough that the anonymous map stays cheap to swap.
MAX_SLOTS = 128
COMMAND_TIMEOUT = 10.0
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
ANY = "0.0.0.0"
# The table's comment: its owner, then the route_localnet values it changed.
OWNER_RE = re.compile(r'comment "soda-switch pid (\d+) start (\d+)(?: localnet ([^"]*))?"')
# The longest comment nft accepts.
COMMENT_MAX = 128
# Device names the localnet record holds: a safe part of what Linux allows
# (IFNAMSIZ - 1 characters); sysctl directories that are not devices are refused.
DEVICE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
NOT_DEVICES = frozenset({".", "..", "all", "default"})
SYSCTL_INT_RE = re.compile(r"-?\d{1,10}")

Runner = Callable[[list[str], "str | None"], Awaitable[str]]


async def run_command(argv: list[str], stdin: str | None = None, timeout: float = COMMAND_TIMEOUT) -> str:
    """The default Runner: argv's stdout; CommandError on failure."""
    return await command.run_async(argv, timeout=timeout, stdin=stdin)


# ---- pure: weights to slots, services to rules, rules to a ruleset ----------

def weight_slots(endpoints: Iterable[Endpoint], max_slots: int = MAX_SLOTS) -> tuple[Endpoint, ...]:
    """The numgen slots of a service: each endpoint as many times as its share
    of the weight, at most `max_slots` in all (each endpoint keeps one at
    least), interleaved by smooth weighted round robin. Endpoints with no
    positive weight get none."""
    weighted = [(ep, scaled_weight(ep.weight)) for ep in endpoints]
    weighted = [(ep, w) for ep, w in weighted if w > 0]
    if not weighted:
        return ()
    divisor = reduce(math.gcd, (w for _, w in weighted))
    counts = [w // divisor for _, w in weighted]
    total = sum(counts)
    if total > max_slots:
        counts = _apportion(counts, max(max_slots, len(counts)))
    peers = [Peer(ep, count) for (ep, _), count in zip(weighted, counts)]
    return tuple(smooth_pick(peers).endpoint for _ in range(sum(counts)))


def _apportion(counts: list[int], slots: int) -> list[int]:
    """`slots` shared in proportion to `counts` (largest remainder), each >= 1."""
    total = sum(counts)
    shares = [max(1, c * slots // total) for c in counts]
    by_remainder = sorted(range(len(counts)), key=lambda i: (-(counts[i] * slots % total), i))
    for i in by_remainder:
        if sum(shares) >= slots:
            break
        shares[i] += 1
    while sum(shares) > slots:      # the "at least one" floors overshot: take from the largest
        i = max(range(len(shares)), key=lambda j: shares[j])
        shares[i] -= 1
    return shares


@dataclass(frozen=True)
class L4Rule:
    """One service as the kernel sees it: where it listens and its slots."""
    service: str
    host: str                               # IPv4 literal; 0.0.0.0 = every local address
    port: int
    slots: tuple[tuple[str, int], ...]      # (address, port) per numgen slot

    @property
    def loopback(self) -> bool:
        return self.host != ANY and ipaddress.ip_address(self.host) in LOOPBACK


def l4_listen(listen: str, listen_hosts: Collection[str] = ()) -> tuple[str, int]:
    """A service's listen address as (IPv4 host, port); InvalidSpec when the
    kernel path cannot serve it."""
    host, port = split_host_port(listen)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise InvalidSpec(f"listen address {listen!r}: mode l4 needs an IPv4 address, not a name") from None
    if address.version != 4:
        raise InvalidSpec(f"listen address {listen!r}: mode l4 supports IPv4 only")
    if listen_hosts and host not in listen_hosts:
        raise InvalidSpec(f"host {host} is not in this Switch's listen_hosts ({', '.join(sorted(listen_hosts))})")
    return str(address), port


def l4_rule(es: EndpointSet, routable: Callable[[Endpoint], bool] = lambda ep: True,
            listen_hosts: Collection[str] = (), max_slots: int = MAX_SLOTS) -> L4Rule:
    """The rule of an l4 service: its ready, routable endpoints by weight."""
    host, port = l4_listen(es.listen, listen_hosts)
    endpoints = []
    for ep in sorted(es.endpoints, key=lambda e: e.vnode):
        if not ep.ready or not routable(ep):
            continue
        try:
            address = ipaddress.ip_address(ep.address)
        except ValueError:
            log.warning("service %s: %s has no IPv4 address (%r): not routed by the kernel path",
                        es.service, ep.vnode, ep.address)
            continue
        if address.version == 4 and 0 < ep.port <= 65535:
            endpoints.append(ep)
    slots = tuple((ep.address, ep.port) for ep in weight_slots(endpoints, max_slots))
    return L4Rule(es.service, host, port, slots)


def _quote(text: str) -> str:
    return '"' + "".join(c for c in text if c.isprintable() and c not in '"\\') + '"'


def _match(rule: L4Rule) -> str:
    if rule.host == ANY:
        return f"fib daddr type local tcp dport {rule.port}"
    return f"ip daddr {rule.host} tcp dport {rule.port}"


def _dnat(rule: L4Rule) -> str:
    entries = ", ".join(f"{i} : {address} . {port}" for i, (address, port) in enumerate(rule.slots))
    # The counter sees the first packet of each connection only (NAT chains
    # do): it counts the connections the kernel path took.
    return (f"{_match(rule)} counter dnat ip to numgen inc mod {len(rule.slots)} map {{ {entries} }} "
            f"comment {_quote(rule.service)}")


def _masquerade(rule: L4Rule, masquerade_all: bool) -> str:
    original = "" if rule.host == ANY else f" ct original ip daddr {rule.host}"
    source = "" if masquerade_all or rule.loopback else " ip saddr 127.0.0.0/8"
    return (f"meta l4proto tcp ct status dnat{original} ct original proto-dst {rule.port}{source} "
            f"masquerade comment {_quote(rule.service)}")


def render(table: str, rules: Iterable[L4Rule], *, owner: str = "", masquerade_all: bool = True,
           replace: bool = False) -> str:
    """The nft script that makes `table` hold exactly `rules` (services with
    no slot get no rule: their connections reach the userspace listener).

    `replace` deletes a leftover table first (start after a crash, changed
    chain layout); otherwise the table is flushed and refilled, keeping its
    base chains and so the NAT hooks. Either way it is one transaction.
    `owner` (the table's comment) names the Switch process that wrote it
    and the route_localnet values it changed; the kernel takes it when the
    table is created only (`replace`)."""
    check_table_name(table)
    rules = sorted((r for r in rules if r.slots), key=lambda r: r.service)
    lines = [f"add table ip {table}", f"{'delete' if replace else 'flush'} table ip {table}", f"table ip {table} {{"]
    if owner:
        lines.append(f"\tcomment {_quote(owner)}")
    lines += ["\tchain services {"] + [f"\t\t{_dnat(r)}" for r in rules] + ["\t}"]
    lines += ["\tchain prerouting {", "\t\ttype nat hook prerouting priority dstnat; policy accept;",
              "\t\tjump services", "\t}"]
    lines += ["\tchain output {", "\t\ttype nat hook output priority -100; policy accept;",
              "\t\tjump services", "\t}"]
    # A ct expression that stays when the last service goes: the DNAT and
    # masquerade expressions hold the namespace's connection tracking on,
    # and without a holder the kernel stops tracking (and so un-NATting)
    # the connections already forwarded, which then break instead of draining.
    lines += ["\tchain postrouting {", "\t\ttype nat hook postrouting priority srcnat; policy accept;",
              '\t\tct state established counter comment "keeps connection tracking on while the table exists"']
    lines += [f"\t\t{_masquerade(r, masquerade_all)}" for r in rules] + ["\t}", "}"]
    return "\n".join(lines) + "\n"


def check_table_name(table: str) -> str:
    if not table or len(table) > 64 or not table[0].isalpha() or \
            not all(c.isascii() and (c.isalnum() or c == "_") for c in table):
        raise InvalidSpec(f"nft table name {table!r}: letters, digits and _ only, starting with a letter")
    return table


# ---- the kernel path --------------------------------------------------------

def owner_tag(pid: int) -> str:
    return f"soda-switch pid {pid} start {proc_starttime(pid)}"


def table_comment(owner: str, localnet: dict[str, str]) -> str:
    """`owner` followed by the original route_localnet of the devices in
    `localnet` that need restoring (value other than 1), in their order, as
    many as fit in COMMENT_MAX. Devices are only ever added, so a device
    recorded once stays recorded."""
    comment = owner
    for device, value in localnet.items():
        if value == "1" or not recordable(device, value):
            continue
        entry = f"{' localnet ' if comment == owner else ','}{device}={value}"
        if len(comment) + len(entry) <= COMMENT_MAX:
            comment += entry
    return comment


def recordable(device: str, value: str) -> bool:
    """A device name and a sysctl integer the localnet record can hold."""
    return bool(DEVICE_RE.fullmatch(device)) and device not in NOT_DEVICES and bool(SYSCTL_INT_RE.fullmatch(value))


def recorded_localnet(listing: str) -> dict[str, str]:
    """device -> route_localnet before a Switch changed it, from the comment of
    a listed table. The comment is input (anyone with CAP_NET_ADMIN writes
    it): entries that are not a device name and a number are left out."""
    m = OWNER_RE.search(listing)
    if m is None or not m.group(3):
        return {}
    localnet: dict[str, str] = {}
    for entry in m.group(3)[:COMMENT_MAX].split(","):
        device, _, value = entry.partition("=")
        if recordable(device, value) and device not in localnet:
            localnet[device] = value
        else:
            log.warning("nft table comment: ignoring route_localnet entry %r", entry[:40])
    return localnet


def table_owner_alive(listing: str) -> int | None:
    """The pid of the live process that wrote a listed table, else None."""
    m = OWNER_RE.search(listing)
    if m is None:
        return None
    pid, start = int(m.group(1)), int(m.group(2))
    return pid if proc_starttime(pid) == start else None


class HealthSource(Protocol):
    """What the kernel path needs of soda.switch.health.HealthMonitor."""

    def is_healthy(self, service: str, vnode: str) -> bool: ...

    def subscribe(self, observer: Callable[[str, frozenset], None]) -> Callable[[], None]: ...


class KernelPath:
    """The l4 services of one Switch, kept in one nftables table.

    Same shape as the Proxy (`apply`, `remove`, `close`), so that the Switch
    hands it endpoint sets the same way. `health` (optional, the Switch's
    HealthMonitor) says whether a virtual node passes its checks; the path
    subscribes to it and rewrites a service's map when its healthy set
    changes. Without it, the Master's ready flag decides alone. The monitor
    must have seen an endpoint set before the path gets it (the Proxy feeds
    it; ModeDispatch applies a set to the Proxy first)."""

    def __init__(self, *, table: str = DEFAULT_TABLE, masquerade_all: bool = True,
                 listen_hosts: Collection[str] = (), netns: str = "",
                 health: HealthSource | None = None, runner: Runner = run_command,
                 max_slots: int = MAX_SLOTS):
        self.table = check_table_name(table)
        self.masquerade_all = masquerade_all
        self.listen_hosts = frozenset(listen_hosts)
        # Run every command in this network namespace (tests and benchmarks);
        # empty: the Switch's own.
        self.netns = netns
        self.health = health
        self.runner = runner
        self.max_slots = max_slots
        self._sets: dict[str, EndpointSet] = {}
        self._rules: dict[str, L4Rule] = {}
        self._lock = asyncio.Lock()
        self._installed = False          # our table is in the kernel
        # The table in the kernel is one a Switch that is gone left (start()):
        # the next transaction replaces it whole, whatever its layout.
        self._adopted = False
        # Transactions wait for take_over(): until the endpoints are known,
        # the table taken over forwards better than an empty one.
        self._held = False
        self._failed = False             # the last transaction failed: the kernel lags _rules
        # device -> route_localnet before a Switch changed it: ours, and those
        # of a Switch that was killed whose table start() took over.
        self._localnet: dict[str, str] = {}
        self._localnet_on: set[str] = set()      # devices this path has seen to be (or set to) 1
        self._routed: set[str] = set()           # virtual node addresses whose device is seen to
        self._table_comment: str | None = None   # the comment of our table in the kernel
        self._written: list[L4Rule] = []         # the rules of our table in the kernel
        self._closed = False
        self.owner = owner_tag(os.getpid())
        # Set when a live Switch already owns the table: we leave it alone.
        self._taken_by: int | None = None
        self._refreshing: set[asyncio.Task] = set()
        self._banked: dict[str, int] = {}        # service -> connections counted by rules since replaced
        self._unsubscribe = health.subscribe(self._health_changed) if health is not None else None

    # ---- the control side -------------------------------------------------
    async def apply(self, es: EndpointSet) -> None:
        """Route service `es.service` in the kernel as `es` says; a service that
        is deleted, has no listen address or is not in mode l4 is removed."""
        if es.deleted or not es.listen or es.switch.mode != MODE_L4:
            await self.remove(es.service)
            return
        async with self._lock:
            if self._closed:
                return
            try:
                rule = l4_rule(es, self._routable(es.service), self.listen_hosts, self.max_slots)
            except InvalidSpec:
                # Whatever the service had in the kernel is stale now.
                self._sets.pop(es.service, None)
                if self._rules.pop(es.service, None) is not None:
                    await self._commit()
                raise
            self._sets[es.service] = es
            if self._in_step() and self._rules.get(es.service) == rule:
                return
            self._rules[es.service] = rule
            await self._commit()
        log.info("service %s: kernel path on %s:%d, %s", es.service, rule.host, rule.port,
                 _describe_slots(rule) or "no routable virtual node (the userspace listener answers)")

    async def refresh(self, service: str) -> None:
        """Recompute a service's rule (its nodes' health changed)."""
        async with self._lock:
            es = self._sets.get(service)
            if es is None or self._closed:
                return
            rule = l4_rule(es, self._routable(service), self.listen_hosts, self.max_slots)
            if self._in_step() and rule == self._rules.get(service):
                return
            self._rules[service] = rule
            await self._commit()
        log.info("service %s: kernel path now routes to %s", service, _describe_slots(rule) or "nothing")

    async def remove(self, service: str) -> None:
        async with self._lock:
            self._sets.pop(service, None)
            self._banked.pop(service, None)
            if self._rules.pop(service, None) is None or self._closed:
                return
            await self._commit()
        log.info("service %s: kernel path removed", service)

    async def close(self, drain_seconds: float = 0.0) -> None:
        """Stop DNATing new connections, give the established ones
        `drain_seconds` (their NAT needs the table's hooks), then delete the
        table and restore route_localnet. Idempotent."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            self._held = False
            had_rules = any(r.slots for r in self._rules.values())
            self._rules.clear()
            self._sets.clear()
            try:
                if self._installed and had_rules and drain_seconds > 0:
                    await self._commit()
                    log.info("kernel path: no new connections; %g s for open ones to finish", drain_seconds)
                    await asyncio.sleep(drain_seconds)
            except CommandError as exc:
                log.error("cannot empty nft table %s: %s", self.table, exc)
            # Restored before the table goes: it holds the only record of the
            # values if this Switch is killed in between.
            await self._restore_localnet()
            try:
                if self._installed:
                    await self._delete_table()
            except CommandError as exc:
                log.error("cannot remove nft table %s: %s", self.table, exc)

    async def start(self) -> None:
        """Take over a table of our name left by a Switch that died (it keeps
        forwarding until `take_over()`); leave alone (and stay off the
        kernel path) one that a live Switch owns. Without nft (not
        installed, not root) the Switch still runs: l4 services are then
        served by the userspace proxy, with an error per service."""
        async with self._lock:
            try:
                listing = await self.runner(self._argv("nft", "list", "table", "ip", self.table), None)
            except CommandError as exc:
                level = logging.DEBUG if exc.rc in (1, 126, 127) else logging.WARNING
                log.log(level, "no nft table %s to clear: %s", self.table, exc)
                return
            pid = table_owner_alive(listing)
            if pid is not None and pid != os.getpid():
                self._taken_by = pid
                log.error("nft table %s belongs to the running soda-switch pid %d: l4 services go "
                          "through the userspace proxy (give this Switch its own nft_table)", self.table, pid)
                return
            log.info("taking over nft table %s left by a Switch that is gone: it forwards as it "
                     "is until the Master's endpoints are known", self.table)
            self._installed = self._adopted = self._held = True
            # What the dead Switch changed is ours to restore now, and to
            # record in the table that replaces its own.
            for device, value in recorded_localnet(listing).items():
                self._localnet.setdefault(device, value)
                log.info("route_localnet of %s was %s before the Switch that is gone: restored when "
                         "this one stops", device, value)

    async def take_over(self) -> None:
        """Replace the table taken over at start() with this Switch's rules,
        in one transaction; until now its updates were only recorded. Call
        once the Master's endpoints are known (its first snapshot settled).
        Nothing to do when start() took nothing over."""
        async with self._lock:
            if not self._held or self._closed:
                return
            self._held = False
            await self._commit()
        log.info("nft table %s now holds this Switch's %d l4 service(s)", self.table,
                 sum(1 for rule in self._rules.values() if rule.slots))

    # ---- introspection -----------------------------------------------------
    def rules(self) -> dict[str, L4Rule]:
        return dict(self._rules)

    async def connection_counts(self) -> dict[str, int]:
        """Connections each l4 service's DNAT rule has taken since the Switch
        started, from the kernel's counters (the proxy never sees these
        connections: idle tracking and metrics must ask here). Never goes
        back: the counts of a rule are banked before it is rewritten."""
        async with self._lock:
            live = await self._read_counters()
            return {name: self._banked.get(name, 0) + live.get(name, 0) for name in self._rules}

    async def _read_counters(self) -> dict[str, int]:
        if not self._installed:
            return {}
        try:
            listing = await self.runner(
                self._argv("nft", "-j", "list", "chain", "ip", self.table, "services"), None)
        except CommandError:
            if self._adopted:
                return {}       # a table of another layout (an older Switch's): nothing to count
            raise
        return parse_counters(listing)

    def services(self) -> set[str]:
        return set(self._rules)

    # ---- internals ---------------------------------------------------------
    def _routable(self, service: str) -> Callable[[Endpoint], bool]:
        if self.health is None:
            return lambda ep: True
        return lambda ep: self.health.is_healthy(service, ep.vnode)

    def _health_changed(self, service: str, healthy: frozenset) -> None:
        # Called on the loop by the monitor, which must not be blocked: the
        # rewrite runs as a task (in order, under the lock).
        if service not in self._sets or self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._refresh_logged(service))
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def _refresh_logged(self, service: str) -> None:
        try:
            await self.refresh(service)
        except SodaError as exc:
            log.error("service %s: cannot update the kernel path after a health change: %s", service, exc)

    def _in_step(self) -> bool:
        return self._installed and not self._failed

    def _argv(self, *argv: str) -> list[str]:
        return (["ip", "netns", "exec", self.netns] if self.netns else []) + list(argv)

    async def _commit(self) -> None:
        if self._taken_by is not None:
            raise WrongState(f"nft table {self.table} belongs to the running soda-switch pid {self._taken_by}")
        if self._held:
            return          # take_over() writes what _rules hold by then
        rules = list(self._rules.values())
        self._failed = True
        await self._allow_localnet(rules)
        await self._write(rules)
        self._failed = False

    async def _write(self, rules: list[L4Rule]) -> None:
        """One transaction: the table holds `rules`, its comment the owner and
        the route_localnet record."""
        # A rewrite starts every counter at zero: bank what they hold.
        for name, count in (await self._read_counters()).items():
            if name in self._rules:
                self._banked[name] = self._banked.get(name, 0) + count
        comment = table_comment(self.owner, self._localnet)
        # The kernel ignores the comment of a table that exists: a new one
        # needs a new table.
        replace = not self._installed or self._adopted or comment != self._table_comment
        script = render(self.table, rules, owner=comment, masquerade_all=self.masquerade_all, replace=replace)
        await self.runner(self._argv("nft", "-f", "-"), script)
        self._installed, self._adopted = True, False
        self._table_comment, self._written = comment, rules

    async def _delete_table(self) -> None:
        if self._taken_by is not None:
            return
        # `add` first makes the delete succeed whether or not the table exists.
        await self.runner(self._argv("nft", "-f", "-"), f"add table ip {self.table}\ndelete table ip {self.table}\n")
        self._installed = False

    async def _allow_localnet(self, rules: list[L4Rule]) -> None:
        """route_localnet=1 on each device that leads to a virtual node of a
        service listening on loopback: the DNATed packets keep their
        127.x source until masquerade, and their replies come back to 127.x."""
        addresses = sorted({a for r in rules if r.slots and (r.loopback or r.host == ANY) for a, _ in r.slots})
        addresses = [a for a in addresses if a not in self._routed and ipaddress.ip_address(a) not in LOOPBACK]
        devices: dict[str, str] = {}             # device -> its route_localnet now
        for address in addresses:
            out = await self.runner(self._argv("ip", "-j", "route", "get", address), None)
            routes = json.loads(out or "[]")
            device = routes[0].get("dev", "") if routes else ""
            if device and device != "lo" and device not in self._localnet_on and device not in devices:
                key = f"net/ipv4/conf/{device}/route_localnet"
                devices[device] = (await self.runner(self._argv("sysctl", "-n", key), None)).strip()
        for device, value in devices.items():
            self._localnet.setdefault(device, value)     # a device the dead Switch changed keeps its original
        changing = [device for device, value in devices.items() if value != "1"]
        if changing and table_comment(self.owner, self._localnet) != self._table_comment:
            # Recorded in the kernel before anything changes. Meanwhile the
            # table forwards as it did; a foreign one (taken over) gives way
            # to an empty one, and the userspace proxy answers for a moment.
            await self._write(self._written if self._installed and not self._adopted else [])
        recorded = recorded_localnet(f'comment "{self._table_comment or ""}"')
        for device in changing:
            await self.runner(self._argv("sysctl", "-q", "-w", f"net/ipv4/conf/{device}/route_localnet=1"), None)
            log.info("route_localnet set on %s: loopback clients reach the virtual nodes behind it", device)
            if device not in recorded:
                log.warning("route_localnet of %s (was %s) is not recorded in the nft table's comment (full, "
                            "or an unusual device name): only a clean stop of this Switch restores it",
                            device, self._localnet[device])
        self._localnet_on.update(devices)
        self._routed.update(addresses)

    async def _restore_localnet(self) -> None:
        for device, before in sorted(self._localnet.items()):
            if before and before != "1":
                try:
                    await self.runner(self._argv("sysctl", "-q", "-w",
                                                 f"net/ipv4/conf/{device}/route_localnet={before}"), None)
                except CommandError as exc:     # the device went away with its virtual nodes
                    log.debug("cannot restore route_localnet on %s: %s", device, exc)
        self._localnet.clear()
        self._localnet_on.clear()
        self._routed.clear()


def parse_counters(listing: str) -> dict[str, int]:
    """service -> counter packets, from `nft -j list chain ... services`."""
    counts: dict[str, int] = {}
    for item in json.loads(listing or "{}").get("nftables", []):
        rule = item.get("rule")
        if not rule or "comment" not in rule:
            continue
        for expr in rule.get("expr", []):
            if "counter" in expr:
                counts[rule["comment"]] = expr["counter"].get("packets", 0)
    return counts


def _describe_slots(rule: L4Rule) -> str:
    counts: dict[tuple[str, int], int] = {}
    for slot in rule.slots:
        counts[slot] = counts.get(slot, 0) + 1
    return ", ".join(f"{a}:{p} ({n}/{len(rule.slots)} slots)" for (a, p), n in counts.items())


class ModeDispatch:
    """Hands each endpoint set to the data paths: every service to the Proxy
    (for an l4 service its listener answers only when the kernel has nowhere
    to send a connection: no ready node, a service held at zero nodes, or the
    kernel path failed), and l4 services to the KernelPath too, whose DNAT
    takes new connections before they reach that listener."""

    def __init__(self, proxy, kernel: KernelPath):
        self.proxy = proxy
        self.kernel = kernel

    async def apply(self, es: EndpointSet) -> None:
        await self.proxy.apply(es)
        try:
            await self.kernel.apply(es)
        except SodaError as exc:
            # The userspace listener keeps serving: slower, not down.
            log.error("service %s: kernel path failed, the userspace proxy serves it: %s", es.service, exc)

    async def remove(self, service: str) -> None:
        await self.proxy.remove(service)
        try:
            await self.kernel.remove(service)
        except SodaError as exc:
            log.error("service %s: cannot remove its kernel rule: %s", service, exc)
