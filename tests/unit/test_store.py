import dataclasses
import json
import sqlite3
import threading

import pytest

from soda import model
from soda.errors import AlreadyExists, Conflict, NotFound, WrongState
from soda.master.store import SCHEMA_VERSION, StateStore, Transaction, open_store, revision_of, update_of

DIGEST = "sha256:" + "0" * 64


def make_service(name="web", n=2, node="a"):
    spec = model.parse_spec({"name": name, "image": "img", "nodes": n})
    vnodes = tuple(model.VirtualNode(name=f"{name}-{i}", service=name, index=i, resources=spec.resources[i],
                                     node=node, address=f"10.0.0.{i + 2}", prefix_length=24,
                                     gateway="10.0.0.1", weight=1.0, image_digest=DIGEST, hypervisor="fake")
                   for i in range(n))
    return model.Service(spec=spec, image_digest=DIGEST, vnodes=vnodes, created_at=1.0)


def plain(record):
    """A stored record as the model object it stores (without its revision)."""
    if isinstance(record, model.Service):
        return model.Service(spec=record.spec, image_digest=record.image_digest,
                             vnodes=tuple(plain(v) for v in record.vnodes), deleting=record.deleting,
                             created_at=record.created_at)
    cls = next(c for c in type(record).__mro__ if c.__module__.startswith("soda.model."))
    return cls(**{f.name: getattr(record, f.name) for f in dataclasses.fields(cls)})


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path))
    yield s
    s.close()


def node(name="a", **kw):
    return model.Node(name=name, address="127.0.0.1", capacity=model.Resources(2, 1024, 100, 1000),
                      hypervisors=("fake",), subnet=f"10.0.{ord(name)}.0/24", gateway="10.0.0.1", **kw)


def add_node(store, name="a", **kw):
    with store.transaction() as tx:
        tx.put_node(node(name, **kw))
    return store.get_node(name)


def create(store, service):
    with store.transaction() as tx:
        tx.create_service(service)
    return store.get_service(service.name)


def test_schema_version_recorded(tmp_path):
    s = open_store(str(tmp_path))
    s.close()
    db = sqlite3.connect(str(tmp_path / "state.db"))
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_state_changes_only_in_a_transaction(store):
    assert isinstance(store, StateStore)
    writes = [name for name in dir(Transaction) if name.startswith(("put_", "create_", "delete_"))]
    assert writes and not [name for name in writes if hasattr(store, name)]


def test_service_round_trip_and_restart(tmp_path):
    s = open_store(str(tmp_path))
    add_node(s)
    create(s, make_service())
    s.close()
    s = open_store(str(tmp_path))
    got = s.get_service("web")
    assert plain(got) == make_service()
    assert got.revision == 2 and {v.revision for v in got.vnodes} == {2}
    assert s.get_node("a").allocated.cpu == 2.0
    s.close()


def test_each_committed_transaction_is_one_revision(store):
    assert store.revision() == 0
    add_node(store)
    assert store.revision() == 1 and store.get_node("a").revision == 1
    with store.transaction() as tx:
        tx.create_service(make_service())
        tx.put_vnodes([dataclasses.replace(tx.get_service("web").vnodes[0], phase=model.Phase.RUNNING)])
    assert store.revision() == 2
    assert {v.revision for v in store.list_vnodes()} == {2}
    with store.transaction() as tx:                  # reads only: no new revision
        tx.list_services()
    assert store.revision() == 2


def test_create_is_one_transaction(store):
    svc = make_service()
    create(store, svc)
    clash = make_service(name="other")
    # A vnode name that already exists makes the whole create fail: no service row left.
    clash = model.Service(spec=clash.spec, image_digest=clash.image_digest,
                          vnodes=(svc.vnodes[0],), created_at=1.0)
    with pytest.raises(Conflict, match="web-0.*already exists"):
        create(store, clash)
    with pytest.raises(NotFound):
        store.get_service("other")


def test_duplicate_service(store):
    create(store, make_service())
    with pytest.raises(AlreadyExists):
        create(store, make_service())


