"""The Master's state store: the interface, and its embedded SQLite backend.

It owns persistence of nodes, images, services and virtual nodes; every
mutating method is one transaction. It knows nothing of scheduling or gRPC.
Nothing outside this module knows which backend is in use: callers get a
`StateStore` from `open_store(state_dir)`.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

from soda import model
from soda.errors import AlreadyExists, NotFound, SodaError

# Version 2: nodes.limits, the smallest guest each hypervisor of a node boots.
# Version 3: nodes.assumed, capacity fields the node took a default for.
SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, address TEXT NOT NULL,
    cpu REAL NOT NULL, memory INTEGER NOT NULL, bandwidth INTEGER NOT NULL, disk INTEGER NOT NULL,
    hypervisors TEXT NOT NULL, subnet TEXT NOT NULL UNIQUE, gateway TEXT NOT NULL,
    state TEXT NOT NULL, registered_at REAL NOT NULL, limits TEXT NOT NULL DEFAULT '[]',
    assumed TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS images (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, init TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS image_names (
    name TEXT PRIMARY KEY, digest TEXT NOT NULL REFERENCES images(digest) ON DELETE CASCADE);
CREATE TABLE IF NOT EXISTS services (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, image_digest TEXT NOT NULL,
    deleting INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS vnodes (
    name TEXT PRIMARY KEY,
    service TEXT NOT NULL REFERENCES services(name) ON DELETE CASCADE,
    idx INTEGER NOT NULL, node TEXT NOT NULL, address TEXT NOT NULL,
    prefix_length INTEGER NOT NULL, gateway TEXT NOT NULL,
    cpu REAL NOT NULL, memory INTEGER NOT NULL, bandwidth INTEGER NOT NULL, disk INTEGER NOT NULL,
    weight REAL NOT NULL, image_digest TEXT NOT NULL, hypervisor TEXT NOT NULL, port INTEGER NOT NULL,
    phase INTEGER NOT NULL, reason TEXT NOT NULL, boot_seconds REAL NOT NULL,
    deleting INTEGER NOT NULL DEFAULT 0, generation INTEGER NOT NULL,
    cpu_cap INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS vnodes_by_node ON vnodes(node);
CREATE INDEX IF NOT EXISTS vnodes_by_service ON vnodes(service);
"""

# What brings a store of version N up to N + 1, applied in order inside the
# transaction that opens it. A store older than version 1 has no meta table
# and is created afresh by _SCHEMA; one newer than SCHEMA_VERSION is refused.
_MIGRATIONS = {
    # Nodes registered before limits existed have none until they register again.
    1: ("ALTER TABLE nodes ADD COLUMN limits TEXT NOT NULL DEFAULT '[]'",),
    2: ("ALTER TABLE nodes ADD COLUMN assumed TEXT NOT NULL DEFAULT '[]'",),
}


class StateStore(abc.ABC):
    """What the Master needs from durable state. Each method is atomic."""

    # nodes
    @abc.abstractmethod
    def upsert_node(self, node: model.Node) -> model.Node: ...
    @abc.abstractmethod
    def get_node(self, name: str) -> model.Node: ...
    @abc.abstractmethod
    def list_nodes(self) -> list[model.Node]: ...
    @abc.abstractmethod
    def set_node_state(self, name: str, state: str) -> None: ...

    # images
    @abc.abstractmethod
    def add_image(self, image: model.Image, name: str = "") -> model.Image: ...
    @abc.abstractmethod
    def resolve_image(self, ref: str) -> model.Image: ...
    @abc.abstractmethod
    def list_images(self) -> list[model.Image]: ...
    @abc.abstractmethod
    def delete_image(self, digest: str) -> None: ...

    # services and their virtual nodes
    @abc.abstractmethod
    def create_service(self, service: model.Service) -> None: ...
    @abc.abstractmethod
    def get_service(self, name: str) -> model.Service: ...
    @abc.abstractmethod
    def list_services(self) -> list[model.Service]: ...
    @abc.abstractmethod
    def list_service_specs(self) -> list[model.ServiceSpec]:
        """Specs only, without virtual nodes: cheap for admission checks."""
    @abc.abstractmethod
    def update_service(self, service: model.Service, removed: Iterable[str] = ()) -> None:
        """Replace the spec and upsert every vnode of `service`; drop `removed`."""
    @abc.abstractmethod
    def mark_service_deleting(self, name: str) -> model.Service: ...
    @abc.abstractmethod
    def delete_service(self, name: str) -> None: ...
    @abc.abstractmethod
    def list_vnodes(self, node: str | None = None, service: str | None = None) -> list[model.VirtualNode]: ...
    @abc.abstractmethod
    def put_vnodes(self, vnodes: Iterable[model.VirtualNode]) -> None: ...
    @abc.abstractmethod
    def delete_vnodes(self, names: Iterable[str]) -> None: ...
    @abc.abstractmethod
    def close(self) -> None: ...


