"""The Agent's session with the Master and the threads that run an Agent.

Owns registration, the assignment watch, heartbeats and status reports, and
the life of the Agent's threads:

  session    register, then follow WatchAssignments into the Reconciler; on
             any SodaError (Master down, stream cut) wait a capped backoff
             (0.2 s doubling to 5 s), register again and watch again, until
             the Agent stops
  heartbeat  the complete inventory every heartbeat_seconds (the Master's
             answer sets the period); a Master that has forgotten this node
             gets a new registration. Fencing: a node the Master declared
             LOST (its guests were placed elsewhere) sends its first
             heartbeat, which makes it READY, only once the desired set of
             the new session has come and no guest it no longer owns runs
  reporter   phase changes as they happen (ReportStatus); a failed report
             is dropped, since the next heartbeat carries everything
  reconcile  Reconciler.run
  health     every few seconds, whether the Agent can still work at all
             (its state dir writable); if not, it stops with that reason
  consoles   the Master's log orders, each answered with a guest's console
             (soda.agent.consoles)

A thread that raises something nobody foresaw is logged with its traceback
and started again after a capped backoff: one bug in one code path must not
take the node off the platform. Only `AgentBroken` (the Agent cannot work
here at all) stops the Agent, with a one-line reason.

Guests never depend on the Master: while it is away nothing is started or
stopped for lack of news, and stopping the Agent leaves them running. It
talks to the Master only through the client it is given (a MasterClient, or
a fake in tests) and imports no grpc.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from typing import Callable, Iterable, Mapping

from soda.agent.consoles import ConsoleShipper
from soda.backoff import Backoff
from soda.errors import NotFound, SodaError
from soda.model.spec import Resources
from soda.model.state import DriverCapabilities, Node, VirtualNodeStatus

log = logging.getLogger(__name__)

# Until the Master answers a heartbeat with its own period.
DEFAULT_HEARTBEAT_SECONDS = 2.0
# How often a fenced node looks whether its old guests are gone, and how
# often it says which still run.
FENCE_POLL_SECONDS = 0.1
# A primed pull that failed is tried again after this long (the Master keeps asking).
PRIME_RETRY_SECONDS = 30.0
FENCE_LOG_SECONDS = 10.0
LOST = "LOST"
HEALTH_CHECK_SECONDS = 5.0


class AgentBroken(SodaError):
    """The Agent cannot work on this node at all (not one guest's problem)."""


def state_dir_problem(path: str) -> str:
    """Why the Agent cannot keep its records in `path`, or "" when it can."""
    try:
        with tempfile.TemporaryFile(dir=path, prefix=".soda-health-"):
            pass
    except OSError as exc:
        return f"state dir {path} is not writable: {exc.strerror or exc}"
    return ""


class _Outage:
    """Says once that the Master cannot be reached, and once that it can
    again, instead of logging every failed attempt."""

    def __init__(self, what: str):
        self.what = what
        self.down = False

    def failed(self, exc: SodaError) -> None:
        if not self.down:
            log.warning("%s failed: %s", self.what, exc)
            self.down = True
        else:
            log.debug("%s failed: %s", self.what, exc)

    def worked(self) -> None:
        if self.down:
            log.info("%s works again", self.what)
            self.down = False


class StatusReporter:
    """Queues phase changes from the Reconciler and sends them from its own
    thread, so that a slow or absent Master never blocks a boot."""

    def __init__(self, client, node_name: str):
        self._client = client
        self._node = node_name
        self._lock = threading.Lock()
        self._pending: dict[str, VirtualNodeStatus] = {}
        self._wake = threading.Event()
        self._closed = False
        self._outage = _Outage("reporting status to the Master")
        # One message about phases in flight at a time, heartbeats included:
        # a heartbeat's snapshot taken before a phase change but sent after
        # its report would set the Master back (a guest RUNNING here shown
        # BOOTING there until the next heartbeat, seconds later).
        self.sending = threading.Lock()

    def report(self, statuses: Iterable[VirtualNodeStatus]) -> None:
        with self._lock:
            for status in statuses:
                # Only the latest phase of a virtual node matters.
                self._pending[status.name] = status
        self._wake.set()

    def run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self.sending:
                with self._lock:
                    if self._closed:
                        return
                    batch = [self._pending[name] for name in sorted(self._pending)]
                    self._pending.clear()
                if not batch:
                    continue
                try:
                    self._client.report_status(self._node, batch)
                except SodaError as exc:
                    # Tolerated by design: the next heartbeat carries everything.
                    self._outage.failed(exc)
                else:
                    self._outage.worked()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._wake.set()


class Agent:
    def __init__(self, client, reconciler, reporter: StatusReporter, name: str, address: str,
                 capacity: Resources, hypervisors: Iterable[str],
                 stop: threading.Event | None = None, backoff: Backoff | None = None,
                 heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS,
                 on_registered: Callable[[Node], None] | None = None,
                 limits: Iterable[DriverCapabilities] = (),
                 health_check: Callable[[], str] | None = None,
                 assumed: Iterable[str] = (),
                 thread_backoff: Backoff | None = None,
                 labels: Mapping[str, str] | None = None,
                 images=None):
        self._client = client
        self._reconciler = reconciler
        self._reporter = reporter
        self.name = name
        self.address = address
        self.capacity = capacity
        # Capacity fields measured nowhere, taken from a default (node list says so).
        self.assumed = tuple(assumed)
        self.hypervisors = tuple(hypervisors)
        # Its operator's labels (zone=a, ...), registered as they are.
        self.labels = dict(labels or {})
        # The smallest guest each driver boots: the Master refuses smaller ones.
        self.limits = tuple(limits)
        # Shared with main(): a signal sets it to stop the Agent, and a fatal
        # error in any thread sets it so that main() stops everything else.
        self._stop = stop or threading.Event()
        self._backoff = backoff or Backoff()
        self._heartbeat_seconds = heartbeat_seconds
        # Node set-up that needs what the Master hands out (the subnet):
        # runs after every registration, before any assignment is applied.
        self._on_registered = on_registered
        # Returns why the Agent cannot work at all ("" while it can).
        self._health_check = health_check
        # The image cache: its state goes with each heartbeat, and the
        # Master's answer may ask it to pull images ahead of need (prime).
        self._images = images
        self._priming: dict[str, float] = {}       # digest -> when its last try began; 0: running
        self._priming_lock = threading.Lock()
        self._prime_slot = threading.Lock()         # one primed pull at a time
        self._thread_backoff = thread_backoff or Backoff(first=0.5, cap=30.0)
        self._heartbeat_now = threading.Event()
        self._registered = threading.Event()
        self._register_lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._consoles = ConsoleShipper(client, name, reconciler, self._stop)
        self.node: Node | None = None
        # Set while a node registered as LOST has not yet stopped the guests
        # it no longer owns: the reconciler's snapshot count at registration.
        self._fenced_since: int | None = None
        self._fence_logged = 0.0
        self.registrations = 0
        self.thread_failures = 0
        self.failure: BaseException | None = None

    # ---- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        for name, target in (("reconcile", lambda: self._reconciler.run(self._stop)),
                             ("reporter", self._reporter.run),
                             ("heartbeat", self._heartbeats),
                             ("session", self._session),
                             ("health", self._check_health),
                             ("consoles", self._consoles.run)):
            thread = threading.Thread(target=self._guarded, args=(name, target),
                                      name=f"soda-agent-{name}", daemon=True)
            self._threads[name] = thread
            thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop talking to the Master and stop reconciling; guests keep running."""
        self._stop.set()
        self._reconciler.close()
        self._reporter.close()
        self._heartbeat_now.set()
        for name in ("reconcile", "reporter", "heartbeat", "health"):
            self._join(name, timeout)
        # The session thread may sit in the assignment stream; closing the
        # client cancels it. Only now: the other threads used the client too.
        self._client.close()
        self._join("session", timeout)
        self._join("consoles", timeout)

    @property
    def heartbeats(self) -> tuple:
        """The loops the watchdog vouches for besides the main thread."""
        heartbeat = getattr(self._reconciler, "heartbeat", None)
        return (heartbeat,) if heartbeat is not None else ()

    def wait_registered(self, timeout: float | None = None) -> bool:
        return self._registered.wait(timeout)

    @property
    def stopped(self) -> threading.Event:
        return self._stop

    def _join(self, name: str, timeout: float) -> None:
        thread = self._threads.get(name)
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("agent thread %s did not stop within %.0fs", name, timeout)

    def _guarded(self, name: str, target: Callable[[], None]) -> None:
        backoff = Backoff(self._thread_backoff.first, self._thread_backoff.cap)
        while not self._stop.is_set():
            try:
                target()
                return
            except AgentBroken as exc:
                log.error("stopping the Agent: %s", exc)
                self.failure = self.failure or exc
                self._stop.set()
                return
            except Exception as exc:
                if self._stop.is_set():
                    # Shutting down: a call cut short by the closed client
                    # may raise whatever the transport raises.
                    log.debug("agent thread %s ended while stopping: %r", name, exc)
                    return
                # A bug, not a Master outage (those are SodaErrors, handled
                # where they happen). Guests keep running either way; the
                # thread starts over, so the node stays on the platform.
                delay = backoff.next()
                log.exception("agent thread %s failed; starting it again in %.1fs", name, delay)
                self.thread_failures += 1
                self._stop.wait(delay)

    def _check_health(self) -> None:
        while self._health_check is not None and not self._stop.is_set():
            problem = self._health_check()
            if problem:
                raise AgentBroken(problem)
            self._stop.wait(HEALTH_CHECK_SECONDS)

    # ---- the session -----------------------------------------------------------
    def _session(self) -> None:
        outage = _Outage("the session with the Master")
        while not self._stop.is_set():
            try:
                self._register()
                for kind, items in self._client.watch_assignments(self.name):
                    if self._stop.is_set():
                        return
                    self._apply(kind, items)
                    outage.worked()
                    self._backoff.reset()
                if self._stop.is_set():
                    return
                log.info("the Master ended the assignment stream; reconnecting")
            except SodaError as exc:
                if self._stop.is_set():
                    return
                outage.failed(exc)
            self._stop.wait(self._backoff.next())

    def _apply(self, kind: str, items: list) -> None:
        if kind == "SNAPSHOT":
            log.info("desired set from the Master: %d virtual node(s)", len(items))
            self._reconciler.replace_desired(items)
        elif kind == "UPSERT":
            self._reconciler.upsert_desired(items)
        elif kind == "REMOVE":
            self._reconciler.remove_desired(items)
        else:
            # A newer Master's event kind: nothing here knows how to act on it.
            log.warning("ignoring assignment event of unknown kind %r", kind)

    def _register(self) -> Node:
        with self._register_lock:
            node = self._client.register_node(self.name, self.address, self.capacity,
                                              self.hypervisors, self.limits, self.assumed,
                                              labels=self.labels)
            if self._on_registered is not None:
                self._on_registered(node)
            self.node = node
            self.registrations += 1
            if node.state == LOST:
                self._fenced_since = self._reconciler.snapshots
                log.warning("the Master declared this node LOST and placed its virtual nodes elsewhere: "
                            "stopping the guests it no longer owns before reporting")
        log.info("registered with the Master as %s (subnet %s, gateway %s)",
                 node.name, node.subnet or "-", node.gateway or "-")
        self._registered.set()
        # The Master learns the whole inventory at once, not a period later.
        self._heartbeat_now.set()
        return node

    # ---- heartbeats --------------------------------------------------------------
    def _fence_cleared(self) -> bool:
        """Whether this node may report: not fenced, or fenced and every
        guest it no longer owns (by the new session's desired set) gone."""
        since = self._fenced_since
        if since is None:
            return True
        strangers = (self._reconciler.strangers() if self._reconciler.snapshots > since else None)
        if strangers == []:
            log.info("no guest this node no longer owns runs: reporting to the Master")
            self._fenced_since = None
            return True
        now = time.monotonic()
        if now - self._fence_logged >= FENCE_LOG_SECONDS:
            self._fence_logged = now
            log.warning("node stays LOST until %s", "the Master's desired set has come" if strangers is None
                        else f"these old guests have stopped: {', '.join(strangers)}")
        return False

    def _prime(self, digests: Iterable[str]) -> None:
        """Pull the images the Master asks for ahead of need, each in a
        thread of its own, one pull at a time; one that failed is tried again
        after PRIME_RETRY_SECONDS."""
        if self._images is None:
            return
        now = time.monotonic()
        for digest in digests:
            with self._priming_lock:
                began = self._priming.get(digest)
                if began is not None and (began == 0.0 or now - began < PRIME_RETRY_SECONDS):
                    continue
                self._priming[digest] = 0.0             # 0: in progress
            threading.Thread(target=self._prime_one, args=(digest,), name=f"prime-{digest[7:19]}",
                             daemon=True).start()

    def _prime_one(self, digest: str) -> None:
        began = time.monotonic()
        try:
            with self._prime_slot:
                self._images.ensure(digest)
            log.info("image %s primed", digest)
            self._heartbeat_now.set()                   # the Master learns it at once
            with self._priming_lock:
                self._priming.pop(digest, None)
        except (SodaError, OSError) as exc:
            log.warning("priming image %s failed: %s (tried again in %.0f s)", digest, exc,
                        PRIME_RETRY_SECONDS)
            with self._priming_lock:
                self._priming[digest] = began

    def _heartbeats(self) -> None:
        outage = _Outage("heartbeat to the Master")
        interval = self._heartbeat_seconds
        while not self._stop.is_set():
            self._heartbeat_now.clear()
            if self._registered.is_set() and not self._fence_cleared():
                self._heartbeat_now.wait(FENCE_POLL_SECONDS)
                continue
            if self._registered.is_set():
                try:
                    with self._reporter.sending:
                        answer = self._client.heartbeat(
                            self.name, self._reconciler.statuses_with_usage(),
                            image_cache=self._images.state() if self._images is not None else None)
                    if answer.heartbeat_seconds > 0:
                        interval = answer.heartbeat_seconds
                    self._prime(answer.prime)
                    outage.worked()
                except NotFound as exc:
                    # The Master has forgotten this node (its state was reset).
                    log.warning("the Master does not know this node (%s); registering again", exc)
                    try:
                        self._register()
                    except SodaError as again:
                        outage.failed(again)
                except SodaError as exc:
                    outage.failed(exc)
            self._heartbeat_now.wait(interval)
