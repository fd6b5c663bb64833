"""A SODA cluster on this machine, for the demo, the system tests and the
benchmarks: a Master, physical nodes and a Switch, as separate programs.

With one node (the default), the node's Daemon and Agent run here and only
its guests' network lives in a namespace of its own, joined to this host by
an uplink veth. With several (`nodes`), each node is a namespace acting as
a host on a shared fabric (soda.devcluster.fabric), its Daemon and Agent
(`daemon-<i>`, `agent-<i>`) run inside it with their own state dir
(`node-<i>/`) and cgroup parent (`<parent>-<i>`), and the Master (also on
the fabric's address) and the Switch run here; guest subnets are routed
between the hosts as between machines.

Owns, under one state dir:
- `cluster.json`, the record of the cluster: its config, the process that
  supervises it and every part's pid, start time and argv (soda.procid),
  rewritten atomically at every start, death and restart;
- `logs/`: one log per part (appended across restarts) and the
  supervisor's (`supervisor.log`: every start, death with its exit status,
  restart and giving up); kept by `down` until the next `up`;
- the parts' own state: `master/`, `agent/`, `daemon.sock`.
and on the machine the namespace and the cgroup parent its config names.

Supervision (soda.devcluster.supervisor) runs in a thread of the process
that called `up`. Teardown works from the record alone (`teardown`), so a
cluster whose supervisor died is taken down as well as a live one: services
deleted first while the Master and Agent can do it, then the parts by
recorded identity only, then the guests the Agent recorded (by the driver's
own identity check), the cgroups below the parent, the uplink and the
namespace. It never signals a process it cannot prove it started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

from soda.devcluster.supervisor import (EXITED, FAILED, RUNNING, PartState, RestartPolicy, Supervisor,
                                        describe_exit)
from soda import command
from soda.addresses import host_of, split_host_port
from soda.config import TlsConfig
from soda.devcluster import credentials, fabric
from soda.rpc import tls as soda_tls
from soda.netns import netns_preexec
from soda.files import remove_path, write_json_atomic
from soda.netns import NETNS_DIR
from soda.procid import ProcessId

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
LOG_DIR = "logs"
SUPERVISOR_LOG = "supervisor.log"
# What the cluster makes in its state dir; `down` removes these and nothing else.
OWNED = ("master", "agent", "daemon.sock", STATE_FILE, credentials.PKI_DIR)
PARTS = ("master", "daemon", "agent", "switch")            # start order
CGROUP_ROOT = "/sys/fs/cgroup"
COMMAND_TIMEOUT = 10.0            # an ip(8) call
POLL = 0.05                      # how often the supervision thread looks for deaths
TERM_WAIT = 10.0                 # after SIGTERM, before SIGKILL (an Agent may be mid-call)
KILL_WAIT = 5.0
DELETE_WAIT = 60.0               # services deleted (guests stopped, connections drained)


class ClusterError(RuntimeError):
    """The cluster could not be started, or is already up."""


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    state_dir: str
    master_addr: str = "127.0.0.1:7070"
    node: str = "dev-node-1"
    netns: str = "soda-dev"
    cgroup_parent: str = "soda-dev"
    hypervisor: str = "uml"
    cluster_cidr: str = ""                    # "": the Master's default range
    switch_metrics: str | None = None         # None: the Switch's default; "": none
    python: str = sys.executable
    master_args: tuple[str, ...] = ()
    daemon_args: tuple[str, ...] = ()
    agent_args: tuple[str, ...] = ()
    switch_args: tuple[str, ...] = ()
    restart: RestartPolicy = RestartPolicy()
    ready_timeout: float = 60.0
    nodes: int = 1                            # > 1: each a namespace on a fabric
    fabric_cidr: str = "10.231.0.0/24"        # the fabric's addresses (several nodes)
    # Mutual TLS between the parts, with the cluster's own CA
    # (soda.devcluster.credentials); False: the Master runs --insecure.
    tls: bool = True

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["state_dir"] = os.path.abspath(self.state_dir)
        return d


# ---- the record ---------------------------------------------------------------

def load_state(state_dir: str) -> dict | None:
    try:
        with open(os.path.join(state_dir, STATE_FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def recorded(state: dict, name: str) -> ProcessId | None:
    rec = state.get("parts", {}).get(name) or {}
    return ProcessId.from_dict(rec) if rec.get("pid") else None


def supervisor_of(state: dict) -> ProcessId | None:
    rec = state.get("supervisor")
    return ProcessId.from_dict(rec) if rec else None


def layout_of(config: dict) -> fabric.Layout | None:
    """The fabric of a recorded config; None for a one-node cluster."""
    if config.get("nodes", 1) <= 1:
        return None
    return fabric.Layout.of(config["node"], config["netns"], config["cgroup_parent"], config["nodes"],
                            config["fabric_cidr"])


def part_names(layout: fabric.Layout | None) -> tuple[str, ...]:
    """Start order: the Master, each node's Daemon then Agent, the Switch."""
    if layout is None:
        return PARTS
    return ("master", *(f"{part}-{h.index}" for h in layout.hosts for part in ("daemon", "agent")), "switch")