def test_deleting_and_delete(store):
    svc = create(store, make_service())
    with store.transaction() as tx:
        tx.put_service(dataclasses.replace(svc, deleting=True))
        tx.put_vnodes(dataclasses.replace(v, deleting=True) for v in svc.vnodes)
    svc = store.get_service("web")
    assert svc.deleting and all(v.deleting for v in svc.vnodes)
    with pytest.raises(WrongState, match="still has 2 virtual node"), store.transaction() as tx:
        tx.delete_service(svc)
    with store.transaction() as tx:
        tx.delete_vnodes(svc.vnodes[:1])
        # A transaction counts its own writes.
        assert tx.count_vnodes("web") == 1
    assert store.count_vnodes("web") == 1 and store.count_vnodes("other") == 0
    assert store.vnode_addresses("a") == {svc.vnodes[1].address} and store.vnode_addresses("b") == set()
    with store.transaction() as tx:
        tx.delete_vnodes(svc.vnodes[1:])
        tx.delete_service(svc)
    assert store.list_vnodes() == [] and store.list_services() == []
    assert store.count_vnodes("web") == 0


def test_a_stale_update_is_a_conflict_and_writes_nothing(store):
    svc = create(store, make_service())
    v0, v1 = svc.vnodes
    with store.transaction() as tx:                  # another writer moves web-0 on
        tx.put_vnodes([dataclasses.replace(v0, phase=model.Phase.RUNNING)])
    revision = store.revision()
    with pytest.raises(Conflict, match="web-0.*changed since it was read"), store.transaction() as tx:
        tx.put_vnodes([dataclasses.replace(v1, reason="first")])          # fine on its own
        tx.put_vnodes([dataclasses.replace(v0, reason="based on an old read")])
    assert store.revision() == revision
    assert [(v.phase, v.reason) for v in store.list_vnodes()] == [(model.Phase.RUNNING, ""),
                                                                  (model.Phase.PENDING, "")]
    with pytest.raises(Conflict), store.transaction() as tx:
        tx.delete_vnodes([v0])
    with pytest.raises(Conflict, match="web-0.*already exists"), store.transaction() as tx:
        # The service record did not change since svc was read, and one
        # record may be written twice in a transaction from its read form ...
        tx.put_service(dataclasses.replace(svc, deleting=True))
        tx.put_service(dataclasses.replace(svc, deleting=True))
        # ... but a new record under a name that is taken is refused, and
        # with it the whole transaction.
        tx.put_vnodes([plain(v0)])
    assert not store.get_service("web").deleting


def test_update_of_carries_the_revision_of_what_it_replaces(store):
    add_node(store)
    old = store.get_node("a")
    fresh = node("a", state="LOST")
    with pytest.raises(Conflict, match="node 'a' already exists"), store.transaction() as tx:
        tx.put_node(fresh)
    with store.transaction() as tx:
        tx.put_node(update_of(old, fresh))
    again = store.get_node("a")
    assert again.state == "LOST" and again.revision == old.revision + 1
    assert revision_of(fresh) == 0 and revision_of(again) == again.revision
    with pytest.raises(Conflict, match="revision 2, the write was based on 1"), store.transaction() as tx:
        tx.put_node(update_of(old, fresh))


def test_a_transaction_that_raises_rolls_back_and_runs_no_after_commit(store):
    ran = []
    with pytest.raises(RuntimeError, match="boom"), store.transaction() as tx:
        tx.create_service(make_service())
        tx.after_commit(lambda: ran.append("rolled back"))
        raise RuntimeError("boom")
    assert store.list_services() == [] and store.revision() == 0 and ran == []

    def after():
        # Runs once committed and outside the transaction: another may open.
        ran.append(store.get_service("web").revision)
        with store.transaction() as tx2:
            tx2.list_services()
    with store.transaction() as tx:
        tx.create_service(make_service())
        tx.after_commit(after)
        assert ran == []
    assert ran == [1]


def test_reads_outside_a_transaction_see_committed_state_only(store):
    create(store, make_service())
    written, release = threading.Event(), threading.Event()

    def writer():
        with store.transaction() as tx:
            tx.put_vnodes([dataclasses.replace(v, phase=model.Phase.RUNNING) for v in tx.list_vnodes()])
            assert {v.phase for v in tx.list_vnodes()} == {model.Phase.RUNNING}    # its own writes
            written.set()
            release.wait(5)
    t = threading.Thread(target=writer)
    t.start()
    try:
        assert written.wait(5)
        # Not blocked by the open transaction, and blind to its writes.
        assert {v.phase for v in store.get_service("web").vnodes} == {model.Phase.PENDING}
    finally:
        release.set()
        t.join(5)
    assert {v.phase for v in store.get_service("web").vnodes} == {model.Phase.RUNNING}


