"""The Controller changes state only in units of work: one transaction per
mutation, a retry on Conflict, and watchers told only of what committed."""

from __future__ import annotations

import shutil
from contextlib import contextmanager

import grpc
import pytest

from soda import model
from soda.errors import Conflict
from soda.master import controller as controller_module
from soda.master.controller import ENDPOINTS_TOPIC, SERVICES_TOPIC, node_topic, service_topic
from soda.rpc.client import sha256_file
from soda.rpc.errors import from_rpc_error, status_code
from tests.fakes import FakeClock
from tests.support import make_ext4_image
from tests.unit import crashing_master as crashing

TOPICS = [SERVICES_TOPIC, ENDPOINTS_TOPIC, *(service_topic(s) for s in ("web", "api")),
          *(node_topic(n) for n in "abc")]



class Crash(Exception):
    """Stands for the process dying at a step of a transaction."""


class Armed:
    """A store hook that raises Crash at step `at` once armed; records the steps."""

    def __init__(self, at: int = -1):
        self.at = at
        self.steps: list[str] | None = None

    def __call__(self, what: str) -> None:
        if self.steps is not None:
            if len(self.steps) == self.at:
                raise Crash(what)
            self.steps.append(what)


def start(prepared, tmp_path, scenario, hook):
    state_dir = str(tmp_path / "m")
    shutil.rmtree(state_dir, ignore_errors=True)
    shutil.copytree(prepared, state_dir)
    clock = FakeClock(2000.0)
    ctl = crashing.controller(state_dir, clock, hook)
    return ctl, crashing.SCENARIOS[scenario](ctl, clock)


@pytest.mark.parametrize("scenario", sorted(crashing.SCENARIOS))
def test_a_mutation_cut_short_changes_nothing_and_tells_no_watcher(prepared, tmp_path, scenario):
    hook = Armed()
    ctl, mutate = start(prepared, tmp_path, scenario, hook)
    before = crashing.dump(ctl.store)
    followed = ([ctl.notifier.revision(t) for t in TOPICS], {n.name: n.last_heartbeat for n in ctl.list_nodes()})
    hook.steps = []
    mutate()
    steps, after = hook.steps, crashing.dump(ctl.store)
    # Once committed, what follows does run: watchers told (or, for a node
    # that is back, at least its heartbeat noted).
    assert ([ctl.notifier.revision(t) for t in TOPICS],
            {n.name: n.last_heartbeat for n in ctl.list_nodes()}) != followed
    ctl.store.close()
    for k, step in enumerate(steps):
        hook = Armed(k)
        ctl, mutate = start(prepared, tmp_path, scenario, hook)
        told = [ctl.notifier.revision(t) for t in TOPICS]
        hook.steps = []
        with pytest.raises(Crash):
            mutate()
        assert crashing.dump(ctl.store) == (after if step == "committed" else before), step
        # Nothing that follows a commit ran: no watcher woke.
        assert [ctl.notifier.revision(t) for t in TOPICS] == told, step
        ctl.store.close()


class CountingStore:
    """The store, counting the transactions opened on it."""

    def __init__(self, store):
        self.inner = store
        self.opened = 0

    def transaction(self):
        self.opened += 1
        return self.inner.transaction()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_every_mutation_is_one_unit_of_work(prepared, tmp_path):
    ctl, _ = start(prepared, tmp_path, "resize", None)
    counting = ctl.store = ctl.images.store = CountingStore(ctl.store)
    clock = ctl.clock
    on_demand = model.parse_spec({"name": "od", "image": "busybox", "nodes": 0, "resources": {"cpu": 0.5},
                                  "on_demand": {"max_nodes": 1, "idle_seconds": 30}})
    image = make_ext4_image(str(tmp_path / "other.img"), data=b"other")
    mutations = {
        "register_node": lambda: ctl.register_node("d", "127.0.0.4", crashing.CAP, ["fake"]),
        "push_image": lambda: ctl.push_image("other", 4 << 20, sha256_file(image), "",
                                             iter([open(image, "rb").read()])),
        "delete_image": lambda: ctl.delete_image("other"),
        "create_service": lambda: ctl.create_service(on_demand),
        "ensure_nodes": lambda: ctl.ensure_nodes("od"),
        "release_nodes": lambda: ctl.release_nodes("od"),
        "resize_service": lambda: ctl.resize_service("api", 2, []),
        "report_status": lambda: crashing.report(ctl, "a", {"api-0": model.Phase.RUNNING}),
        "delete_service": lambda: ctl.delete_service("web"),
        "check_membership": lambda: (setattr(clock, "now", clock.now + 11), ctl.check_membership()),
    }
    assert ctl.check_membership() == [] and counting.opened == 0    # nothing due: no transaction
    for name, mutate in mutations.items():
        counting.opened = 0
        mutate()
        assert counting.opened == 1, name
    assert {"a", "b", "c"} <= {n.name for n in ctl.list_nodes() if n.state == "LOST"}


@contextmanager
def conflicting(store, times):
    """The store, whose next `times` transactions fail at their first write
    with Conflict, as if another Master had written first."""
    real = store.transaction
    left = [times]

    @contextmanager
    def transaction():
        with real() as tx:
            if left[0] > 0:
                left[0] -= 1

                def refuse(*args, **kwargs):
                    raise Conflict("virtual node 'api-0' changed since it was read")
                for name in ("put_vnodes", "put_service", "put_node", "delete_vnodes", "create_service"):
                    setattr(tx, name, refuse)
            yield tx
    store.transaction = transaction
    try:
        yield
    finally:
        del store.transaction


def test_a_conflict_runs_the_unit_of_work_again_on_fresh_state(prepared, tmp_path):
    ctl, _ = start(prepared, tmp_path, "resize", None)
    told = ctl.notifier.revision(service_topic("api"))
    with conflicting(ctl.store, controller_module.CONFLICT_ATTEMPTS - 1):
        crashing.report(ctl, "a", {"api-0": model.Phase.RUNNING})
    assert {v.name: v.phase for v in ctl.get_service("api").vnodes}["api-0"] == model.Phase.RUNNING
    # The attempts that failed told nobody; the one that committed did, once.
    assert ctl.notifier.revision(service_topic("api")) == told + 1


def test_a_conflict_that_persists_reaches_the_caller_as_aborted(prepared, tmp_path):
    ctl, _ = start(prepared, tmp_path, "resize", None)
    before = crashing.dump(ctl.store)
    with conflicting(ctl.store, controller_module.CONFLICT_ATTEMPTS), pytest.raises(Conflict):
        ctl.resize_service("api", 1, [])
    assert crashing.dump(ctl.store) == before
    assert status_code(Conflict("x")) == grpc.StatusCode.ABORTED

    class Aborted(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.ABORTED

        def details(self):
            return "changed since it was read"
    assert isinstance(from_rpc_error(Aborted()), Conflict)
