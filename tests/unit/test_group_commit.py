"""Group commit (soda.master.group_commit) and the transaction parts it
runs units in (Transaction.part), on the real SQLite store: units of many
threads share transactions, each unit's result and failure are its own,
and what a failed unit wrote is not in the store."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest

from soda import model
from soda.errors import NotFound
from soda.master.group_commit import GroupCommit
from soda.master.store import open_store


@pytest.fixture
def store(tmp_path):
    s = open_store(str(tmp_path))
    yield s
    s.close()


_subnets: dict[str, int] = {}


def node(name: str) -> model.Node:
    """A node with a subnet of its own (the store refuses two on one)."""
    index = _subnets.setdefault(name, len(_subnets))
    return model.Node(name=name, address="127.0.0.1", capacity=model.Resources(2, 1024, 100, 1000),
                      hypervisors=("fake",), subnet=f"10.{index // 250}.{index % 250}.0/24",
                      gateway="10.0.0.1")


class Boom(Exception):
    pass


def test_a_failed_part_is_undone_alone(store):
    ran = []
    with store.transaction() as tx:
        tx.put_node(node("a"))
        tx.after_commit(lambda: ran.append("a"))
        with pytest.raises(Boom), tx.part():
            tx.put_node(node("bb"))
            tx.after_commit(lambda: ran.append("bb"))
            raise Boom()
        with tx.part():
            tx.put_node(node("ccc"))
    assert sorted(n.name for n in store.list_nodes()) == ["a", "ccc"]
    assert ran == ["a"]


def test_a_transaction_whose_only_writer_failed_takes_no_revision(store):
    before = store.revision()
    with store.transaction() as tx, pytest.raises(Boom), tx.part():
        tx.put_node(node("a"))
        raise Boom()
    assert store.revision() == before and store.list_nodes() == []


def test_units_arriving_together_share_transactions_and_keep_their_own_results(store):
    opened = []

    @contextmanager
    def counted():
        opened.append(1)
        with store.transaction() as tx:
            yield tx

    group = GroupCommit(counted)
    units = 24
    arrived = threading.Barrier(units)
    results: dict[int, object] = {}
    committed: list[int] = []

    def unit(i: int) -> None:
        def work(tx):
            if i % 6 == 5:
                tx.put_node(node(f"bad{i}"))
                raise Boom(i)
            tx.put_node(node(f"n{i}"))
            time.sleep(0.002)       # a moment's work, as a real unit's: the others queue meanwhile
            tx.after_commit(lambda: committed.append(i))
            return len(tx.list_nodes())         # sees the writes of units before it
        arrived.wait()
        try:
            results[i] = group.run(work)
        except Boom as exc:
            results[i] = exc

    threads = [threading.Thread(target=unit, args=(i,)) for i in range(units)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    good = [i for i in range(units) if i % 6 != 5]
    assert all(isinstance(results[i], Boom) and results[i].args == (i,) for i in range(units) if i % 6 == 5)
    # Every good unit counted the nodes committed before it plus its own:
    # the counts are 1..len(good), each once, whatever the order.
    assert sorted(results[i] for i in good) == list(range(1, len(good) + 1))
    assert sorted(committed) == good
    assert sorted(n.name for n in store.list_nodes()) == sorted(f"n{i}" for i in good)
    assert len(opened) < units, "no unit shared a transaction"


def test_a_unit_alone_is_its_own_transaction_and_errors_reach_its_caller(store):
    group = GroupCommit(store.transaction)
    assert group.run(lambda tx: tx.put_node(node("a")) or "done") == "done"
    with pytest.raises(NotFound):
        group.run(lambda tx: tx.get_node("nobody"))
    assert [n.name for n in store.list_nodes()] == ["a"]


def test_a_failed_commit_fails_every_unit_of_the_batch(store):
    @contextmanager
    def failing():
        with store.transaction() as tx:
            yield tx
            raise OSError("disk full")

    group = GroupCommit(failing)
    with pytest.raises(OSError, match="disk full"):
        group.run(lambda tx: tx.put_node(node("a")))
    assert store.list_nodes() == []
    # The group is not left leading: the next unit runs.
    with pytest.raises(OSError):
        group.run(lambda tx: None)


def test_a_unit_that_runs_another_unit_is_refused_not_hung(store):
    group = GroupCommit(store.transaction)
    with pytest.raises(RuntimeError, match="does not nest"):
        group.run(lambda tx: group.run(lambda inner: None))
    assert group.run(lambda tx: "still works") == "still works"