def test_transactions_do_not_nest_and_end_with_their_block(store):
    with store.transaction() as tx:
        with pytest.raises(RuntimeError, match="does not nest"):
            with store.transaction():
                pass
    with pytest.raises(RuntimeError, match="has ended"):
        tx.list_services()


def test_images_names_point_at_digests(store):
    d1, d2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    with store.transaction() as tx:
        tx.put_image(model.Image(digest=d1, size=10), name="base")
    assert store.resolve_image("base").digest == d1
    with store.transaction() as tx:
        tx.put_image(model.Image(digest=d2, size=10), name="base")
    assert store.resolve_image("base").digest == d2
    first = store.resolve_image(d1)
    assert first.names == () and first.revision == 2     # losing a name changes an image
    with store.transaction() as tx:
        tx.delete_image(store.resolve_image(d2))
    with pytest.raises(NotFound):
        store.resolve_image("base")


def test_a_nodes_allocated_memory_counts_its_guests_hypervisor_overhead(store):
    add_node(store, limits=(model.DriverCapabilities("fake", 0, memory_overhead=24),))
    create(store, make_service(n=2))
    got = store.get_node("a")
    guests = sum(r.memory for r in make_service(n=2).spec.resources)
    assert got.allocated.memory == guests + 2 * 24
    assert got.limit("fake").memory_overhead == 24          # kept across the store


def _odd_spec():
    """A spec today's validation refuses (8 MiB, an unknown policy), as if
    accepted by an older, laxer Master."""
    return model.ServiceSpec(
        name="old", image="img", nodes=2, hypervisor="uml", port=8080, cpu_cap=True,
        resources=(model.Resources(0.5, 8, 10, 64), model.Resources(1.0, 8, 10, 64)),
        switch=model.SwitchSpec(listen="127.0.0.1:8080", policy="random",
                                health=model.HealthCheck(kind="http", path="/x")),
        on_demand=model.OnDemand(max_nodes=3, idle_seconds=60.0, resources=model.Resources(1.0, 8, 10, 64)),
        template=model.Resources(1.0, 8, 10, 64))


def test_stored_specs_are_decoded_not_validated_again(tmp_path, monkeypatch):
    s = open_store(str(tmp_path))
    with s.transaction() as tx:
        tx.create_service(model.Service(spec=_odd_spec(), image_digest=DIGEST, created_at=1.0))
    s.close()

    def refuse(*args, **kwargs):
        raise AssertionError("a stored spec was validated again")
    monkeypatch.setattr(model, "parse_spec", refuse)
    monkeypatch.setattr(model, "validate_spec", refuse)
    s = open_store(str(tmp_path))
    assert s.get_service("old").spec == _odd_spec()
    assert s.list_service_specs() == [_odd_spec()]
    s.close()


def test_a_stored_spec_missing_a_later_field_takes_its_default(tmp_path):
    s = open_store(str(tmp_path))
    create(s, model.Service(spec=_odd_spec(), image_digest=DIGEST, created_at=1.0))
    s.close()
    db = sqlite3.connect(str(tmp_path / "state.db"))
    stored = json.loads(db.execute("SELECT spec FROM services").fetchone()[0])
    del stored["cpu_cap"], stored["switch"]["drain_seconds"]
    stored["retired_field"] = 1
    db.execute("UPDATE services SET spec=?", (json.dumps(stored),))
    db.commit()
    db.close()
    s = open_store(str(tmp_path))
    got = s.get_service("old").spec
    assert got.cpu_cap is False and got.switch.drain_seconds == model.SwitchSpec().drain_seconds
    assert got.resources == _odd_spec().resources
    s.close()


def _as_version_11(path):
    """The file as a version 11 Master left it: moves paired by counting."""
    db = sqlite3.connect(path)
    for column in ("replaces", "moving_to", "disk_base"):
        db.execute(f"ALTER TABLE vnodes DROP COLUMN {column}")
    db.execute("UPDATE meta SET value='11' WHERE key='schema_version'")
    db.commit()
    db.close()


