"""The Master's state store: the interface, and its embedded SQLite backend.

It owns persistence of nodes, images, services and virtual nodes, and the
rules every backend keeps:

- State changes only in a unit of work: `with store.transaction() as tx:`.
  Reads through `tx` see one consistent state plus the transaction's own
  writes; the writes become visible together when the block ends, or not at
  all if it raises or the process dies first. Reads on the store itself
  see committed state only.
- Every record carries a revision: the store revision of the transaction
  that last wrote it (what etcd calls mod_revision). Writes are
  compare-and-swap on it: a record read at revision r is written (or
  deleted) only if it is still at r, else `Conflict`; a record of revision
  0 is new and is created only if absent. `update_of` turns a freshly built
  record into an update of the one it replaces.
- `tx.after_commit(fn)` runs `fn` once the writes are committed; a
  transaction that rolls back drops it. Change notification hangs off it,
  so watchers never hear of a change that did not happen.
- Stored records are decoded by structure, never validated again: a rule
  tightened later applies to new requests, not to state already accepted.
  Changing what is stored is a schema migration (SCHEMA_VERSION,
  _MIGRATIONS), applied when the store opens.

It knows nothing of scheduling, notification or gRPC. Nothing outside this
module knows which backend is in use: callers get a `StateStore` from
`open_store(state_dir)`.
"""

from __future__ import annotations

import abc
import collections.abc
import dataclasses
import enum
import functools
import json
import os
import sqlite3
import threading
import types
import typing
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

from soda import model
from soda.errors import AlreadyExists, Conflict, NotFound, SodaError, WrongState