def node_dir(state_dir: str, index: int) -> str:
    return os.path.join(state_dir, f"node-{index}")


def is_live(state: dict) -> bool:
    """Whether any process the record names still runs (by identity)."""
    ids = [supervisor_of(state), *(recorded(state, name) for name in state.get("parts", {}))]
    return any(pid is not None and pid.matches() for pid in ids)


# ---- the cluster --------------------------------------------------------------

class LocalCluster:
    """`up()` starts the parts in order, each ready before the next, then
    supervises them from a thread; `kill(part)` signals a part by its
    recorded identity and `wait_restarted(part, old)` waits for supervision
    to bring it back; `down()` takes everything down (also from `with`)."""

    def __init__(self, config: ClusterConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.state_dir = os.path.abspath(config.state_dir)
        self.log_dir = os.path.join(self.state_dir, LOG_DIR)
        self.daemon_socket = os.path.join(self.state_dir, "daemon.sock")
        self.agent_dir = os.path.join(self.state_dir, "agent")
        self.layout = layout_of(config.as_dict())
        self.parts = part_names(self.layout)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._children: dict[str, subprocess.Popen] = {}
        self._ids: dict[str, ProcessId] = {}
        self._history: dict[str, dict] = {}         # per part: when it started, how it last died
        self._state: dict = {}
        self._master = None
        self._events = None                         # logs/supervisor.log, unless stderr is already it
        self.supervisor = Supervisor(self._spawn, config.restart, clock, self._notify)

    # ---- lifecycle ------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        self.prepare()
        self.start()

    def prepare(self) -> None:
        """Refuse if this state dir's cluster still runs; take down what a
        dead one left; start the new run's logs (the last run's go now)."""
        os.makedirs(self.state_dir, exist_ok=True)
        old = load_state(self.state_dir)
        if old is not None:
            if is_live(old):
                raise ClusterError(f"a cluster is already up in {self.state_dir} "
                                   f"(take it down first)")
            log.info("a cluster recorded in %s is no longer running: removing what it left",
                     self.state_dir)
            teardown(self.state_dir)
        shutil.rmtree(self.log_dir, ignore_errors=True)
        os.makedirs(self.log_dir)
        if self.config.tls:
            hosts = [host_of(self.config.master_addr)]
            if self.layout is not None:
                hosts.append(self.layout.gateway)
            credentials.ensure(self.state_dir, hosts, self.node_names)
        self._state = {"phase": "starting", "config": self.config.as_dict(), "supervisor": None,
                       "parts": {}}
        self._save()

    def start(self, by_command: bool = False, events_to_file: bool = True) -> None:
        """Start every part (the record must be prepared) and supervise them.
        `by_command`: this process is a soda-devcluster command's supervisor,
        which `down` from another process may stop with SIGTERM.
        `events_to_file`: write starts, deaths and restarts to
        logs/supervisor.log (not when stderr already goes there)."""
        with self._lock:
            if not self._state:
                self._state = load_state(self.state_dir) or {}
            if events_to_file:
                self._events = open(os.path.join(self.log_dir, SUPERVISOR_LOG), "a", buffering=1)
            me = ProcessId.read(os.getpid())
            # `down` from another process may SIGTERM a command's supervisor,
            # never a program that uses this class.
            self._state["supervisor"] = {**me.as_dict(), "command": by_command} if me else None
            self._save()
        try:
            if self.layout is not None:
                fabric.make(self.layout)
            else:
                self._make_netns()
            from soda.rpc.client import MasterClient
            self._master = MasterClient(self.config.master_addr, timeout=5.0, tls=self.client_tls)
            for name in self.parts:
                if name.startswith("daemon"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._daemon_socket(name))      # a stale one would look ready
                with self._lock:
                    self.supervisor.start(name)
                self._wait_ready(name)
            with self._lock:
                self._state["phase"] = "up"
                self._save()
            self._thread = threading.Thread(target=self._supervise, name="devcluster-supervisor",
                                            daemon=True)
            self._thread.start()
        except BaseException:
            self.down()
            raise

    def down(self) -> float:
        """Stop supervising and take everything down; the seconds it took."""
        began = time.monotonic()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            for name in list(self.supervisor.parts):
                self.supervisor.stop(name)
            if self._state:
                self._state["phase"] = "stopping"
                self._save()
        teardown(self.state_dir, self._children)
        if self._master is not None:
            self._master.close()
            self._master = None
        if self._events is not None:
            self._events.close()
            self._events = None
        self._children.clear()
        self._ids.clear()
        self._state = {}
        return time.monotonic() - began

    # ---- parts ----------------------------------------------------------
    @property
    def node_names(self) -> list[str]:
        return ([h.name for h in self.layout.hosts] if self.layout is not None else [self.config.node])

    @property
    def client_tls(self) -> TlsConfig | None:
        """The operator's TLS files (what sodactl uses), None without TLS."""
        return credentials.operator_tls(self.state_dir) if self.config.tls else None

    def _tls_flags(self, role: str, name: str) -> list[str]:
        if not self.config.tls:
            return ["--insecure"] if role == "master" else []
        return soda_tls.flags(credentials.tls_of(self.state_dir, role, name))

    def host_of(self, name: str) -> fabric.Host | None:
        """The fabric host a part runs on (None: this host's root namespace)."""
        if self.layout is None or "-" not in name:
            return None
        return self.layout.host(int(name.rsplit("-", 1)[1]))

    def agent_dir_of(self, name: str) -> str:
        host = self.host_of(name)
        return self.agent_dir if host is None else os.path.join(node_dir(self.state_dir, host.index), "agent")

    def _daemon_socket(self, name: str) -> str:
        host = self.host_of(name)
        return (self.daemon_socket if host is None
                else os.path.join(node_dir(self.state_dir, host.index), "daemon.sock"))

    @property
    def fabric_master(self) -> str:
        """The Master's address on the fabric (what the nodes' Agents use)."""
        return f"{self.layout.gateway}:{split_host_port(self.config.master_addr)[1]}"

    def argv(self, name: str) -> list[str]:
        c, py = self.config, self.config.python
        if name == "master":
            extra = ["--cluster-cidr", c.cluster_cidr] if c.cluster_cidr else []
            listen = c.master_addr if self.layout is None else f"{c.master_addr},{self.fabric_master}"
            return [py, "-m", "soda.master.main", "--listen", listen,
                    "--state-dir", os.path.join(self.state_dir, "master"), *extra,
                    *self._tls_flags("master", credentials.MASTER), *c.master_args]
        host = self.host_of(name)
        if host is not None:
            # Inside the host's namespace: its own network, nothing to name.
            if name.startswith("daemon-"):
                return [py, "-m", "soda.daemon.main", "--socket", self._daemon_socket(name),
                        "--cgroup-parent", host.cgroup_parent, *c.daemon_args]
            if name.startswith("agent-"):
                return [py, "-m", "soda.agent.main", "--master", self.fabric_master, "--name", host.name,
                        "--address", host.address, "--state-dir", self.agent_dir_of(name),
                        "--hypervisor", c.hypervisor, "--daemon-socket", self._daemon_socket(name),
                        *self._tls_flags("agent", host.name), *c.agent_args]
        if name == "daemon":
            return [py, "-m", "soda.daemon.main", "--socket", self.daemon_socket, "--netns", c.netns,
                    "--cgroup-parent", c.cgroup_parent, *c.daemon_args]
        if name == "agent":
            return [py, "-m", "soda.agent.main", "--master", c.master_addr, "--name", c.node,
                    "--state-dir", self.agent_dir, "--hypervisor", c.hypervisor, "--netns", c.netns,
                    "--daemon-socket", self.daemon_socket, *self._tls_flags("agent", c.node), *c.agent_args]
        if name == "switch":
            extra = [] if c.switch_metrics is None else ["--metrics-listen", c.switch_metrics]
            return [py, "-m", "soda.switch.main", "--master", c.master_addr, *extra,
                    *self._tls_flags("switch", credentials.SWITCH), *c.switch_args]
        raise KeyError(name)

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def process(self, name: str) -> ProcessId | None:
        """The part's current process as recorded (it may have died since)."""
        with self._lock:
            return self._ids.get(name)

    def part(self, name: str) -> PartState:
        with self._lock:
            return dataclasses.replace(self.supervisor.parts[name])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> ProcessId:
        """Signal the part's recorded process (only if it still is that
        process); returns it, for wait_restarted."""
        with self._lock:
            pid = self._ids.get(name)
            if pid is None or not pid.signal(sig):
                raise ClusterError(f"{name} is not running")
            return pid

    def lose_host(self, index: int) -> None:
        """Node `index` as if its machine died: its Daemon and Agent killed
        (SIGKILL, not restarted), its fabric link down. Its guests go on
        running, cut off, as on a partitioned machine."""
        host = self.layout.host(index)
        with self._lock:
            for name in (f"agent-{index}", f"daemon-{index}"):
                self.supervisor.stop(name)
                pid = self._ids.get(name)
                if pid is not None:
                    pid.signal(signal.SIGKILL)
                child = self._children.get(name)
                if child is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.wait(timeout=KILL_WAIT)
                self._record(self.supervisor.parts[name])
        fabric.set_link(host, up=False)

    def restore_host(self, index: int) -> None:
        """Node `index` back: link up, its Daemon and Agent started again
        (the Agent is READY only once it has stopped the guests it no longer owns)."""
        fabric.set_link(self.layout.host(index), up=True)
        for name in (f"daemon-{index}", f"agent-{index}"):
            if name.startswith("daemon"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._daemon_socket(name))
            with self._lock:
                self.supervisor.start(name)
            self._wait_ready(name)

    def wait_restarted(self, name: str, old: ProcessId, timeout: float = 30.0) -> ProcessId:
        """Wait until supervision has started `name` again in place of `old`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                part = self.supervisor.parts[name]
                current = self._ids.get(name)
                if part.state == RUNNING and current not in (None, old) and current.matches():
                    return current
                if part.state in (FAILED, EXITED):
                    raise ClusterError(f"{name} is not coming back: {part.reason}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} was not restarted within {timeout:g} s")
            time.sleep(0.01)

    # ---- supervision -----------------------------------------------------
    def _spawn(self, name: str) -> subprocess.Popen:
        argv = self.argv(name)
        host = self.host_of(name)
        with open(self.log_path(name), "ab") as out:
            out.write(f"---- soda-devcluster: {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n"
                      .encode())
            out.flush()
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     preexec_fn=None if host is None else netns_preexec(host.netns))
        self._children[name] = child
        pid = ProcessId.of_child(child.pid, argv)
        if pid is not None:
            self._ids[name] = pid
        return child

    def _notify(self, part: PartState, message: str) -> None:
        history = self._history.setdefault(part.name, {})
        if part.state == RUNNING:
            history["started_at"] = time.time()
        else:
            history.update(last_exit_at=time.time(), last_exit_pid=part.pid)
        level = logging.INFO if part.state == RUNNING else logging.WARNING
        log.log(level, "%s", message)
        if self._events is not None:
            self._events.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self._record(part)

    def _record(self, part: PartState) -> None:
        pid = self._ids.get(part.name)
        # Only a running part has a pid in the record: teardown signals what is recorded.
        self._state.setdefault("parts", {})[part.name] = {
            **(pid.as_dict() if pid is not None and part.state == RUNNING else {"pid": None}),
            "state": part.state, "restarts": part.restarts, "reason": part.reason,
            "last_exit": part.last_exit, "log": os.path.relpath(self.log_path(part.name), self.state_dir),
            **self._history.get(part.name, {})}
        self._save()

    def _save(self) -> None:
        self._state["updated_at"] = time.time()
        write_json_atomic(os.path.join(self.state_dir, STATE_FILE), self._state, indent=1)

    def _supervise(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                wait = self.supervisor.step()
            self._stop.wait(POLL if wait is None else min(wait, POLL))

    # ---- readiness -------------------------------------------------------
    def _wait_ready(self, name: str) -> None:
        deadline = time.monotonic() + self.config.ready_timeout
        child = self._children[name]
        while not self._ready(name):
            if child.poll() is not None:
                raise ClusterError(f"{name} {describe_exit(child.returncode)} while starting:\n"
                                   f"{_tail(self.log_path(name))}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} not ready within {self.config.ready_timeout:g} s:\n"
                                   f"{_tail(self.log_path(name))}")
            time.sleep(0.1)

    def _ready(self, name: str) -> bool:
        from soda.errors import SodaError
        try:
            if name == "master":
                self._master.list_nodes()
                return True
            if name.startswith("agent"):
                host = self.host_of(name)
                node = self.config.node if host is None else host.name
                return any(n.name == node and n.state == "READY" for n in self._master.list_nodes())
        except SodaError:
            return False
        if name.startswith("daemon"):
            return os.path.exists(self._daemon_socket(name))
        if name == "switch" and self.config.switch_metrics:
            return _accepts(self.config.switch_metrics)
        return True

    def _make_netns(self) -> None:
        if not os.path.exists(os.path.join(NETNS_DIR, self.config.netns)):
            command.run(["ip", "netns", "add", self.config.netns], timeout=COMMAND_TIMEOUT)


def _accepts(address: str) -> bool:
    try:
        with socket.create_connection(split_host_port(address), timeout=1):
            return True
    except OSError:
        return False


def _tail(path: str, size: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# ---- taking it down from the record -----------------------------------------------

def teardown(state_dir: str, children: dict[str, subprocess.Popen] | None = None) -> bool:
    """Take down the cluster recorded in `state_dir`, whatever still runs of
    it; False if nothing is recorded there. `children`: the parts as this
    process spawned them, so that they are reaped too. Every step runs even
    if an earlier one failed: leaving less behind beats stopping early."""
    state_dir = os.path.abspath(state_dir)
    state = load_state(state_dir)
    if state is None:
        return False
    config = state.get("config", {})
    layout = layout_of(config)
    children = children or {}
    ids = {name: recorded(state, name) for name in state.get("parts", {})}
    running = {name for name, pid in ids.items() if pid is not None and pid.matches()}
    if "master" in running and any(name.startswith("agent") for name in running):
        _delete_services(config["master_addr"],
                         credentials.operator_tls(state_dir) if config.get("tls", True) else None)
    for name in reversed(part_names(layout)):
        pid = ids.get(name)
        if pid is not None:
            _stop(name, pid, children.get(name))
    for child in children.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1)
    if layout is None:
        _kill_recorded_guests(os.path.join(state_dir, "agent"))
        if config.get("cgroup_parent"):
            _sweep_cgroups(config["cgroup_parent"])
        if config.get("netns"):
            _remove_netns(config["netns"])
    else:
        for host in layout.hosts:
            _kill_recorded_guests(os.path.join(node_dir(state_dir, host.index), "agent"))
            _sweep_cgroups(host.cgroup_parent)
        fabric.remove(layout)
    state["phase"] = "down"
    state["down_at"] = time.time()
    log_dir = os.path.join(state_dir, LOG_DIR)
    os.makedirs(log_dir, exist_ok=True)
    # The last record stays beside the logs: which pids ran, how often each restarted.
    write_json_atomic(os.path.join(log_dir, STATE_FILE), state, indent=1)
    for name in OWNED:
        remove_path(os.path.join(state_dir, name))
    for host in layout.hosts if layout is not None else ():
        remove_path(node_dir(state_dir, host.index))
    return True


def _delete_services(master_addr: str, tls: TlsConfig | None) -> None:
    """Deleting the services has the Agent stop its guests and the Daemon
    release their fences, the clean way; what it misses is swept after."""
    from soda.errors import SodaError
    from soda.rpc.client import MasterClient
    try:
        with MasterClient(master_addr, timeout=10.0, tls=tls) as master:
            for service in master.list_services():
                log.info("deleting service %s", service.name)
                master.delete_service(service.name)
            deadline = time.monotonic() + DELETE_WAIT
            while (left := master.list_services()) and time.monotonic() < deadline:
                time.sleep(0.2)
            if left:
                log.warning("services still being deleted after %.0f s: %s; sweeping their guests",
                            DELETE_WAIT, ", ".join(s.name for s in left))
    except SodaError as exc:
        log.warning("could not delete the services (%s); sweeping their guests", exc)


def _stop(name: str, pid: ProcessId, child: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL, to the recorded process only."""
    for sig, wait in ((signal.SIGTERM, TERM_WAIT), (signal.SIGKILL, KILL_WAIT)):
        if not pid.signal(sig):
            break
        log.info("%s (pid %d): %s", name, pid.pid, signal.Signals(sig).name)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if child is not None and child.pid == pid.pid:
                child.poll()            # our child: reap it, or it stays a zombie
            if not pid.matches():
                break
            time.sleep(0.02)
    if pid.matches():
        log.warning("%s (pid %d) survived SIGKILL", name, pid.pid)


def _kill_recorded_guests(agent_dir: str) -> None:
    """Guests the Agent recorded and still alive (only if deleting the
    services failed), recognised by their driver's own identity check."""
    from soda.hypervisors.base import drivers
    from soda.hypervisors.uml import DEFAULT_SHORT_DIR
    # Every driver whose guests are recorded processes keeps their records
    # in <state dir>/<its name>/ and says how to recognise them (identity).
    for hypervisor, driver in sorted(drivers().items()):
        identity = getattr(driver, "identity", None)
        root = os.path.join(agent_dir, hypervisor)
        if identity is None or not os.path.isdir(root):
            continue
        for entry in sorted(os.listdir(root)):
            try:
                with open(os.path.join(root, entry, "guest.json")) as f:
                    record = json.load(f)
            except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
                continue
            pids = [record["pid"], *identity.session_members(record)]
            for pid in pids:
                if identity.signal_if_ours(pid, record, signal.SIGKILL):
                    log.info("killed guest %s process %d", entry, pid)
            deadline = time.monotonic() + KILL_WAIT
            while any(identity.is_ours(p, record, helper=p != record["pid"]) for p in pids) \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
            # A guest whose socket path was too long kept its UML dir outside the state dir.
            uml_dir = record.get("uml_dir", "")
            if uml_dir and os.path.abspath(uml_dir).startswith(DEFAULT_SHORT_DIR + "/"):
                shutil.rmtree(uml_dir, ignore_errors=True)


def _sweep_cgroups(parent: str) -> None:
    """Kill what is left below the cluster's cgroup parent in every
    hierarchy, then remove it, deepest first. Only the cluster's own Daemon
    puts processes there (its guests), so everything found is the cluster's."""
    for controller in sorted(os.listdir(CGROUP_ROOT)):
        top = os.path.join(CGROUP_ROOT, controller, parent)
        if not os.path.isdir(top) or os.path.islink(top):
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
            procs = os.path.join(dirpath, "cgroup.procs")
            deadline = time.monotonic() + KILL_WAIT
            while (pids := _read_pids(procs)) and time.monotonic() < deadline:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.02)
            try:
                os.rmdir(dirpath)
            except OSError as exc:
                log.warning("cannot remove cgroup %s: %s", dirpath, exc.strerror)


def _read_pids(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def _remove_netns(netns: str) -> None:
    from soda.agent.network import short_name
    # The uplink's host end goes with the namespace, but asynchronously: remove it now.
    # Gone already (exit 1) is fine.
    command.run(["ip", "link", "del", short_name("su", netns)], timeout=COMMAND_TIMEOUT, ok=(0, 1))
    if os.path.exists(os.path.join(NETNS_DIR, netns)):
        command.run(["ip", "netns", "del", netns], timeout=COMMAND_TIMEOUT)