def test_a_version_11_store_keeps_its_virtual_nodes_with_no_move_in_flight(tmp_path):
    s = open_store(str(tmp_path))
    add_node(s)
    create(s, make_service())
    before = {v.name for v in s.list_vnodes()}
    s.close()
    _as_version_11(str(tmp_path / "state.db"))
    s = open_store(str(tmp_path))
    assert s.schema_version() == SCHEMA_VERSION
    after = s.list_vnodes()
    assert {v.name for v in after} == before
    assert not any(v.replaces or v.moving_to or v.disk_base for v in after)
    assert s.moving_services() == set()
    s.close()


def _as_version_10(path):
    """The file as a version 10 Master left it: no frozen virtual nodes."""
    _as_version_11(path)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE vnodes DROP COLUMN frozen")
    db.execute("UPDATE meta SET value='10' WHERE key='schema_version'")
    db.commit()
    db.close()


def test_a_version_10_store_keeps_its_virtual_nodes_thawed(tmp_path):
    s = open_store(str(tmp_path))
    add_node(s)
    create(s, make_service())
    before = {v.name for v in s.list_vnodes()}
    s.close()
    _as_version_10(str(tmp_path / "state.db"))
    s = open_store(str(tmp_path))
    assert s.schema_version() == SCHEMA_VERSION
    after = s.list_vnodes()
    assert {v.name for v in after} == before and not any(v.frozen for v in after)
    s.close()


def _as_version_9(path):
    """The file as a version 9 Master left it: no layered images."""
    _as_version_10(path)
    db = sqlite3.connect(path)
    for column in ("parent", "layer", "layer_size"):
        db.execute(f"ALTER TABLE images DROP COLUMN {column}")
    db.execute("UPDATE meta SET value='9' WHERE key='schema_version'")
    db.commit()
    db.close()


def test_a_version_9_store_keeps_its_images_as_whole_images(tmp_path):
    s = open_store(str(tmp_path))
    image = model.Image(digest="sha256:" + "ab" * 32, size=4096, created_at=1.0)
    with s.transaction() as tx:
        tx.put_image(image, name="base")
    s.close()
    _as_version_9(str(tmp_path / "state.db"))
    s = open_store(str(tmp_path))
    assert s.schema_version() == SCHEMA_VERSION
    got = s.resolve_image("base")
    assert (got.digest, got.size, got.parent, got.layer, got.layer_size) == (image.digest, 4096, "", "", 0)
    layered = model.Image(digest="sha256:" + "cd" * 32, size=8192, created_at=2.0, parent=image.digest,
                          layer="sha256:" + "ef" * 32, layer_size=300)
    with s.transaction() as tx:
        tx.put_image(layered, name="app")
    got = s.resolve_image("app")
    assert (got.parent, got.layer, got.layer_size, got.stored_size) == (image.digest, layered.layer, 300, 300)
    s.close()


def _as_version_8(path):
    """The file as a version 8 Master left it: no vnodes.boot_timeout."""
    _as_version_9(path)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE vnodes DROP COLUMN boot_timeout")
    db.execute("UPDATE meta SET value='8' WHERE key='schema_version'")
    db.commit()
    db.close()


def test_a_version_8_store_keeps_its_virtual_nodes_with_the_default_boot_timeout(tmp_path):
    s = open_store(str(tmp_path))
    add_node(s)
    create(s, make_service())
    before = {v.name: v for v in s.list_vnodes()}
    s.close()
    _as_version_8(str(tmp_path / "state.db"))
    s = open_store(str(tmp_path))
    assert s.schema_version() == SCHEMA_VERSION
    after = {v.name: v for v in s.list_vnodes()}
    assert set(after) == set(before) and all(v.boot_timeout == 0.0 for v in after.values())
    s.close()


def test_a_virtual_nodes_boot_timeout_is_kept(tmp_path):
    s = open_store(str(tmp_path))
    add_node(s)
    service = make_service()
    create(s, dataclasses.replace(service, vnodes=tuple(
        dataclasses.replace(v, boot_timeout=45.5) for v in service.vnodes)))
    s.close()
    s = open_store(str(tmp_path))
    assert {v.boot_timeout for v in s.list_vnodes()} == {45.5}
    s.close()