# Version 2: nodes.limits, the smallest guest each hypervisor of a node boots.
# Version 3: nodes.assumed, capacity fields the node took a default for.
# Version 4: a revision on every record and in meta; specs stored by
#            structure (the dataclass fields) instead of in the YAML form.
# Version 5: nodes.labels, the KEY=VALUE labels a node registers (JSON object).
# Version 6: nodes.draining, set by an operator's drain (0/1).
# Version 7: vnodes.moved_from/at/why, the last move of a virtual node.
# Version 8: tenants (services.owner, images.owners/public, image_names.owner)
#            and their quotas (table quotas).
# Version 9: vnodes.boot_timeout, a service's own boot timeout.
# Version 10: images.parent/layer/layer_size, layered images (soda.layers).
# Version 11: vnodes.frozen, a virtual node paused in place.
# Version 12: vnodes.replaces/moving_to/disk_base, moves paired explicitly.
SCHEMA_VERSION = 12

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, address TEXT NOT NULL,
    cpu REAL NOT NULL, memory INTEGER NOT NULL, bandwidth INTEGER NOT NULL, disk INTEGER NOT NULL,
    hypervisors TEXT NOT NULL, subnet TEXT NOT NULL UNIQUE, gateway TEXT NOT NULL,
    state TEXT NOT NULL, registered_at REAL NOT NULL, limits TEXT NOT NULL DEFAULT '[]',
    assumed TEXT NOT NULL DEFAULT '[]', revision INTEGER NOT NULL DEFAULT 1,
    labels TEXT NOT NULL DEFAULT '{}', draining INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS images (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, init TEXT NOT NULL, created_at REAL NOT NULL,
    revision INTEGER NOT NULL DEFAULT 1, owners TEXT NOT NULL DEFAULT '[]',
    public INTEGER NOT NULL DEFAULT 0, parent TEXT NOT NULL DEFAULT '', layer TEXT NOT NULL DEFAULT '',
    layer_size INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS image_names (
    name TEXT PRIMARY KEY, digest TEXT NOT NULL REFERENCES images(digest) ON DELETE CASCADE,
    owner TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS quotas (
    tenant TEXT PRIMARY KEY, quota TEXT NOT NULL, revision INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, image_digest TEXT NOT NULL,
    deleting INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
    revision INTEGER NOT NULL DEFAULT 1, owner TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS vnodes (
    name TEXT PRIMARY KEY,
    service TEXT NOT NULL REFERENCES services(name) ON DELETE CASCADE,
    idx INTEGER NOT NULL, node TEXT NOT NULL, address TEXT NOT NULL,
    prefix_length INTEGER NOT NULL, gateway TEXT NOT NULL,
    cpu REAL NOT NULL, memory INTEGER NOT NULL, bandwidth INTEGER NOT NULL, disk INTEGER NOT NULL,
    weight REAL NOT NULL, image_digest TEXT NOT NULL, hypervisor TEXT NOT NULL, port INTEGER NOT NULL,
    phase INTEGER NOT NULL, reason TEXT NOT NULL, boot_seconds REAL NOT NULL,
    deleting INTEGER NOT NULL DEFAULT 0, generation INTEGER NOT NULL,
    cpu_cap INTEGER NOT NULL DEFAULT 0, revision INTEGER NOT NULL DEFAULT 1,
    moved_from TEXT NOT NULL DEFAULT '', moved_at REAL NOT NULL DEFAULT 0,
    moved_why TEXT NOT NULL DEFAULT '', boot_timeout REAL NOT NULL DEFAULT 0,
    frozen INTEGER NOT NULL DEFAULT 0, replaces TEXT NOT NULL DEFAULT '',
    moving_to TEXT NOT NULL DEFAULT '', disk_base TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS vnodes_by_node ON vnodes(node);
CREATE INDEX IF NOT EXISTS vnodes_by_service ON vnodes(service);
"""


# ---- records ------------------------------------------------------------------
# The model's objects as the store hands them out: the same fields plus the
# revision they were read at. `dataclasses.replace` keeps the class and so
# the revision, which makes a read-modify-write a compare-and-swap by itself.

def _with_revision(cls: type) -> type:
    stored = dataclasses.make_dataclass(
        f"Stored{cls.__name__}", [("revision", int, dataclasses.field(default=0))],
        bases=(cls,), frozen=True)
    stored.__module__ = __name__
    return stored


StoredNode = _with_revision(model.Node)
StoredImage = _with_revision(model.Image)
StoredService = _with_revision(model.Service)
StoredVirtualNode = _with_revision(model.VirtualNode)


_STORED: dict[type, type] = {model.Node: StoredNode, model.Image: StoredImage,
                             model.Service: StoredService, model.VirtualNode: StoredVirtualNode}
_STORED.update({stored: stored for stored in list(_STORED.values())})

R = TypeVar("R")


def revision_of(record: Any) -> int:
    """The revision `record` was read at; 0 for one the store never held."""
    return getattr(record, "revision", 0)


def update_of(old: R, new: Any) -> R:
    """`new` (any record of old's kind) as an update of the stored `old`:
    new's fields at old's revision, so that writing it is a compare-and-swap."""
    stored = _STORED[type(old)]
    fields = {f.name: getattr(new, f.name) for f in dataclasses.fields(new) if f.name != "revision"}
    return stored(**fields, revision=revision_of(old))


# ---- the interface ------------------------------------------------------------

class StateReader(abc.ABC):
    """Reads: on a `StateStore` they see committed state; on a `Transaction`,
    the transaction's view including its own writes. Records come back
    carrying their revision."""

    @abc.abstractmethod
    def get_node(self, name: str) -> model.Node: ...
    @abc.abstractmethod
    def list_nodes(self) -> list[model.Node]: ...
    @abc.abstractmethod
    def resolve_image(self, ref: str) -> model.Image:
        """An image by name or sha256 digest."""
    @abc.abstractmethod
    def list_images(self) -> list[model.Image]: ...
    @abc.abstractmethod
    def get_service(self, name: str) -> model.Service: ...
    @abc.abstractmethod
    def list_services(self) -> list[model.Service]: ...
    @abc.abstractmethod
    def list_service_specs(self) -> list[model.ServiceSpec]:
        """Specs only, without virtual nodes: cheap for admission checks."""
    @abc.abstractmethod
    def list_vnodes(self, node: str | None = None, service: str | None = None,
                    names: Iterable[str] | None = None) -> list[model.VirtualNode]:
        """The virtual nodes on `node`, of `service` and among `names`, as
        far as each is given."""
    @abc.abstractmethod
    def node_states(self, address: str | None = None) -> dict[str, str]:
        """Name -> state of every node (registered at `address`, if given),
        without what they hold: cheap, for a deletion's check of which
        nodes still run guests and a registration's that no two READY nodes
        share an address."""
    @abc.abstractmethod
    def vnode_addresses(self, node: str) -> set[str]:
        """The addresses of the virtual nodes on `node`, without reading
        them: cheap, for handing out the next one."""
    @abc.abstractmethod
    def count_vnodes(self, service: str) -> int:
        """How many virtual nodes `service` has, without reading them: cheap,
        for asking whether a deleting service is done."""
    @abc.abstractmethod
    def moving_services(self) -> set[str]:
        """The services with a move in flight (a live virtual node that
        replaces another), without reading them: cheap, for the membership
        pass's question whether there is anything to do."""
    @abc.abstractmethod
    def image_name_owner(self, name: str) -> str | None:
        """The owner of an image name (OPERATORS = ""), None when no image has it."""
    @abc.abstractmethod
    def quotas(self) -> dict[str, model.Quota]:
        """Every tenant's quota that an operator set."""
    @abc.abstractmethod
    def list_service_owners(self) -> list[tuple[str, model.ServiceSpec]]:
        """(owner, spec) of every service: cheap for quota checks."""


class Transaction(StateReader):
    """One unit of work. Its reads are serializable: when it commits,
    everything it read is still as it was (SQLite holds the write lock for
    the whole transaction; an etcd backend compares the revisions of what it
    read at commit). Every write is compare-and-swap on the record's
    revision and raises `Conflict` if the record moved on; a record written
    earlier in the same transaction may be written again from its read form.
    The records' new revision is the transaction's, visible after commit."""

    @abc.abstractmethod
    def put_node(self, node: model.Node) -> None:
        """A node's registration: created at revision 0, else updated."""
    @abc.abstractmethod
    def delete_node(self, node: model.Node) -> None:
        """A node that holds no virtual node (WrongState otherwise); its
        subnet is free again."""
    @abc.abstractmethod
    def put_image(self, image: model.Image, name: str = "", name_owner: str = "") -> None:
        """Record an image (by content: a digest already held keeps its
        size, init, creation time and layering, and takes `image`'s owners and
        public flag) and point `name`, if given, at it, as `name_owner`'s."""
    @abc.abstractmethod
    def delete_image(self, image: model.Image) -> None:
        """The image and the names pointing at it."""
    @abc.abstractmethod
    def create_service(self, service: model.Service) -> None:
        """A new service and its virtual nodes; AlreadyExists if its name is taken."""
    @abc.abstractmethod
    def put_service(self, service: model.Service) -> None:
        """The service's own record (spec, deleting); its virtual nodes are
        written with `put_vnodes`."""
    @abc.abstractmethod
    def delete_service(self, service: model.Service) -> None:
        """A service whose virtual nodes are gone (WrongState otherwise)."""
    @abc.abstractmethod
    def put_vnodes(self, vnodes: Iterable[model.VirtualNode]) -> None:
        """Create (revision 0) or update each virtual node."""
    @abc.abstractmethod
    def delete_vnodes(self, vnodes: Iterable[model.VirtualNode]) -> None: ...
    @abc.abstractmethod
    def put_quota(self, tenant: str, quota: model.Quota | None) -> None:
        """Set a tenant's quota whole (None: the tenant has none). An
        operator's word, so last writer wins: never read-modify-written."""
    @abc.abstractmethod
    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once this transaction has committed, never if it
        rolls back. Callbacks run in order, outside the transaction."""
    @abc.abstractmethod
    def part(self) -> typing.ContextManager[None]:
        """`with tx.part():` a part of the transaction that may fail alone:
        if the block raises, its writes and after-commit callbacks are
        undone and the exception goes on, while what the transaction did
        before stays (to commit with the rest). Parts do not nest."""


class StateStore(StateReader):
    """What the Master needs from durable state."""

    @abc.abstractmethod
    def transaction(self) -> typing.ContextManager[Transaction]:
        """The only way to change state: `with store.transaction() as tx:`
        commits when the block ends, rolls back if it raises. Transactions
        do not nest."""
    @abc.abstractmethod
    def revision(self) -> int:
        """The store revision: that of the last transaction that wrote."""
    @abc.abstractmethod
    def schema_version(self) -> int: ...
    @abc.abstractmethod
    def close(self) -> None: ...


def open_store(state_dir: str, *, on_step: Callable[[str], None] | None = None) -> StateStore:
    """The embedded default: one SQLite file under the state dir.

    `on_step` is for crash tests: it is called at each step of a transaction
    ("write <what>" before each write, "commit" before the commit,
    "committed" after it) and may raise or kill the process there."""
    os.makedirs(state_dir, exist_ok=True)
    return SqliteStore(os.path.join(state_dir, "state.db"), on_step=on_step)


# ---- stored form ---------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode_as(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return _decode_as(options[0], value) if len(options) == 1 else value
    if origin is tuple:
        return tuple(_decode_as(typing.get_args(hint)[0], item) for item in value)
    if origin in (dict, collections.abc.Mapping):
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return _decode(hint, value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if hint is float:
        return float(value)
    return value


def _decode(cls: type[R], data: Mapping[str, Any]) -> R:
    """`data` (stored JSON) as a `cls` by structure alone: no validation, a
    field stored before it existed takes its default, one the model has
    since dropped is ignored."""
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: _decode_as(hints[key], value) for key, value in data.items() if key in known})


def _spec_to_json(spec: model.ServiceSpec) -> str:
    return json.dumps(dataclasses.asdict(spec), separators=(",", ":"))


@functools.lru_cache(maxsize=4096)
def _spec_from_json(text: str) -> model.ServiceSpec:
    # Specs are frozen, so equal text may share one decoded object.
    return _decode(model.ServiceSpec, json.loads(text))


def _spec_from_v3_json(text: str) -> model.ServiceSpec:
    """A spec as versions 1 to 3 stored it (the YAML form of `as_dict`),
    decoded by structure alone for the migration to version 4."""
    data = json.loads(text)
    nodes = data.get("nodes", 1)
    columns = data.get("resources") or {}

    def column(key: str) -> list:
        value = columns.get(key, model.RESOURCE_DEFAULTS[key])
        return list(value) if isinstance(value, list) else [value] * max(nodes, 1)
    values = {key: column(key) for key in model.RESOURCE_BOUNDS}
    per_node = tuple(model.Resources(**{key: values[key][i] for key in model.RESOURCE_BOUNDS})
                     for i in range(nodes))
    # As parse_spec derived it: the last node's resources (the only ones at zero nodes).
    template = model.Resources(**{key: values[key][-1] for key in model.RESOURCE_BOUNDS})
    switch = dict(data.get("switch") or {})
    on_demand = data.get("on_demand")
    if on_demand is not None:
        on_demand = dict(on_demand, resources=on_demand.get("resources") or dataclasses.asdict(template))
    fields = {key: value for key, value in data.items()
              if key not in ("resources", "switch", "on_demand")}
    return _decode(model.ServiceSpec, dict(
        fields, nodes=nodes, resources=[dataclasses.asdict(r) for r in per_node],
        template=dataclasses.asdict(template), switch=switch, on_demand=on_demand))


def _limits_to_json(limits: Iterable[model.DriverCapabilities]) -> str:
    return json.dumps([dataclasses.asdict(lim) for lim in limits])


@functools.lru_cache(maxsize=1024)
def _limits_from_json(text: str) -> tuple[model.DriverCapabilities, ...]:
    # Frozen, and mostly the same text on every node: decoded once.
    return tuple(_decode(model.DriverCapabilities, item) for item in json.loads(text))


@functools.lru_cache(maxsize=1024)
def _overheads_from_json(text: str) -> dict[str, int]:
    """Memory overhead per hypervisor, from a node's stored limits (read-only)."""
    return {lim.hypervisor: lim.memory_overhead for lim in _limits_from_json(text)}


@functools.lru_cache(maxsize=1024)
def _strings_from_json(text: str) -> tuple[str, ...]:
    return tuple(json.loads(text))


@functools.lru_cache(maxsize=4096)
def _labels_from_json(text: str) -> tuple[tuple[str, str], ...]:
    return tuple(json.loads(text).items())


def _migrate_specs_to_v4(db: sqlite3.Connection) -> None:
    for name, text in db.execute("SELECT name, spec FROM services").fetchall():
        db.execute("UPDATE services SET spec=? WHERE name=?", (_spec_to_json(_spec_from_v3_json(text)), name))


# What brings a store of version N up to N + 1, applied in order inside the
# transaction that opens it: SQL statements, or a function of the
# connection. A store older than version 1 has no meta table and is
# created afresh by _SCHEMA; one newer than SCHEMA_VERSION is refused.
_MIGRATIONS: dict[int, tuple[str | Callable[[sqlite3.Connection], None], ...]] = {
    # Nodes registered before limits existed have none until they register again.
    1: ("ALTER TABLE nodes ADD COLUMN limits TEXT NOT NULL DEFAULT '[]'",),
    2: ("ALTER TABLE nodes ADD COLUMN assumed TEXT NOT NULL DEFAULT '[]'",),
    # Every record written before revisions existed is at revision 1.
    3: ("ALTER TABLE nodes ADD COLUMN revision INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE images ADD COLUMN revision INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE services ADD COLUMN revision INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE vnodes ADD COLUMN revision INTEGER NOT NULL DEFAULT 1",
        "INSERT INTO meta VALUES ('revision', '1')",
        _migrate_specs_to_v4),
    # Nodes registered before labels existed carry none until they register
    # again; the row's revision stays, as nothing a reader sees changed.
    4: ("ALTER TABLE nodes ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'",),
    # No node was draining before drains existed.
    5: ("ALTER TABLE nodes ADD COLUMN draining INTEGER NOT NULL DEFAULT 0",),
    # No virtual node had a recorded move before moves were recorded.
    6: ("ALTER TABLE vnodes ADD COLUMN moved_from TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE vnodes ADD COLUMN moved_at REAL NOT NULL DEFAULT 0",
        "ALTER TABLE vnodes ADD COLUMN moved_why TEXT NOT NULL DEFAULT ''"),
    # What existed before tenants is the operators' (owner ""); quotas is
    # made by the schema itself (CREATE TABLE IF NOT EXISTS).
    7: ("ALTER TABLE services ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE images ADD COLUMN owners TEXT NOT NULL DEFAULT '[]'",
        "ALTER TABLE images ADD COLUMN public INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE image_names ADD COLUMN owner TEXT NOT NULL DEFAULT ''"),
    8: ("ALTER TABLE vnodes ADD COLUMN boot_timeout REAL NOT NULL DEFAULT 0",),
    # Every image stored before layers existed is whole.
    9: ("ALTER TABLE images ADD COLUMN parent TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE images ADD COLUMN layer TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE images ADD COLUMN layer_size INTEGER NOT NULL DEFAULT 0"),
    # No virtual node was frozen before freezing existed.
    10: ("ALTER TABLE vnodes ADD COLUMN frozen INTEGER NOT NULL DEFAULT 0",),
    # Moves were paired by counting before; one in flight across the
    # upgrade has its replacement dropped as surplus, and the drain starts
    # it again.
    11: ("ALTER TABLE vnodes ADD COLUMN replaces TEXT NOT NULL DEFAULT ''",
         "ALTER TABLE vnodes ADD COLUMN moving_to TEXT NOT NULL DEFAULT ''",
         "ALTER TABLE vnodes ADD COLUMN disk_base TEXT NOT NULL DEFAULT ''"),
}


_VNODE_COLUMNS = ("name, service, idx, node, address, prefix_length, gateway, cpu, memory, bandwidth, "
                  "disk, weight, image_digest, hypervisor, port, phase, reason, boot_seconds, deleting, "
                  "generation, cpu_cap, moved_from, moved_at, moved_why, boot_timeout, frozen, replaces, "
                  "moving_to, disk_base, revision")
_VNODE_WIDTH = len(_VNODE_COLUMNS.split(","))
# SQLite's default limit on the parameters of one statement is 999 (older builds).
_IN_CHUNK = 500
# Virtual nodes are written many rows to a statement, not one statement per
# row (executemany): each statement is a step, and each step lets go of the
# GIL (see _packed).
_PUT_CHUNK = 999 // _VNODE_WIDTH
_VNODE_REALS = ("cpu", "weight", "boot_seconds", "moved_at", "boot_timeout")
_NODE_COLUMNS = ("name, address, cpu, memory, bandwidth, disk, hypervisors, subnet, gateway, state, limits, "
                 "assumed, revision, labels, draining")
_PLACED_COLUMNS = "node, hypervisor, cpu, memory, bandwidth, disk, count"
_SERVICE_COLUMNS = "name, spec, image_digest, deleting, created_at, revision, owner"


def _vnode_order(row: list) -> tuple:
    return row[1], row[2]          # service, idx


# Reads come back as one row holding all of them. Python's sqlite3 lets go
# of the GIL around every step of a statement, that is for every row, and
# in a process with a busy thread each step then waits up to the switch
# interval (5 ms) to get it back: 500 node rows took 5 s instead of 2 ms
# with one busy thread beside them, under the write lock. A statement that
# answers with one row of JSON (json_group_array) takes one step.
# json_array() writes a REAL with 15 digits, which need not read back as
# the same double: REAL columns are written with 17 (printf's %!.17g, which
# always has a point or an exponent, so json.loads reads a float).

def _packed(columns: str, reals: Iterable[str] = ()) -> str:
    """The aggregate expression that packs the rows of `columns` (a comma-
    separated list) into one JSON array of arrays."""
    reals = set(reals)
    names = [c.strip() for c in columns.split(",")]
    return "json_group_array(json_array({}))".format(", ".join(
        f"json(printf('%!.17g', {c}))" if c in reals else c for c in names))


def _vnode_row(v: model.VirtualNode, revision: int) -> tuple:
    r = v.resources
    return (v.name, v.service, v.index, v.node, v.address, v.prefix_length, v.gateway, r.cpu,
            r.memory, r.bandwidth, r.disk, v.weight, v.image_digest, v.hypervisor, v.port,
            int(v.phase), v.reason, v.boot_seconds, int(v.deleting), v.generation, int(v.cpu_cap),
            *((m.from_node, m.at, m.why) if (m := v.last_move) else ("", 0.0, "")), v.boot_timeout,
            int(v.frozen), v.replaces, v.moving_to, v.disk_base, revision)


@functools.lru_cache(maxsize=4096)
def _resources(cpu: float, memory: int, bandwidth: int, disk: int) -> model.Resources:
    # Immutable, and the same for every virtual node of a service: shared.
    return model.Resources(cpu, memory, bandwidth, disk)


_PHASES = {int(p): p for p in model.Phase}


def _vnode_from_row(row) -> StoredVirtualNode:
    (name, service, idx, node, address, prefix_length, gateway, cpu, memory, bandwidth, disk, weight,
     image_digest, hypervisor, port, phase, reason, boot_seconds, deleting, generation, cpu_cap,
     moved_from, moved_at, moved_why, boot_timeout, frozen, replaces, moving_to, disk_base, revision) = row
    # Every read of the Master decodes virtual nodes by the thousand, and a
    # frozen dataclass's __init__ sets its 26 fields one object.__setattr__
    # at a time: the largest single cost of the Master under load. A row the
    # store wrote is a valid record, so its fields go into the instance in
    # one step; tests/unit/test_store.py checks that this makes exactly what
    # the constructor makes, for every field.
    v = object.__new__(StoredVirtualNode)
    v.__dict__.update(
        name=name, service=service, index=idx, resources=_resources(cpu, memory, bandwidth, disk),
        node=node, address=address, prefix_length=prefix_length, gateway=gateway, weight=weight,
        image_digest=image_digest, hypervisor=hypervisor, port=port, phase=_PHASES[phase],
        reason=reason, boot_seconds=boot_seconds, deleting=bool(deleting), generation=generation,
        cpu_cap=bool(cpu_cap), boot_timeout=boot_timeout, frozen=bool(frozen), replaces=replaces,
        moving_to=moving_to, disk_base=disk_base,
        last_move=model.VnodeMove(moved_from, moved_at, moved_why) if moved_from or moved_why else None,
        usage=None, switch_stats=None, revision=revision)
    return v


# ---- the SQLite backend ------------------------------------------------------------

class _SqliteReads(StateReader):
    """The reads, over whichever connection `_query` uses."""

    @abc.abstractmethod
    def _query(self, sql: str, args: tuple = ()) -> list:
        """The rows of one statement: it sees one state (a reader's
        statement runs in its own snapshot), so a read that must be
        consistent is one statement."""

    def _nodes(self, name: str | None = None) -> list[StoredNode]:
        # Every placement, registration and membership pass reads all nodes:
        # one statement (one step, see _packed) reads them and sums what each
        # holds per hypervisor (each guest also costs its hypervisor
        # process's own memory), and the JSON columns, the same on most
        # nodes, are decoded once. A frozen guest holds its memory, not its
        # CPU: a warm pool counts against capacity as memory.
        node_where, vnode_where = ("WHERE name = ?", "WHERE node = ?") if name is not None else ("", "")
        [(node_rows, placed_rows)] = self._query(
            f"SELECT (SELECT {_packed(_NODE_COLUMNS, ['cpu'])} FROM nodes {node_where}), "
            f"(SELECT {_packed(_PLACED_COLUMNS, ['cpu'])} FROM (SELECT node, hypervisor, SUM(CASE WHEN frozen THEN 0 ELSE cpu END) AS cpu, "
            f"SUM(memory) AS memory, SUM(bandwidth) AS bandwidth, SUM(disk) AS disk, COUNT(*) AS count "
            f"FROM vnodes {vnode_where} GROUP BY node, hypervisor))",
            (name, name) if name is not None else ())
        held: dict[str, list] = {}
        for node, hypervisor, cpu, memory, bandwidth, disk, count in json.loads(placed_rows):
            held.setdefault(node, []).append((hypervisor, cpu, memory, bandwidth, disk, count))
        nodes = []
        for r in sorted(json.loads(node_rows)):
            overheads = _overheads_from_json(r[10])
            cpu, memory, bandwidth, disk, vnodes = 0.0, 0, 0, 0, 0
            for hypervisor, h_cpu, h_memory, h_bandwidth, h_disk, count in held.get(r[0], ()):
                cpu, memory = cpu + h_cpu, memory + h_memory + count * overheads.get(hypervisor, 0)
                bandwidth, disk, vnodes = bandwidth + h_bandwidth, disk + h_disk, vnodes + count
            nodes.append(StoredNode(
                name=r[0], address=r[1], capacity=model.Resources(r[2], r[3], r[4], r[5]),
                hypervisors=_strings_from_json(r[6]), subnet=r[7], gateway=r[8], state=r[9],
                allocated=model.Resources(cpu, memory, bandwidth, disk), vnodes=vnodes,
                limits=_limits_from_json(r[10]),
                assumed=_strings_from_json(r[11]), revision=r[12], labels=dict(_labels_from_json(r[13])),
                draining=bool(r[14])))
        return nodes

    def get_node(self, name: str) -> StoredNode:
        nodes = self._nodes(name)
        if not nodes:
            raise NotFound(f"no physical node named {name!r}")
        return nodes[0]

    def list_nodes(self) -> list[StoredNode]:
        return self._nodes()

    def _images(self, where: str = "", args: tuple = ()) -> list[StoredImage]:
        rows = self._query(
            "SELECT i.digest, i.size, i.init, i.created_at, GROUP_CONCAT(n.name), i.revision, i.owners, "
            "i.public, i.parent, i.layer, i.layer_size FROM images i "
            "LEFT JOIN image_names n ON n.digest = i.digest " + where +
            " GROUP BY i.digest ORDER BY i.created_at, i.digest", args)
        return [StoredImage(digest=r[0], size=r[1], init=r[2], created_at=r[3],
                            names=tuple(sorted(r[4].split(","))) if r[4] else (), revision=r[5],
                            owners=_strings_from_json(r[6]), public=bool(r[7]), parent=r[8], layer=r[9],
                            layer_size=r[10])
                for r in rows]

    def resolve_image(self, ref: str) -> StoredImage:
        if ref.startswith("sha256:"):
            found = self._images("WHERE i.digest = ?", (ref,))
        else:
            found = self._images("WHERE i.digest = (SELECT digest FROM image_names WHERE name = ?)", (ref,))
        if not found:
            raise NotFound(f"no image {ref!r} (push it with: sodactl image push FILE --name NAME)")
        return found[0]

    def list_images(self) -> list[StoredImage]:
        return self._images()

    def image_name_owner(self, name: str) -> str | None:
        rows = self._query("SELECT owner FROM image_names WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def quotas(self) -> dict[str, model.Quota]:
        return {tenant: _decode(model.Quota, json.loads(text))
                for tenant, text in self._query("SELECT tenant, quota FROM quotas ORDER BY tenant")}

    def list_service_owners(self) -> list[tuple[str, model.ServiceSpec]]:
        [(rows,)] = self._query(f"SELECT {_packed('name, owner, spec')} FROM services")
        return [(owner, _spec_from_json(spec)) for _, owner, spec in sorted(json.loads(rows))]

    def _services(self, where: str = "", args: tuple = ()) -> list[StoredService]:
        # One statement: one snapshot, and one step (see _packed).
        [(rows, vnode_rows)] = self._query(
            f"SELECT (SELECT {_packed(_SERVICE_COLUMNS, ['created_at'])} FROM services {where}), "
            f"(SELECT {_packed(_VNODE_COLUMNS, _VNODE_REALS)} FROM vnodes WHERE service IN "
            f"(SELECT name FROM services {where}))", args * 2)
        by_service: dict[str, list] = {}
        for row in sorted(json.loads(vnode_rows), key=_vnode_order):
            by_service.setdefault(row[1], []).append(_vnode_from_row(row))
        return [StoredService(spec=_spec_from_json(r[1]), image_digest=r[2],
                              vnodes=tuple(by_service.get(r[0], ())), deleting=bool(r[3]),
                              created_at=r[4], revision=r[5], owner=r[6])
                for r in sorted(json.loads(rows))]

    def get_service(self, name: str) -> StoredService:
        found = self._services("WHERE name = ?", (name,))
        if not found:
            raise NotFound(f"no service named {name!r}")
        return found[0]

    def list_services(self) -> list[StoredService]:
        return self._services()

    def list_service_specs(self) -> list[model.ServiceSpec]:
        [(rows,)] = self._query(f"SELECT {_packed('name, spec')} FROM services")
        return [_spec_from_json(spec) for _, spec in sorted(json.loads(rows))]

    def list_vnodes(self, node: str | None = None, service: str | None = None,
                    names: Iterable[str] | None = None) -> list[StoredVirtualNode]:
        clauses, args = [], []
        if node is not None:
            clauses.append("node = ?")
            args.append(node)
        if service is not None:
            clauses.append("service = ?")
            args.append(service)
        chunks = [None]
        if names is not None:
            wanted = sorted(set(names))
            if not wanted:
                return []
            chunks = [wanted[i:i + _IN_CHUNK] for i in range(0, len(wanted), _IN_CHUNK)]
        rows = []
        for chunk in chunks:
            where = clauses + ([f"name IN ({','.join('?' * len(chunk))})"] if chunk else [])
            [(packed,)] = self._query(
                f"SELECT {_packed(_VNODE_COLUMNS, _VNODE_REALS)} FROM vnodes"
                + (" WHERE " + " AND ".join(where) if where else ""), tuple(args) + tuple(chunk or ()))
            rows += json.loads(packed)
        return [_vnode_from_row(r) for r in sorted(rows, key=_vnode_order)]

    def node_states(self, address: str | None = None) -> dict[str, str]:
        if address is None:
            return dict(self._query("SELECT name, state FROM nodes"))
        return dict(self._query("SELECT name, state FROM nodes WHERE address = ?", (address,)))

    def vnode_addresses(self, node: str) -> set[str]:
        return {address for (address,) in self._query("SELECT address FROM vnodes WHERE node = ?", (node,))}

    def count_vnodes(self, service: str) -> int:
        [(count,)] = self._query("SELECT COUNT(*) FROM vnodes WHERE service = ?", (service,))
        return count

    def moving_services(self) -> set[str]:
        return {service for (service,) in self._query(
            "SELECT DISTINCT service FROM vnodes WHERE replaces != '' AND deleting = 0")}


class _SqliteTransaction(_SqliteReads, Transaction):
    """Lives between BEGIN IMMEDIATE and COMMIT on the store's write
    connection, under its write lock: nothing else writes meanwhile."""

    def __init__(self, store: SqliteStore):
        self._store = store
        self._db = store._db
        self._open = True
        self._revision = 0          # this transaction's, taken at its first write
        # (kind, key) -> revision before this transaction first wrote it
        # (None: absent), so that a record written twice may be written
        # again from the form it was read in.
        self._before: dict[tuple[str, str], int | None] = {}
        self._after: list[Callable[[], None]] = []

    def _query(self, sql: str, args: tuple = ()) -> list:
        self._check_open()
        return self._db.execute(sql, args).fetchall()

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("this transaction has ended; open another with store.transaction()")

    def after_commit(self, callback: Callable[[], None]) -> None:
        self._check_open()
        self._after.append(callback)

    @contextmanager
    def part(self) -> Iterator[None]:
        self._check_open()
        before, after, revision = dict(self._before), len(self._after), self._revision
        self._db.execute("SAVEPOINT part")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK TO part")
                self._db.execute("RELEASE part")
            self._before, self._revision = before, revision
            del self._after[after:]
            raise
        self._db.execute("RELEASE part")

    # ---- compare-and-swap ---------------------------------------------
    def _write(self, what: str) -> int:
        """Called before each write: the revision the write stamps."""
        self._check_open()
        self._store._step(f"write {what}")
        if not self._revision:
            self._revision = int(self._db.execute(
                "SELECT value FROM meta WHERE key='revision'").fetchone()[0]) + 1
        return self._revision

    def _compare(self, kind: str, key: str, current: int | None, expected: int) -> None:
        """Raise Conflict unless a write of `key` read at `expected` may
        replace what is stored (`current`, None if absent)."""
        before = self._before.get((kind, key), current)
        self._before.setdefault((kind, key), current)
        if expected == 0:
            if current is not None:
                raise Conflict(f"{kind} {key!r} already exists (revision {current})")
            return
        if current is None:
            raise Conflict(f"{kind} {key!r} is gone since it was read at revision {expected}")
        if current != expected and not (current == self._revision and before == expected):
            raise Conflict(f"{kind} {key!r} changed since it was read: it is at revision {current}, "
                           f"the write was based on {expected}")

    def _revisions(self, table: str, key: str, names: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in range(0, len(names), _IN_CHUNK):
            chunk = names[i:i + _IN_CHUNK]
            [(rows,)] = self._db.execute(f"SELECT {_packed(f'{key}, revision')} FROM {table} WHERE {key} IN "
                                         f"({','.join('?' * len(chunk))})", chunk).fetchall()
            out.update(json.loads(rows))
        return out

    # ---- nodes --------------------------------------------------------
    def put_node(self, node: model.Node) -> None:
        revision = self._write(f"node {node.name}")
        current = self._revisions("nodes", "name", [node.name]).get(node.name)
        self._compare("node", node.name, current, revision_of(node))
        c = node.capacity
        values = (node.address, c.cpu, c.memory, c.bandwidth, c.disk, json.dumps(list(node.hypervisors)),
                  node.subnet, node.gateway, node.state, _limits_to_json(node.limits),
                  json.dumps(list(node.assumed)), json.dumps(dict(node.labels), sort_keys=True),
                  int(node.draining), revision, node.name)
        try:
            if current is None:
                self._db.execute(
                    "INSERT INTO nodes (address, cpu, memory, bandwidth, disk, hypervisors, subnet, gateway, "
                    "state, limits, assumed, labels, draining, revision, name, registered_at) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,strftime('%s','now'))", values)
            else:
                self._db.execute(
                    "UPDATE nodes SET address=?, cpu=?, memory=?, bandwidth=?, disk=?, hypervisors=?, "
                    "subnet=?, gateway=?, state=?, limits=?, assumed=?, labels=?, draining=?, revision=? "
                    "WHERE name=?", values)
        except sqlite3.IntegrityError:
            raise Conflict(f"subnet {node.subnet} of node {node.name!r} belongs to another node") from None

    def delete_node(self, node: model.Node) -> None:
        self._write(f"delete node {node.name}")
        current = self._revisions("nodes", "name", [node.name]).get(node.name)
        self._compare("node", node.name, current, _existing(node))
        left = self._db.execute("SELECT COUNT(*) FROM vnodes WHERE node = ?", (node.name,)).fetchone()[0]
        if left:
            raise WrongState(f"node {node.name!r} still has {left} virtual node(s)")
        self._db.execute("DELETE FROM nodes WHERE name=?", (node.name,))

    # ---- images -------------------------------------------------------
    def put_image(self, image: model.Image, name: str = "", name_owner: str = "") -> None:
        revision = self._write(f"image {image.digest}")
        touched = [image.digest]
        owners = json.dumps(sorted(set(image.owners)))
        if self._db.execute("INSERT OR IGNORE INTO images (digest, size, init, created_at, revision, owners, "
                            "public, parent, layer, layer_size) VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (image.digest, image.size, image.init, image.created_at, revision, owners,
                             int(image.public), image.parent, image.layer, image.layer_size)).rowcount:
            self._before.setdefault(("image", image.digest), None)
        else:
            current = self._revisions("images", "digest", [image.digest]).get(image.digest)
            if self._db.execute("UPDATE images SET owners=?, public=?, revision=? WHERE digest=? AND "
                                "(owners != ? OR public != ?)", (owners, int(image.public), revision,
                                                                image.digest, owners,
                                                                int(image.public))).rowcount:
                self._before.setdefault(("image", image.digest), current)
        if name:
            row = self._db.execute("SELECT digest, owner FROM image_names WHERE name = ?", (name,)).fetchone()
            if row is None or tuple(row) != (image.digest, name_owner):
                if row is not None and row[0] != image.digest:
                    touched.append(row[0])
                self._db.execute("INSERT INTO image_names VALUES (?,?,?) ON CONFLICT(name) DO UPDATE "
                                 "SET digest=excluded.digest, owner=excluded.owner",
                                 (name, image.digest, name_owner))
                # A name is part of the image it points at: both images changed.
                for digest, current in self._revisions("images", "digest", touched).items():
                    self._before.setdefault(("image", digest), current)
                self._db.executemany("UPDATE images SET revision=? WHERE digest=?",
                                     [(revision, digest) for digest in touched])

    def delete_image(self, image: model.Image) -> None:
        self._write(f"delete image {image.digest}")
        current = self._revisions("images", "digest", [image.digest]).get(image.digest)
        self._compare("image", image.digest, current, _existing(image))
        self._db.execute("DELETE FROM images WHERE digest = ?", (image.digest,))

    # ---- services -----------------------------------------------------
    def create_service(self, service: model.Service) -> None:
        revision = self._write(f"service {service.name}")
        if self._revisions("services", "name", [service.name]):
            raise AlreadyExists(f"service {service.name!r} already exists")
        self._before.setdefault(("service", service.name), None)
        self._db.execute("INSERT INTO services (name, spec, image_digest, deleting, created_at, revision, "
                         "owner) VALUES (?,?,?,?,?,?,?)",
                         (service.name, _spec_to_json(service.spec), service.image_digest,
                          int(service.deleting), service.created_at, revision, service.owner))
        self.put_vnodes(service.vnodes)

    def put_service(self, service: model.Service) -> None:
        revision = self._write(f"service {service.name}")
        current = self._revisions("services", "name", [service.name]).get(service.name)
        self._compare("service", service.name, current, _existing(service))
        self._db.execute("UPDATE services SET spec=?, image_digest=?, deleting=?, revision=? WHERE name=?",
                         (_spec_to_json(service.spec), service.image_digest, int(service.deleting),
                          revision, service.name))

    def delete_service(self, service: model.Service) -> None:
        self._write(f"delete service {service.name}")
        current = self._revisions("services", "name", [service.name]).get(service.name)
        self._compare("service", service.name, current, _existing(service))
        left = self._db.execute("SELECT COUNT(*) FROM vnodes WHERE service = ?", (service.name,)).fetchone()[0]
        if left:
            raise WrongState(f"service {service.name!r} still has {left} virtual node(s)")
        self._db.execute("DELETE FROM services WHERE name=?", (service.name,))

    # ---- quotas -------------------------------------------------------
    def put_quota(self, tenant: str, quota: model.Quota | None) -> None:
        revision = self._write(f"quota of {tenant}")
        if quota is None:
            self._db.execute("DELETE FROM quotas WHERE tenant = ?", (tenant,))
        else:
            self._db.execute("INSERT INTO quotas VALUES (?,?,?) ON CONFLICT(tenant) DO UPDATE SET "
                             "quota=excluded.quota, revision=excluded.revision",
                             (tenant, json.dumps(quota.as_dict()), revision))

    # ---- virtual nodes ------------------------------------------------
    def put_vnodes(self, vnodes: Iterable[model.VirtualNode]) -> None:
        vnodes = list(vnodes)
        if not vnodes:
            return
        revision = self._write(f"{len(vnodes)} virtual node(s)")
        current = self._revisions("vnodes", "name", [v.name for v in vnodes])
        for v in vnodes:
            self._compare("virtual node", v.name, current.get(v.name), revision_of(v))
        rows = [_vnode_row(v, revision) for v in vnodes]
        for i in range(0, len(rows), _PUT_CHUNK):
            chunk = rows[i:i + _PUT_CHUNK]
            self._db.execute(f"INSERT OR REPLACE INTO vnodes ({_VNODE_COLUMNS}) VALUES "
                             + ",".join([f"({','.join('?' * _VNODE_WIDTH)})"] * len(chunk)),
                             [value for row in chunk for value in row])

    def delete_vnodes(self, vnodes: Iterable[model.VirtualNode]) -> None:
        vnodes = list(vnodes)
        if not vnodes:
            return
        self._write(f"delete {len(vnodes)} virtual node(s)")
        current = self._revisions("vnodes", "name", [v.name for v in vnodes])
        for v in vnodes:
            self._compare("virtual node", v.name, current.get(v.name), _existing(v))
        names = [v.name for v in vnodes]
        for i in range(0, len(names), _IN_CHUNK):
            chunk = names[i:i + _IN_CHUNK]
            self._db.execute(f"DELETE FROM vnodes WHERE name IN ({','.join('?' * len(chunk))})", chunk)

    # ---- end ----------------------------------------------------------
    def _finish(self) -> None:
        if self._revision:
            self._db.execute("UPDATE meta SET value=? WHERE key='revision'", (str(self._revision),))


def _existing(record: Any) -> int:
    revision = revision_of(record)
    if not revision:
        # A programming error, not a race: only what was read can be replaced or deleted.
        raise TypeError(f"{type(record).__name__} {getattr(record, 'name', '')!r} was not read from the "
                        "store (revision 0): read it first")
    return revision


class FairLock:
    """A reentrant lock granted in the order it was asked for. Every unit of
    work of the Master queues for the store's one writer, heartbeats of
    hundreds of Agents among them. threading.RLock gives a lock just
    released to whichever thread runs first, so a waiter can be passed over
    again and again: with 64 threads sending heartbeats and one creating
    services, the longest heartbeat took 270-350 ms with it and 80-95 ms
    with this one, at the same rate. A late heartbeat is a node that looks
    silent. Here a release hands the lock to the longest waiter, so a wait
    is at most the work queued before it."""

    def __init__(self):
        self._mutex = threading.Lock()
        self._waiters: collections.deque[threading.Lock] = collections.deque()
        self._owner: int | None = None
        self._depth = 0

    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return True
            if self._owner is None and not self._waiters:
                self._owner, self._depth = me, 1
                return True
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        turn.acquire()          # released by the holder that hands over to us
        with self._mutex:
            self._owner, self._depth = me, 1
        return True

    def release(self) -> None:
        with self._mutex:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a FairLock this thread does not hold")
            self._depth -= 1
            if self._depth:
                return
            # Until the next holder runs, the lock is its: nobody else takes it.
            self._owner = -1 if self._waiters else None
            if self._waiters:
                self._waiters.popleft().release()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()


class SqliteStore(_SqliteReads, StateStore):
    """SQLite in WAL mode. One write connection, under a lock, holds each
    transaction from BEGIN IMMEDIATE to COMMIT (a single writer is SQLite's
    model, and the Master's writes are small); a second, read-only
    connection serves reads outside transactions, so they see committed
    state only and never wait for a writer."""

    def __init__(self, path: str, on_step: Callable[[str], None] | None = None):
        self.path = path
        self._on_step = on_step
        self._write_lock = FairLock()
        self._current: _SqliteTransaction | None = None
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._open_schema()
        self._read_lock = threading.RLock()
        self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._reader.execute("PRAGMA query_only=ON")
        self._reader.execute("PRAGMA busy_timeout=5000")

    def _open_schema(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                self._db.execute("INSERT INTO meta VALUES ('revision', '0')")
            else:
                self._migrate(int(row[0]))
        except BaseException:
            self._db.execute("ROLLBACK")
            self._db.close()
            raise
        self._db.execute("COMMIT")

    def _migrate(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise SodaError(f"state store {self.path} has schema version {version}, newer than the "
                            f"{SCHEMA_VERSION} this Master understands: run a newer soda-master")
        for step in range(version, SCHEMA_VERSION):
            for migration in _MIGRATIONS[step]:
                if callable(migration):
                    migration(self._db)
                else:
                    self._db.execute(migration)
        if version != SCHEMA_VERSION:
            self._db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))

    def _step(self, what: str) -> None:
        if self._on_step is not None:
            self._on_step(what)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._write_lock:
            if self._current is not None:
                raise RuntimeError("a transaction is already open on this thread: a unit of work "
                                   "does not nest")
            tx = self._current = _SqliteTransaction(self)
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield tx
                    tx._finish()
                    self._step("commit")
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            finally:
                tx._open = False
                self._current = None
        self._step("committed")
        for callback in tx._after:
            callback()

    # ---- reads of committed state -------------------------------------
    def _query(self, sql: str, args: tuple = ()) -> list:
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    def revision(self) -> int:
        return int(self._query("SELECT value FROM meta WHERE key='revision'")[0][0])

    def schema_version(self) -> int:
        return int(self._query("SELECT value FROM meta WHERE key='schema_version'")[0][0])

    def close(self) -> None:
        with self._write_lock, self._read_lock:
            self._reader.close()
            self._db.close()
