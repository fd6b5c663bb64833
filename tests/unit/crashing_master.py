"""The Master side of test_master_crash: a Controller over a prepared state
store that runs one mutation and is killed (SIGKILL) at a chosen step of its
unit of work.

`serve()` runs in a fresh interpreter (no gRPC threads, nothing that bans
fork) and forks one process per case, so each case is a real process killed
while it holds the store, without paying for an interpreter start each time.
It reads cases as JSON lines on stdin and answers each with the exit code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import traceback

from soda import model
from soda.config import MasterConfig
from soda.master.controller import Controller
from soda.master.images import ImageStore
from soda.master.notifier import Notifier
from soda.master.store import open_store
from tests.fakes import FakeClock

CAP = model.Resources(2, 4096, 1000, 100_000)
LOST_SECONDS = 10


def controller(state_dir: str, clock: FakeClock, on_step=None) -> Controller:
    store = open_store(state_dir, on_step=on_step)
    return Controller(store, ImageStore(os.path.join(state_dir, "images"), store), Notifier(),
                      MasterConfig(node_lost_seconds=LOST_SECONDS), clock=clock, monotonic=clock)


def report(ctl: Controller, node: str, phases: dict[str, model.Phase], complete: bool = True) -> None:
    ctl.report_status(node, [model.VirtualNodeStatus(name, phase) for name, phase in phases.items()],
                      complete=complete)


def dump(store) -> dict:
    """Everything the store holds, revisions included, as plain JSON."""
    state = {"revision": store.revision(),
             "services": [dataclasses.asdict(s) for s in store.list_services()],
             "nodes": [dataclasses.asdict(n) for n in store.list_nodes()],
             "images": [dataclasses.asdict(i) for i in store.list_images()]}
    return json.loads(json.dumps(state))


# ---- the prepared state -----------------------------------------------------------
# Nodes a, b, c of 2 cores; "web" and "api" of three 1-core virtual nodes
# each, one of each on every node; web RUNNING, api BOOTING.

def prepare(state_dir: str, image_path: str, digest: str) -> None:
    ctl = controller(state_dir, FakeClock())
    with open(image_path, "rb") as f:
        ctl.push_image("busybox", os.path.getsize(image_path), digest, "", iter(lambda: f.read(1 << 20), b""))
    for i, name in enumerate(("a", "b", "c")):
        ctl.register_node(name, f"127.0.0.{i + 1}", CAP, ["fake"])
    for name in ("web", "api"):
        ctl.create_service(model.parse_spec({"name": name, "image": "busybox", "nodes": 3,
                                             "resources": {"cpu": 1}}))
    for v in ctl.store.list_vnodes():
        report(ctl, v.node, {v.name: model.Phase.RUNNING if v.service == "web" else model.Phase.BOOTING},
               complete=False)
    ctl.store.close()


# ---- scenarios ----------------------------------------------------------------------
# Each brings the prepared state to where its mutation starts (as a
# restarted Master, with a fresh Controller) and returns the mutation.

def lose_c(ctl: Controller, clock: FakeClock) -> None:
    """c falls silent: past the grace period only a and b report."""
    clock.now += LOST_SECONDS + 1
    for node in ("a", "b"):
        ctl.report_status(node, [], complete=False)


def c_is_lost(ctl, clock):
    # c goes LOST; web-2 and api-2 find no room on a or b and wait unplaced.
    lose_c(ctl, clock)
    return ctl.check_membership


def c_comes_back(ctl, clock):
    lose_c(ctl, clock)
    ctl.check_membership()
    return lambda: report(ctl, "c", {})


def delete_web(ctl, clock):
    # web-2 waits unplaced (dropped at once), web-0 and web-1 are marked.
    lose_c(ctl, clock)
    ctl.check_membership()
    return lambda: ctl.delete_service("web")


def last_report_of_web(ctl, clock):
    # a's heartbeat: web-0 stopped, the last of web, which goes with it;
    # and api-0 is up.
    lose_c(ctl, clock)
    ctl.check_membership()
    ctl.delete_service("web")
    report(ctl, "b", {"web-1": model.Phase.STOPPED}, complete=False)
    return lambda: report(ctl, "a", {"web-0": model.Phase.STOPPED, "api-0": model.Phase.RUNNING})


def api_shrinks(ctl, clock):
    return lambda: ctl.resize_service("api", 1, [])


SCENARIOS = {"lost": c_is_lost, "back": c_comes_back, "delete": delete_web,
             "report": last_report_of_web, "resize": api_shrinks}


def run(state_dir: str, scenario: str, kill_at: int, told: str) -> None:
    """Prepare, arm, mutate; with kill_at past the last step, write the
    steps and the state before and after to `told`."""
    steps: list[str] = []
    armed = False

    def on_step(what: str) -> None:
        if armed:
            if len(steps) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            steps.append(what)

    clock = FakeClock(2000.0)
    ctl = controller(state_dir, clock, on_step)
    mutate = SCENARIOS[scenario](ctl, clock)
    before = dump(ctl.store)
    armed = True
    mutate()
    armed = False
    with open(told, "w") as f:
        json.dump({"steps": steps, "before": before, "after": dump(ctl.store)}, f)


def serve() -> None:
    for line in sys.stdin:
        case = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run(**case)
            except BaseException:       # noqa: BLE001 - reported through the exit code
                traceback.print_exc()
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