def _as_version_7(path):
    """The file as a version 7 Master left it: no tenants, no quotas."""
    _as_version_8(path)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE services DROP COLUMN owner")
    db.execute("ALTER TABLE images DROP COLUMN owners")
    db.execute("ALTER TABLE images DROP COLUMN public")
    db.execute("ALTER TABLE image_names DROP COLUMN owner")
    db.execute("DROP TABLE quotas")
    db.execute("UPDATE meta SET value='7' WHERE key='schema_version'")
    db.commit()
    db.close()


def test_a_version_7_store_keeps_its_services_and_images_as_the_operators(tmp_path):
    s = open_store(str(tmp_path))
    add_node(s)
    with s.transaction() as tx:
        tx.put_image(model.Image(digest="sha256:" + "b" * 64, size=4096, owners=("acme",)), name="web")
    create(s, make_service(n=2))
    s.close()
    _as_version_7(str(tmp_path / "state.db"))
    s = open_store(str(tmp_path))
    assert s.schema_version() == SCHEMA_VERSION
    assert [x.owner for x in s.list_services()] == [""]
    [image] = [i for i in s.list_images() if i.names == ("web",)]
    assert (image.owners, image.public, s.image_name_owner("web")) == ((), False, "")
    assert s.quotas() == {}
    with s.transaction() as tx:
        tx.put_quota("acme", model.Quota(cpu=2.0, vnodes=3))
    assert s.quotas() == {"acme": model.Quota(cpu=2.0, vnodes=3)}
    s.close()


def test_image_owners_and_name_owner_are_kept(tmp_path):
    s = open_store(str(tmp_path))
    digest = "sha256:" + "c" * 64
    with s.transaction() as tx:
        tx.put_image(model.Image(digest=digest, size=4096, owners=("acme",)), name="web",
                     name_owner="acme")
    first = s.resolve_image("web")
    assert (first.owners, s.image_name_owner("web"), s.image_name_owner("nope")) == (("acme",), "acme", None)
    with s.transaction() as tx:
        tx.put_image(model.Image(digest=digest, size=4096, owners=("acme", "beta"), public=True))
    second = s.resolve_image(digest)
    assert (second.owners, second.public) == (("acme", "beta"), True)
    assert second.revision > first.revision
    s.close()


def _as_version_6(path):
    """The file as a version 6 Master left it: virtual nodes without move records."""
    _as_version_7(path)
    db = sqlite3.connect(path)
    for column in ("moved_from", "moved_at", "moved_why"):
        db.execute(f"ALTER TABLE vnodes DROP COLUMN {column}")
    db.execute("UPDATE meta SET value='6' WHERE key='schema_version'")
    db.commit()
    db.close()


def test_a_version_6_store_keeps_its_virtual_nodes_and_records_moves_from_then_on(tmp_path):
    s = open_store(str(tmp_path))
    add_node(s)
    create(s, make_service(n=2))
    before = s.list_vnodes(), s.revision()
    s.close()
    _as_version_6(str(tmp_path / "state.db"))
    s = open_store(str(tmp_path))
    assert s.schema_version() == SCHEMA_VERSION
    assert (s.list_vnodes(), s.revision()) == before
    assert all(v.last_move is None for v in s.list_vnodes())
    move = model.VnodeMove("a", 1_700_000_000.123456789, "node a lost: no heartbeat for 11 s")
    with s.transaction() as tx:
        tx.put_vnodes([dataclasses.replace(before[0][0], last_move=move)])
    assert s.list_vnodes()[0].last_move == move          # the time to the last bit
    assert s.list_vnodes()[1].last_move is None
    s.close()


def _as_version_5(path):
    """The file as a version 5 Master left it: nodes without drains."""
    _as_version_6(path)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE nodes DROP COLUMN draining")
    db.execute("UPDATE meta SET value='5' WHERE key='schema_version'")
    db.commit()
    db.close()


def _as_version_4(path):
    """The file as a version 4 Master left it: nodes without labels."""
    _as_version_5(path)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE nodes DROP COLUMN labels")
    db.execute("UPDATE meta SET value='4' WHERE key='schema_version'")
    db.commit()
    db.close()


