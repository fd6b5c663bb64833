import sqlite3

import pytest

from soda import model
from soda.errors import AlreadyExists, NotFound
from soda.master.store import SCHEMA_VERSION, open_store


def make_service(name="web", n=2):
    spec = model.parse_spec({"name": name, "image": "img", "nodes": n})
    vnodes = tuple(model.VirtualNode(name=f"{name}-{i}", service=name, index=i, resources=spec.resources[i],
                                     node="a", address=f"10.0.0.{i + 2}", prefix_length=24,
                                     gateway="10.0.0.1", weight=1.0, image_digest="sha256:" + "0" * 64,
                                     hypervisor="fake")
                   for i in range(n))
    return model.Service(spec=spec, image_digest="sha256:" + "0" * 64, vnodes=vnodes, created_at=1.0)


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path))
    yield s
    s.close()


def add_node(store, name="a"):
    return store.upsert_node(model.Node(name=name, address="127.0.0.1", capacity=model.Resources(2, 1024, 100, 1000),
                                        hypervisors=("fake",), subnet=f"10.0.{ord(name)}.0/24", gateway="10.0.0.1"))


def test_schema_version_recorded(tmp_path):
    s = open_store(str(tmp_path))
    s.close()
    db = sqlite3.connect(str(tmp_path / "state.db"))
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_service_round_trip_and_restart(tmp_path):
    s = open_store(str(tmp_path))
    add_node(s)
    s.create_service(make_service())
    s.close()
    s = open_store(str(tmp_path))
    got = s.get_service("web")
    assert got == make_service()
    assert s.get_node("a").allocated.cpu == 2.0
    s.close()


def test_create_is_one_transaction(store):
    svc = make_service()
    store.create_service(svc)
    clash = make_service(name="other")
    # A vnode name that already exists makes the whole create fail: no service row left.
    clash = model.Service(spec=clash.spec, image_digest=clash.image_digest,
                          vnodes=(svc.vnodes[0],), created_at=1.0)
    with pytest.raises(sqlite3.IntegrityError):
        store.create_service(clash)
    with pytest.raises(NotFound):
        store.get_service("other")


def test_duplicate_service(store):
    store.create_service(make_service())
    with pytest.raises(AlreadyExists):
        store.create_service(make_service())


def test_deleting_and_delete(store):
    store.create_service(make_service())
    svc = store.mark_service_deleting("web")
    assert svc.deleting and all(v.deleting for v in svc.vnodes)
    store.delete_service("web")
    assert store.list_vnodes() == []
    with pytest.raises(NotFound):
        store.mark_service_deleting("web")


def test_images_names_point_at_digests(store):
    d1, d2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    store.add_image(model.Image(digest=d1, size=10), name="base")
    assert store.resolve_image("base").digest == d1
    store.add_image(model.Image(digest=d2, size=10), name="base")
    assert store.resolve_image("base").digest == d2
    assert store.resolve_image(d1).names == ()
    store.delete_image(d2)
    with pytest.raises(NotFound):
        store.resolve_image("base")



def test_a_nodes_allocated_memory_counts_its_guests_hypervisor_overhead(store):
    store.upsert_node(model.Node(name="a", address="127.0.0.1", capacity=model.Resources(2, 1024, 100, 1000),
                                 hypervisors=("fake",), subnet="10.0.97.0/24", gateway="10.0.97.1",
                                 limits=(model.DriverCapabilities("fake", 0, memory_overhead=24),)))
    store.create_service(make_service(n=2))
    node = store.get_node("a")
    guests = sum(r.memory for r in make_service(n=2).spec.resources)
    assert node.allocated.memory == guests + 2 * 24
    assert node.limit("fake").memory_overhead == 24          # kept across the store