def open_store(state_dir: str) -> StateStore:
    """The embedded default: one SQLite file under the state dir."""
    os.makedirs(state_dir, exist_ok=True)
    return SqliteStore(os.path.join(state_dir, "state.db"))


def _spec_from_json(text: str) -> model.ServiceSpec:
    return model.parse_spec(json.loads(text))


def _limits_to_json(limits: Iterable[model.DriverCapabilities]) -> str:
    return json.dumps([dataclasses.asdict(lim) for lim in limits])


def _limits_from_json(text: str) -> tuple[model.DriverCapabilities, ...]:
    # Limits stored before a field existed take its default.
    return tuple(model.DriverCapabilities(**item) for item in json.loads(text))


_VNODE_COLUMNS = ("name, service, idx, node, address, prefix_length, gateway, cpu, memory, bandwidth, "
                  "disk, weight, image_digest, hypervisor, port, phase, reason, boot_seconds, deleting, "
                  "generation, cpu_cap")


def _vnode_row(v: model.VirtualNode) -> tuple:
    r = v.resources
    return (v.name, v.service, v.index, v.node, v.address, v.prefix_length, v.gateway, r.cpu,
            r.memory, r.bandwidth, r.disk, v.weight, v.image_digest, v.hypervisor, v.port,
            int(v.phase), v.reason, v.boot_seconds, int(v.deleting), v.generation, int(v.cpu_cap))


def _vnode_from_row(row) -> model.VirtualNode:
    (name, service, idx, node, address, prefix_length, gateway, cpu, memory, bandwidth, disk, weight,
     image_digest, hypervisor, port, phase, reason, boot_seconds, deleting, generation, cpu_cap) = row
    return model.VirtualNode(
        name=name, service=service, index=idx, node=node, address=address,
        prefix_length=prefix_length, gateway=gateway,
        resources=model.Resources(cpu, memory, bandwidth, disk), weight=weight,
        image_digest=image_digest, hypervisor=hypervisor, port=port, phase=model.Phase(phase),
        reason=reason, boot_seconds=boot_seconds, deleting=bool(deleting), generation=generation,
        cpu_cap=bool(cpu_cap))