def _as_version_3(path, specs):
    """The file as a version 3 Master left it: no labels, no revisions, specs in their YAML form."""
    _as_version_4(path)
    db = sqlite3.connect(path)
    for table in ("nodes", "images", "services", "vnodes"):
        db.execute(f"ALTER TABLE {table} DROP COLUMN revision")
    db.execute("DELETE FROM meta WHERE key='revision'")
    db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    for spec in specs:
        db.execute("UPDATE services SET spec=? WHERE name=?", (json.dumps(spec.as_dict()), spec.name))
    db.commit()
    db.close()


def test_a_version_3_store_gets_revisions_and_keeps_its_specs(tmp_path):
    uneven = model.parse_spec({"name": "web", "image": "img", "nodes": 2,
                               "resources": {"cpu": [0.5, 1.0], "memory": 64},
                               "switch": {"listen": "127.0.0.1:8080", "health": {"path": "/up"}}})
    resting = model.parse_spec({"name": "idle", "image": "img", "nodes": 0, "resources": {"cpu": 0.25},
                                "on_demand": {"max_nodes": 2, "idle_seconds": 30}})
    s = open_store(str(tmp_path))
    add_node(s)
    with s.transaction() as tx:
        tx.put_image(model.Image(digest=DIGEST, size=10), name="img")
        tx.create_service(model.Service(spec=uneven, image_digest=DIGEST, created_at=1.0,
                                        vnodes=make_service(n=2).vnodes))
        tx.create_service(model.Service(spec=resting, image_digest=DIGEST, created_at=1.0))
        tx.create_service(model.Service(spec=_odd_spec(), image_digest=DIGEST, created_at=1.0))
    s.close()
    _as_version_3(str(tmp_path / "state.db"), [uneven, resting, _odd_spec()])
    s = open_store(str(tmp_path))
    assert s.schema_version() == SCHEMA_VERSION and s.revision() == 1
    assert [x.spec for x in s.list_services()] == [resting, _odd_spec(), uneven]
    assert {revision_of(r) for r in [*s.list_services(), *s.list_vnodes(), *s.list_nodes(),
                                     *s.list_images()]} == {1}
    add_node(s, "b")
    assert s.revision() == 2
    s.close()


def _node_columns(path):
    db = sqlite3.connect(path)
    try:
        return [row[1] for row in db.execute("PRAGMA table_info(nodes)")]
    finally:
        db.close()


def test_a_version_4_store_finds_its_nodes_without_labels(tmp_path):
    path = str(tmp_path / "state.db")
    s = open_store(str(tmp_path))
    add_node(s, "a", limits=(model.DriverCapabilities("fake", 16, memory_overhead=8),))
    add_node(s, "b", assumed=("bandwidth",))
    create(s, make_service(n=2))
    before = {n.name: revision_of(n) for n in s.list_nodes()}, s.revision()
    s.close()
    _as_version_4(path)
    assert "labels" not in _node_columns(path)          # what the migration starts from

    s = open_store(str(tmp_path))
    assert s.schema_version() == SCHEMA_VERSION and "labels" in _node_columns(path)
    a, b = s.list_nodes()
    assert (a.name, b.name) == ("a", "b")
    assert a.labels == {} and b.labels == {}
    # Everything else the nodes held is as it was, revisions included.
    assert a.limit("fake").memory_overhead == 8 and b.assumed == ("bandwidth",)
    assert a.vnodes == 2
    assert ({n.name: revision_of(n) for n in (a, b)}, s.revision()) == before
    # A node registering again after the migration keeps its labels.
    with s.transaction() as tx:
        tx.put_node(update_of(a, dataclasses.replace(a, labels={"zone": "a"})))
    s.close()
    s = open_store(str(tmp_path))
    assert s.get_node("a").labels == {"zone": "a"} and s.get_node("b").labels == {}
    s.close()


def test_labels_round_trip_through_the_store(store):
    add_node(store, "a", labels={"zone": "eu-1", "rack": "r7"})
    add_node(store, "b")
    assert store.get_node("a").labels == {"rack": "r7", "zone": "eu-1"}
    assert store.get_node("b").labels == {}
    with store.transaction() as tx:
        a = tx.get_node("a")
        tx.put_node(update_of(a, dataclasses.replace(a, labels={"zone": "eu-2"})))
    assert store.get_node("a").labels == {"zone": "eu-2"}          # replaced, not merged
    db = sqlite3.connect(store.path)
    assert json.loads(db.execute("SELECT labels FROM nodes WHERE name='a'").fetchone()[0]) == {"zone": "eu-2"}
    db.close()


