"""The store at the size of a cluster of hundreds of nodes: each read is one
row from SQLite (the sqlite3 module lets go of the GIL at every row, which
a busy thread beside it turns into a wait each), values come back exactly
as written, and the writer's lock is granted in turn."""

import threading
import time

import pytest

from soda import model
from soda.master.store import FairLock, open_store

DIGEST = "sha256:" + "0" * 64


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path))
    yield s
    s.close()


def fill(store, nodes=40, per_node=5):
    limits = (model.DriverCapabilities("fake", 16, memory_overhead=32), model.DriverCapabilities("uml", 32))
    with store.transaction() as tx:
        for i in range(nodes):
            tx.put_node(model.Node(name=f"n{i:03d}", address=f"127.1.0.{i + 1}",
                                   capacity=model.Resources(64 / 3, 65536, 1000, 10**6),
                                   hypervisors=("fake", "uml"), subnet=f"10.{i // 256}.{i % 256}.0/24",
                                   gateway="10.0.0.1", limits=limits, labels={"zone": f"z{i % 3}"}))
    spec = model.parse_spec({"name": "web", "image": "img", "nodes": nodes * per_node,
                             "resources": {"cpu": 0.1, "memory": 16}})
    vnodes = tuple(model.VirtualNode(
        name=f"web-{i}", service="web", index=i, node=f"n{i % nodes:03d}",
        resources=model.Resources(1 / 3 if i % 2 else 0.1, 16, 7, 32),
        address=f"10.0.0.{i % 250 + 2}", prefix_length=24, gateway="10.0.0.1", weight=0.1 * 3 + i,
        image_digest=DIGEST, hypervisor="uml" if i % 4 == 0 else "fake", boot_seconds=0.1 + 0.2,
        reason="waiting \x1e\x1f \"quoted\" é") for i in range(nodes * per_node))
    with store.transaction() as tx:
        tx.create_service(model.Service(spec=spec, image_digest=DIGEST, vnodes=vnodes, created_at=1 / 7))
    return vnodes


def reads(reader):
    reader.list_nodes()
    reader.get_node("n001")
    reader.list_vnodes()
    reader.list_vnodes(node="n002")
    reader.list_vnodes(service="web")
    reader.list_services()
    reader.get_service("web")
    reader.list_service_specs()


def counting(monkeypatch, reader, seen):
    real = reader._query
    monkeypatch.setattr(reader, "_query", lambda sql, args=(): seen.append(real(sql, args)) or seen[-1])


def test_every_read_is_one_row(store, monkeypatch):
    fill(store)
    seen = []
    counting(monkeypatch, store, seen)
    reads(store)
    with store.transaction() as tx:
        counting(monkeypatch, tx, seen)
        reads(tx)
    assert len(seen) == 16 and all(len(rows) == 1 for rows in seen)


def test_values_read_back_exactly_as_written_in_a_transaction_and_out(store):
    written = fill(store)
    with store.transaction() as tx:
        inside = (tx.list_vnodes(), tx.get_service("web").vnodes, tx.list_nodes())
    for vnodes in (store.list_vnodes(), store.get_service("web").vnodes, inside[0], inside[1]):
        assert [(v.name, v.resources, v.weight, v.boot_seconds, v.reason, v.hypervisor) for v in vnodes] == \
            [(v.name, v.resources, v.weight, v.boot_seconds, v.reason, v.hypervisor)
             for v in sorted(written, key=lambda v: v.index)]
        assert all(type(v.resources.cpu) is float and type(v.resources.memory) is int for v in vnodes)
    assert store.get_service("web").created_at == 1 / 7
    for nodes in (store.list_nodes(), inside[2]):
        assert [n.name for n in nodes] == sorted(n.name for n in nodes)
        n1 = next(n for n in nodes if n.name == "n001")
        mine = [v for v in written if v.node == "n001"]
        assert n1.capacity.cpu == 64 / 3
        assert n1.vnodes == len(mine)
        assert n1.allocated.memory == sum(v.resources.memory + (32 if v.hypervisor == "fake" else 0)
                                          for v in mine)
        assert n1.allocated.cpu == pytest.approx(sum(v.resources.cpu for v in mine))
        assert n1.labels == {"zone": "z1"} and n1.limits[0].memory_overhead == 32
    assert store.get_node("n001") == next(n for n in store.list_nodes() if n.name == "n001")


def test_an_empty_store_reads_empty(store):
    assert store.list_nodes() == [] and store.list_vnodes() == [] and store.list_services() == []
    assert store.list_service_specs() == []


def test_the_fair_lock_is_granted_in_the_order_it_was_asked_for():
    lock = FairLock()
    order, threads = [], []
    lock.acquire()
    for i in range(8):
        def take(i=i):
            with lock:
                order.append(i)
        threads.append(threading.Thread(target=take))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while len(lock._waiters) < i + 1 and time.monotonic() < deadline:    # queued in this order
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(5)
    assert order == list(range(8))


def test_the_fair_lock_is_reentrant_and_held_by_one_thread():
    lock = FairLock()
    with lock:
        with lock:
            pass
        got = []
        t = threading.Thread(target=lambda: got.append(lock.acquire()) or lock.release())
        t.start()
        t.join(0.2)
        assert t.is_alive() and not got            # still held by this thread
    t.join(5)
    assert got == [True]
    with pytest.raises(RuntimeError):
        lock.release()


def test_many_virtual_nodes_are_written_and_deleted_a_few_statements_at_a_time(store):
    written = fill(store, nodes=40, per_node=15)          # 600: more than one statement's worth
    statements = []
    store._db.set_trace_callback(statements.append)
    try:
        with store.transaction() as tx:
            vnodes = tx.list_vnodes()
            tx.put_vnodes([v.with_status(model.Phase.RUNNING, "", 0.25) for v in vnodes[:300]])
            tx.delete_vnodes(vnodes[300:])
    finally:
        store._db.set_trace_callback(None)
    assert len(statements) <= 20
    left = store.list_vnodes()
    assert [v.name for v in left] == [v.name for v in sorted(written, key=lambda v: v.index)[:300]]
    assert all(v.phase == model.Phase.RUNNING and v.boot_seconds == 0.25 for v in left)
    assert store.get_node("n001").vnodes == sum(1 for v in left if v.node == "n001")