class SqliteStore(StateStore):
    """SQLite in WAL mode; one connection serialised by a lock, since the
    Master's writes are small and a single writer is SQLite's model anyway."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._tx() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            else:
                self._migrate(db, int(row[0]))

    def _migrate(self, db: sqlite3.Connection, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise SodaError(f"state store {self.path} has schema version {version}, newer than the "
                            f"{SCHEMA_VERSION} this Master understands: run a newer soda-master")
        for step in range(version, SCHEMA_VERSION):
            for statement in _MIGRATIONS[step]:
                db.execute(statement)
        if version != SCHEMA_VERSION:
            db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def schema_version(self) -> int:
        return int(self._read("SELECT value FROM meta WHERE key='schema_version'")[0][0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- nodes --------------------------------------------------------
    def upsert_node(self, node: model.Node) -> model.Node:
        c = node.capacity
        with self._tx() as db:
            db.execute(
                "INSERT INTO nodes (name, address, cpu, memory, bandwidth, disk, hypervisors, subnet, "
                "gateway, state, registered_at, limits, assumed) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,strftime('%s','now'),?,?) "
                "ON CONFLICT(name) DO UPDATE SET address=excluded.address, cpu=excluded.cpu, "
                "memory=excluded.memory, bandwidth=excluded.bandwidth, disk=excluded.disk, "
                "hypervisors=excluded.hypervisors, state=excluded.state, limits=excluded.limits, "
                "assumed=excluded.assumed",
                (node.name, node.address, c.cpu, c.memory, c.bandwidth, c.disk,
                 json.dumps(list(node.hypervisors)), node.subnet, node.gateway, node.state,
                 _limits_to_json(node.limits), json.dumps(list(node.assumed))))
        return self.get_node(node.name)

    def _nodes(self, where: str = "", args: tuple = ()) -> list[model.Node]:
        rows = self._read(
            "SELECT n.name, n.address, n.cpu, n.memory, n.bandwidth, n.disk, n.hypervisors, n.subnet, "
            "n.gateway, n.state, COALESCE(SUM(v.cpu),0), COALESCE(SUM(v.memory),0), "
            "COALESCE(SUM(v.bandwidth),0), COALESCE(SUM(v.disk),0), COUNT(v.name), n.limits, "
            "n.assumed "
            "FROM nodes n LEFT JOIN vnodes v ON v.node = n.name " + where +
            " GROUP BY n.name ORDER BY n.name", args)
        guests: dict[str, dict[str, int]] = {}
        for node, hypervisor, count in self._read(
                "SELECT node, hypervisor, COUNT(*) FROM vnodes GROUP BY node, hypervisor"):
            guests.setdefault(node, {})[hypervisor] = count
        nodes = []
        for r in rows:
            limits = _limits_from_json(r[15])
            node = model.Node(name=r[0], address=r[1], capacity=model.Resources(r[2], r[3], r[4], r[5]),
                              hypervisors=tuple(json.loads(r[6])), subnet=r[7], gateway=r[8],
                              state=r[9], allocated=model.Resources(r[10], r[11], r[12], r[13]),
                              vnodes=r[14], limits=limits, assumed=tuple(json.loads(r[16])))
            # Each guest also costs its hypervisor process's own memory.
            overhead = sum(count * node.memory_overhead(hv)
                           for hv, count in guests.get(node.name, {}).items())
            nodes.append(dataclasses.replace(
                node, allocated=node.allocated + model.Resources(memory=overhead)))
        return nodes

    def get_node(self, name: str) -> model.Node:
        nodes = self._nodes("WHERE n.name = ?", (name,))
        if not nodes:
            raise NotFound(f"no physical node named {name!r}")
        return nodes[0]

    def list_nodes(self) -> list[model.Node]:
        return self._nodes()

    def set_node_state(self, name: str, state: str) -> None:
        with self._tx() as db:
            if db.execute("UPDATE nodes SET state=? WHERE name=?", (state, name)).rowcount == 0:
                raise NotFound(f"no physical node named {name!r}")

    # ---- images -------------------------------------------------------
    def add_image(self, image: model.Image, name: str = "") -> model.Image:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO images VALUES (?,?,?,?)",
                       (image.digest, image.size, image.init, image.created_at))
            if name:
                db.execute("INSERT INTO image_names VALUES (?,?) ON CONFLICT(name) DO UPDATE "
                           "SET digest=excluded.digest", (name, image.digest))
        return self.resolve_image(image.digest)

    def _images(self, where: str = "", args: tuple = ()) -> list[model.Image]:
        rows = self._read(
            "SELECT i.digest, i.size, i.init, i.created_at, GROUP_CONCAT(n.name) FROM images i "
            "LEFT JOIN image_names n ON n.digest = i.digest " + where +
            " GROUP BY i.digest ORDER BY i.created_at, i.digest", args)
        return [model.Image(digest=r[0], size=r[1], init=r[2], created_at=r[3],
                            names=tuple(sorted(r[4].split(","))) if r[4] else ()) for r in rows]

    def resolve_image(self, ref: str) -> model.Image:
        if ref.startswith("sha256:"):
            found = self._images("WHERE i.digest = ?", (ref,))
        else:
            found = self._images("WHERE i.digest = (SELECT digest FROM image_names WHERE name = ?)", (ref,))
        if not found:
            raise NotFound(f"no image {ref!r} (push it with: sodactl image push FILE --name NAME)")
        return found[0]

    def list_images(self) -> list[model.Image]:
        return self._images()

    def delete_image(self, digest: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM images WHERE digest = ?", (digest,))

    # ---- services -----------------------------------------------------
    def create_service(self, service: model.Service) -> None:
        with self._tx() as db:
            try:
                db.execute("INSERT INTO services VALUES (?,?,?,?,?)",
                           (service.name, json.dumps(service.spec.as_dict()), service.image_digest,
                            int(service.deleting), service.created_at))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"service {service.name!r} already exists") from None
            db.executemany(f"INSERT INTO vnodes ({_VNODE_COLUMNS}) VALUES ({','.join('?' * 21)})",
                           [_vnode_row(v) for v in service.vnodes])

    def _services(self, where: str = "", args: tuple = ()) -> list[model.Service]:
        with self._lock:
            rows = self._db.execute("SELECT name, spec, image_digest, deleting, created_at FROM services "
                                    + where + " ORDER BY name", args).fetchall()
            vnode_rows = self._db.execute(
                f"SELECT {_VNODE_COLUMNS} FROM vnodes WHERE service IN "
                f"(SELECT name FROM services {where}) ORDER BY service, idx", args).fetchall()
        by_service: dict[str, list] = {}
        for row in vnode_rows:
            by_service.setdefault(row[1], []).append(_vnode_from_row(row))
        return [model.Service(spec=_spec_from_json(r[1]), image_digest=r[2],
                              vnodes=tuple(by_service.get(r[0], ())), deleting=bool(r[3]),
                              created_at=r[4]) for r in rows]

    def get_service(self, name: str) -> model.Service:
        found = self._services("WHERE name = ?", (name,))
        if not found:
            raise NotFound(f"no service named {name!r}")
        return found[0]

    def list_services(self) -> list[model.Service]:
        return self._services()

    def list_service_specs(self) -> list[model.ServiceSpec]:
        return [_spec_from_json(r[0]) for r in self._read("SELECT spec FROM services ORDER BY name")]

    def update_service(self, service: model.Service, removed: Iterable[str] = ()) -> None:
        with self._tx() as db:
            n = db.execute("UPDATE services SET spec=?, deleting=? WHERE name=?",
                           (json.dumps(service.spec.as_dict()), int(service.deleting), service.name)).rowcount
            if n == 0:
                raise NotFound(f"no service named {service.name!r}")
            db.executemany("DELETE FROM vnodes WHERE name = ?", [(name,) for name in removed])
            db.executemany(f"INSERT OR REPLACE INTO vnodes ({_VNODE_COLUMNS}) VALUES ({','.join('?' * 21)})",
                           [_vnode_row(v) for v in service.vnodes])

    def mark_service_deleting(self, name: str) -> model.Service:
        with self._tx() as db:
            if db.execute("UPDATE services SET deleting=1 WHERE name=?", (name,)).rowcount == 0:
                raise NotFound(f"no service named {name!r}")
            db.execute("UPDATE vnodes SET deleting=1 WHERE service=?", (name,))
        return self.get_service(name)

    def delete_service(self, name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM services WHERE name=?", (name,))

    def list_vnodes(self, node: str | None = None, service: str | None = None) -> list[model.VirtualNode]:
        clauses, args = [], []
        if node is not None:
            clauses.append("node = ?")
            args.append(node)
        if service is not None:
            clauses.append("service = ?")
            args.append(service)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        return [_vnode_from_row(r) for r in
                self._read(f"SELECT {_VNODE_COLUMNS} FROM vnodes {where} ORDER BY service, idx", tuple(args))]

    def put_vnodes(self, vnodes: Iterable[model.VirtualNode]) -> None:
        with self._tx() as db:
            db.executemany(f"INSERT OR REPLACE INTO vnodes ({_VNODE_COLUMNS}) VALUES ({','.join('?' * 21)})",
                           [_vnode_row(v) for v in vnodes])

    def delete_vnodes(self, names: Iterable[str]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM vnodes WHERE name = ?", [(n,) for n in names])