def test_a_version_5_store_has_no_node_draining(tmp_path):
    path = str(tmp_path / "state.db")
    s = open_store(str(tmp_path))
    add_node(s, "a")
    before = revision_of(s.get_node("a")), s.revision()
    s.close()
    _as_version_5(path)
    assert "draining" not in _node_columns(path)

    s = open_store(str(tmp_path))
    assert s.schema_version() == SCHEMA_VERSION and "draining" in _node_columns(path)
    a = s.get_node("a")
    assert a.draining is False and (revision_of(a), s.revision()) == before
    with s.transaction() as tx:
        tx.put_node(update_of(a, dataclasses.replace(a, draining=True)))
    s.close()
    s = open_store(str(tmp_path))
    assert s.get_node("a").draining is True
    s.close()


def test_a_node_is_deleted_only_once_it_holds_no_virtual_node(tmp_path):
    s = open_store(str(tmp_path))
    add_node(s, "a")
    create(s, make_service(n=1))
    with pytest.raises(WrongState, match="still has 1 virtual node"):
        with s.transaction() as tx:
            tx.delete_node(tx.get_node("a"))
    with s.transaction() as tx:
        tx.delete_vnodes(tx.list_vnodes(node="a"))
    subnet = s.get_node("a").subnet
    with s.transaction() as tx:
        tx.delete_node(tx.get_node("a"))
    assert s.list_nodes() == []
    # Its subnet is free for the next node.
    with s.transaction() as tx:
        tx.put_node(dataclasses.replace(node("b"), subnet=subnet))
    assert s.get_node("b").subnet == subnet
    s.close()


def test_virtual_nodes_by_name_within_node_and_service(store):
    create(store, make_service("web", 3, node="a"))
    create(store, make_service("api", 2, node="b"))
    names = lambda vnodes: [v.name for v in vnodes]  # noqa: E731
    assert names(store.list_vnodes(names=["api-1", "web-0", "nobody"])) == ["api-1", "web-0"]
    assert names(store.list_vnodes(node="a", names=["api-1", "web-2"])) == ["web-2"]
    assert names(store.list_vnodes(service="api", names=["api-0"])) == ["api-0"]
    assert store.list_vnodes(names=[]) == []
    with store.transaction() as tx:
        assert names(tx.list_vnodes(node="b", names=("api-0", "api-1"))) == ["api-0", "api-1"]


def test_a_virtual_node_read_back_is_what_its_constructor_makes_field_for_field(store):
    # The store builds read records without calling __init__ (for speed):
    # every field must be there, as the constructor would set it.
    from soda.master.store import StoredVirtualNode
    svc = make_service("web", 1)
    moved = dataclasses.replace(svc.vnodes[0], phase=model.Phase.RUNNING, reason="up", boot_seconds=0.5,
                                generation=3, cpu_cap=True, boot_timeout=9.0, port=8080, weight=2.0,
                                last_move=model.VnodeMove("b", 12.0, "node b lost"))
    create(store, dataclasses.replace(svc, vnodes=(moved,)))
    [read] = store.list_vnodes()
    fields = {f.name for f in dataclasses.fields(StoredVirtualNode)}
    assert set(vars(read)) == fields
    assert read == StoredVirtualNode(**{name: getattr(read, name) for name in fields})
    assert plain(read) == moved
    assert isinstance(read.phase, model.Phase) and isinstance(read.resources, model.Resources)
    with pytest.raises(dataclasses.FrozenInstanceError):
        read.reason = "changed"


def test_node_states_of_all_and_at_an_address(store):
    add_node(store, "a")
    add_node(store, "b", state="LOST")
    with store.transaction() as tx:
        tx.put_node(dataclasses.replace(node("c"), address="10.1.1.1"))
        assert tx.node_states("10.1.1.1") == {"c": "READY"}
    assert store.node_states("127.0.0.1") == {"a": "READY", "b": "LOST"}
    assert store.node_states("10.9.9.9") == {}
    assert store.node_states() == {"a": "READY", "b": "LOST", "c": "READY"}
