"""The Agent's reconciler: make this node's guests match its desired set.

Owns the comparison of the desired virtual nodes (handed over by the
Agent's session with the Master) with the guests the hypervisor drivers
find, the actions that close the gap, and each virtual node's observed phase:

    PENDING -> PULLING -> BOOTING -> RUNNING
    FAILED with a reason (a failed start, a crash); retried after a backoff
    STOPPING -> STOPPED, then forgotten once the Master no longer wants it

Whatever one virtual node's start, stop or limit change raises — a
SodaError, an OSError or a bug — fails that virtual node alone: it is
FAILED with the reason and retried with backoff, and every other virtual
node is reconciled as before.

Every phase change goes to the reporter at once; `statuses()` is the
complete inventory that heartbeats carry. It never talks to the Master and
imports no grpc.

Restart safety: guests are found with `driver.list()`, never remembered, so
a new Agent adopts running guests instead of starting them again. Until the
first desired set arrives nothing is started or stopped, and closing the
reconciler (Agent shutdown) leaves guests running: only the desired set
decides what is stopped. What a killed Agent did not live to release (a
stopped guest's fence and TAP) is found in the kernel once the first desired
set arrives, and released unless a guest of that name runs or is wanted.

Threads: one loop thread runs `reconcile_once` (woken by every change, and
every `interval` seconds to notice crashes). Starts run in a pool of
`max_parallel_boots` workers; each holds its slot from the pull until the
guest is ready, so at most that many guests boot at once. Stops have their
own pool so that slow boots never hold up a stop. A virtual node has at most
one action in flight and the loop leaves it alone meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping, Protocol

from soda.agent.plumbing import GuestPlumbing
from soda.backoff import Backoff
from soda.errors import NotFound, SodaError, TemporaryError, WrongState
from soda.hypervisors import console
from soda.hypervisors.base import RUNNING as GUEST_RUNNING
from soda.hypervisors.base import GuestInfo, GuestSpec, HypervisorDriver
from soda.model.spec import Resources
from soda.model.state import Phase, VirtualNode, VirtualNodeStatus, retry_note
from soda.service import Heartbeat

log = logging.getLogger(__name__)

# What a limit change returns when the guest must boot again to take it.
BOOT_AGAIN = "boot again"


class Reporter(Protocol):
    def report(self, statuses: list[VirtualNodeStatus]) -> None:
        """Pass phase changes on. Called with the reconciler's lock held (so
        that changes of one virtual node arrive in order): it must only
        queue, never block."""


class Disks(Protocol):
    def send(self, vnode: VirtualNode, driver: HypervisorDriver) -> None:
        """Export the frozen guest's disk and send it for `vnode`'s move
        (soda.agent.moves)."""


class Images(Protocol):
    def ensure(self, digest: str, disk_mib: int = 0) -> str:
        """Path of the verified image `digest`, pulled if need be; with
        `disk_mib`, of the root disk base of that size the guest's
        copy-on-write layer goes over."""


@dataclass
class _Retry:
    backoff: Backoff                # the delay before each next try
    failures: int = 0
    retry_at: float = 0.0
    action: str = "start"        # what failed: "start", "stop" or "update"


@dataclass
class _Vnode:
    """What this Agent knows of one virtual node beyond what its driver
    finds. Kept in memory: an Agent restart starts it over."""
    status: VirtualNodeStatus | None = None    # its phase as last reported
    busy: bool = False                         # an action is in flight
    retry: _Retry | None = None                # the last failure, until it recovers
    running_since: float | None = None
    # Resources whose limits are in force. None after a restart, so adopted
    # guests get their limits applied again (the Daemon's apply is idempotent).
    applied: Resources | None = None
    limits_error: str = ""                     # why the last live change failed
    # The end of the console of its last boot that failed (the driver
    # removes a stopped guest's files): `service logs` shows it until the
    # next boot writes a console of its own.
    last_console: str = ""
    # OOM kills of the guest's earlier lives, and its own kernel's count last
    # read in this one: usage reports add them up.
    oom_before: int = 0
    oom_guest: int = 0
    # The driver whose guest stopped but whose fence and network could not
    # be released (the Daemon was down): released again until it works, and
    # the virtual node is not forgotten before.
    unreleased: str = ""
    pause_error: str = ""                      # why the last freeze or thaw failed
    pause_retry_at: float = 0.0                # not tried again before
    # The node its disk went to for a move (the Master has it): not sent again.
    disk_sent: str = ""

    def note(self) -> str:
        """The reason a running guest shows: what did not work out live."""
        return "; ".join(n for n in (self.pause_error, self.limits_error) if n)


@dataclass
class _Leftover:
    """A fence or TAP an earlier Agent left, and the backoff of its release
    (or, for the listing of them all, of that)."""
    backoff: Backoff
    retry_at: float = 0.0


class Reconciler:
    def __init__(self, drivers: Mapping[str, HypervisorDriver], reporter: Reporter, images: Images,
                 clock: Callable[[], float] = time.monotonic, max_parallel_boots: int = 8,
                 interval: float = 1.0, stop_timeout: float = 30.0, boot_timeout: float = 0.0,
                 restart_backoff: float = 1.0, restart_backoff_max: float = 60.0,
                 backoff_reset_seconds: float = 60.0, ready_poll: float = 0.02,
                 plumbing: GuestPlumbing | None = None, disks: Disks | None = None):
        if not drivers:
            raise ValueError("a reconciler needs at least one hypervisor driver")
        if max_parallel_boots < 1:
            raise ValueError("max_parallel_boots must be at least 1")
        self._drivers = dict(drivers)
        self._reporter = reporter
        self._images = images
        self._disks = disks
        self._plumbing = plumbing or GuestPlumbing()
        self._clock = clock
        self._interval = interval
        # Ticked by every pass of the loop: the systemd watchdog pings only
        # while it is fresh (a pass lists and dispatches, it never waits for a boot).
        self.heartbeat = Heartbeat("reconcile loop", max_age=max(60.0, 10 * interval))
        self._stop_timeout = stop_timeout
        self._boot_timeout = boot_timeout
        self._backoff = restart_backoff
        self._backoff_max = restart_backoff_max
        # A guest that stays up this long has recovered: its next crash is
        # retried after the shortest backoff again.
        self._backoff_reset = backoff_reset_seconds
        self._ready_poll = ready_poll

        # The condition's (re-entrant) lock guards every field below.
        self._cond = threading.Condition()
        self._desired: dict[str, VirtualNode] | None = None     # None: not heard yet
        self._vnodes: dict[str, _Vnode] = {}
        # How many complete desired sets have come (a new session's first).
        self.snapshots = 0
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._boots = ThreadPoolExecutor(max_parallel_boots, thread_name_prefix="soda-boot")
        self._stops = ThreadPoolExecutor(max_parallel_boots, thread_name_prefix="soda-stop")
        # Fences and TAPs an earlier Agent left (_release_leftovers): None
        # until listed, then each one still to release.
        self._leftovers: dict[str, _Leftover] | None = None
        self._listing_leftovers = False
        self._leftovers_listing = _Leftover(self._leftover_backoff())

    # ---- the desired set -------------------------------------------------
    def replace_desired(self, vnodes: Iterable[VirtualNode]) -> None:
        """The complete desired set (a SNAPSHOT from the Master)."""
        with self._cond:
            self._desired = {v.name: v for v in vnodes}
            self.snapshots += 1
        self.wake()

    def upsert_desired(self, vnodes: Iterable[VirtualNode]) -> None:
        with self._cond:
            if self._desired is None:
                # Without the snapshot, everything not upserted would look
                # extra and be stopped.
                raise WrongState("assignment update before the snapshot")
            self._desired.update((v.name, v) for v in vnodes)
        self.wake()

    def remove_desired(self, names: Iterable[str]) -> None:
        with self._cond:
            if self._desired is None:
                raise WrongState("assignment removal before the snapshot")
            for name in names:
                self._desired.pop(name, None)
        self.wake()

    # ---- what the Agent reads ---------------------------------------------
    def statuses(self) -> list[VirtualNodeStatus]:
        """Every virtual node this node knows of: the heartbeat's inventory."""
        with self._cond:
            return self._statuses()

    def images_wanted(self) -> list[tuple[str, int]]:
        """(image digest, disk MiB) of every virtual node this node is to
        run: what the image cache must keep (soda.agent.images)."""
        with self._cond:
            return [(v.image_digest, v.resources.disk) for v in (self._desired or {}).values()
                    if v.image_digest]

    def _statuses(self) -> list[VirtualNodeStatus]:
        return [self._vnodes[name].status for name in sorted(self._vnodes)
                if self._vnodes[name].status is not None]

    def _vn(self, name: str) -> _Vnode:
        return self._vnodes.setdefault(name, _Vnode())

    def _keep_console(self, name: str, driver: HypervisorDriver) -> None:
        kept = console.read_tail(driver.console_path(name)) if driver.console_path(name) else ""
        with self._cond:
            self._vn(name).last_console = kept

    def console_of(self, name: str) -> tuple[str, str]:
        """Where virtual node `name`'s console is: (path of the running or
        booting guest's console, "") or ("", the kept end of its last failed
        boot's). NotFound when this node holds no such virtual node."""
        with self._cond:
            desired = self._desired or {}
            vnode = self._vnodes.get(name)
            want = desired.get(name)
            if want is None and vnode is None:
                raise NotFound(f"virtual node {name} is not on this node")
            kept = vnode.last_console if vnode else ""
        driver_name = self._driver_for(want) if want is not None else None
        for candidate in ([driver_name] if driver_name else list(self._drivers)):
            driver = self._drivers.get(candidate)
            if driver is not None and driver.info(name) is not None:
                return driver.console_path(name), ""
        return "", kept

    def _busy(self) -> set[str]:
        return {name for name, v in self._vnodes.items() if v.busy}

    def strangers(self) -> list[str] | None:
        """Guests that run here although the desired set does not own them:
        virtual nodes placed elsewhere meanwhile, or of an older epoch
        (generation). None before the first desired set. Fencing: a node
        that was LOST reports nothing until this is empty."""
        with self._cond:
            desired = None if self._desired is None else dict(self._desired)
            # Still being stopped: gone from the driver's list a moment
            # before its status says STOPPED, and a heartbeat in between
            # would report it STOPPING, which keeps the node LOST.
            out = {name for name, v in self._vnodes.items()
                   if v.status is not None and v.status.phase == Phase.STOPPING}
        if desired is None:
            return None
        for name, entries in self._list_guests().items():
            want = desired.get(name)
            for driver_name, info in entries:
                if want is None or want.deleting or not self._matches(want, driver_name, info):
                    out.add(name)
        return sorted(out)

    def statuses_with_usage(self) -> list[VirtualNodeStatus]:
        """The inventory with what the Daemon measured for each guest that
        is booting or running. The Daemon is asked outside the lock, so a
        slow Daemon never holds up reconciling; a guest it cannot measure
        is reported without usage."""
        with self._cond:
            statuses = self._statuses()
            drivers = {name: self._driver_for(v) for name, v in (self._desired or {}).items()}
        out = []
        for status in statuses:
            driver = drivers.get(status.name)
            usage = None
            # FAILED too: a guest the memory cgroup killed keeps its fence,
            # and so its OOM count, until it boots again.
            if driver and status.phase in (Phase.BOOTING, Phase.RUNNING, Phase.FAILED):
                usage = self._plumbing.usage(status.name, driver)
                if usage is not None:
                    usage = replace(usage, oom_kills=self._oom_kills(status.name, driver,
                                                                     usage.oom_kills))
            out.append(replace(status, usage=usage) if usage is not None else status)
        return out

    def _oom_kills(self, name: str, driver_name: str, fence_kills: int) -> int:
        """OOM kills of a virtual node: by the host's memory cgroup (its
        fence) and by the guest's own kernel, in this life of the guest and
        in the earlier ones this Agent saw end."""
        guest = self._drivers[driver_name].guest_oom_kills(name)
        with self._cond:
            vnode = self._vn(name)
            if guest is None:
                guest = vnode.oom_guest      # down now: what it last said
            vnode.oom_guest = guest
            return vnode.oom_before + fence_kills + guest

    def _retire_oom_kills(self, name: str, driver_name: str) -> None:
        """Before a guest's fence goes and it boots again: keep the OOM
        kills of the life that ended, the fence's and the guest kernel's."""
        usage = self._plumbing.usage(name, driver_name)
        with self._cond:
            vnode = self._vn(name)
            vnode.oom_before += (usage.oom_kills if usage is not None else 0) + vnode.oom_guest
            vnode.oom_guest = 0

    def status(self, name: str) -> VirtualNodeStatus | None:
        with self._cond:
            vnode = self._vnodes.get(name)
            return vnode.status if vnode is not None else None

    # ---- running -----------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """The loop thread: reconcile on every change and every `interval`."""
        while not stop.is_set() and not self._closing.is_set():
            self._wake.clear()
            self.reconcile_once()
            self.heartbeat.tick()
            self._wake.wait(self._interval)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no start or stop is in flight (tests, shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy() and not self._listing_leftovers,
                                       timeout)

    def close(self) -> None:
        """Stop acting; guests are left as they are. Boot workers stop
        watching readiness, queued actions are dropped (a restarted Agent
        redoes whatever is still needed)."""
        with self._cond:
            self._closing.set()
        self._wake.set()
        self._boots.shutdown(wait=False, cancel_futures=True)
        self._stops.shutdown(wait=False, cancel_futures=True)

    # ---- one pass ------------------------------------------------------------
    def reconcile_once(self) -> None:
        with self._cond:
            # Taken before listing: an action that finishes while we list
            # would otherwise look like a missing guest and be started twice.
            busy_before = self._busy()
        found = self._list_guests()
        now = self._clock()
        with self._cond:
            if self._closing.is_set():
                return
            desired = self._desired
            skip = busy_before | self._busy()
            guests, strays = self._resolve(found, desired)
            for name, driver_name, info in strays:
                if name not in skip:
                    self._submit_stop(name, driver_name, info.generation)
                    skip.add(name)
            for name, (driver_name, info) in guests.items():
                if name in skip:
                    continue
                want = None if desired is None else desired.get(name)
                if desired is not None and (want is None or want.deleting
                                            or not self._matches(want, driver_name, info)):
                    if not self._waiting_for_retry(name, now, "stop"):
                        self._submit_stop(name, driver_name, info.generation)
                    continue
                self._observe(name, info, want, now)
            for name, vnode in list(self._vnodes.items()):
                if vnode.unreleased and name not in skip and name not in guests:
                    if not self._waiting_for_retry(name, now, "stop"):
                        generation = vnode.status.generation if vnode.status else 0
                        self._submit_release(name, vnode.unreleased, generation)
                    skip.add(name)
            if desired is not None:
                self._release_leftovers(guests, skip, now)
                for name, want in desired.items():
                    if name not in guests and name not in skip:
                        self._missing(want, now)
                for name in [n for n, v in self._vnodes.items() if v.status is not None]:
                    if name not in desired and name not in guests and name not in skip:
                        self._forget(name)

    def _list_guests(self) -> dict[str, list[tuple[str, GuestInfo]]]:
        found: dict[str, list[tuple[str, GuestInfo]]] = {}
        for driver_name, driver in self._drivers.items():
            for name, info in driver.list().items():
                found.setdefault(name, []).append((driver_name, info))
        return found

    def _resolve(self, found, desired):
        """One guest per name; a same-named guest under another driver (left
        from an interrupted move between hypervisors) is a stray to stop."""
        guests: dict[str, tuple[str, GuestInfo]] = {}
        strays: list[tuple[str, str, GuestInfo]] = []
        for name, entries in found.items():
            want = None if desired is None else desired.get(name)
            wanted_driver = self._driver_for(want) if want else None
            entries = sorted(entries, key=lambda e: e[0] != wanted_driver)
            guests[name] = entries[0]
            strays.extend((name, d, info) for d, info in entries[1:])
        return guests, strays

    def _observe(self, name: str, info: GuestInfo, want: VirtualNode | None, now: float) -> None:
        """A guest that exists and should (or, before the first snapshot, may)."""
        generation = want.generation if want else info.generation
        vnode = self._vn(name)
        current = vnode.status
        if info.state == GUEST_RUNNING:
            moving = want is not None and want.frozen and bool(want.moving_to)
            if moving and vnode.disk_sent != want.moving_to and not vnode.busy \
                    and now >= vnode.pause_retry_at and (info.ready or info.frozen):
                self._submit_send_disk(want)
            # Frozen once booted (a warm pool's guest boots, then freezes).
            elif not moving and want is not None and want.frozen != info.frozen and not vnode.busy \
                    and now >= vnode.pause_retry_at and (info.ready or info.frozen):
                self._submit_pause(want, info)
            if not moving:
                vnode.disk_sent = ""
            if info.frozen:
                thawing = want is not None and not want.frozen
                note = vnode.pause_error or (f"moving: its disk went to node {vnode.disk_sent}"
                                             if vnode.disk_sent else "")
                self._record(name, Phase.THAWING if thawing else Phase.FROZEN, note, generation)
                return
            if want is not None and info.ready and vnode.applied != want.resources \
                    and not vnode.busy and not self._update_held(name, now):
                self._submit_update(want, info)
            if current is not None and current.phase == Phase.RUNNING:
                since = vnode.running_since if vnode.running_since is not None else now
                if vnode.retry is not None and now - since >= self._backoff_reset:
                    vnode.retry = None
                self._record(name, Phase.RUNNING, vnode.note(), generation)
            elif info.ready:
                # Adopted (or finished booting while nobody watched).
                vnode.running_since = now
                self._record(name, Phase.RUNNING, vnode.note(), generation)
            elif current is not None and current.phase in (Phase.FROZEN, Phase.THAWING):
                self._record(name, Phase.THAWING, "", generation)   # resumed; its port not yet answering
            else:
                self._record(name, Phase.BOOTING, "", generation)
            return
        reason = f"guest exited: {info.exit_reason or 'unknown reason'}"
        if want is None:
            self._record(name, Phase.FAILED, reason, generation)
        elif current is None or current.phase != Phase.FAILED:
            self._failed(name, reason, generation, now)
        elif not self._waiting_for_retry(name, now, "start"):
            self._submit_start(want)

    def _missing(self, want: VirtualNode, now: float) -> None:
        """A desired virtual node with no guest."""
        name = want.name
        current = self._vn(name).status
        if want.deleting:
            self._record(name, Phase.STOPPED, "", want.generation)
        elif want.awaits_disk:
            self._record(name, Phase.PENDING, f"waiting for the disk of {want.replaces}, which moves here",
                         want.generation)
        elif self._driver_for(want) is None:
            self._record(name, Phase.FAILED,
                         f"hypervisor {want.hypervisor!r} is not available on this node "
                         f"(available: {', '.join(sorted(self._drivers))})", want.generation)
        elif current is not None and current.phase in (Phase.BOOTING, Phase.RUNNING) \
                and current.generation == want.generation:
            self._failed(name, "guest disappeared", want.generation, now)
        elif not self._waiting_for_retry(name, now, "start"):
            self._record(name, Phase.PENDING, "", want.generation)
            self._submit_start(want)

    # ---- actions -------------------------------------------------------------
    def _submit_start(self, want: VirtualNode) -> None:
        self._vn(want.name).busy = True
        self._track(want.name, "start", want.generation, self._boots.submit(self._start, want))

    def _submit_update(self, want: VirtualNode, info: GuestInfo) -> None:
        self._vn(want.name).busy = True
        future = self._stops.submit(self._update_limits, want)
        future.add_done_callback(lambda f: self._updated(want, f))

    def _updated(self, want: VirtualNode, future: Future) -> None:
        """A limit change that needs a new boot hands over to the boot pool,
        so that it counts against max_parallel_boots like every boot; the
        virtual node stays busy in between."""
        if not future.cancelled() and future.exception() is None and future.result() is BOOT_AGAIN:
            with self._cond:
                if not self._closing.is_set():
                    try:
                        boot = self._boots.submit(self._start, want)
                    except RuntimeError:        # the pool shut down meanwhile
                        pass
                    else:
                        self._track(want.name, "start", want.generation, boot)
                        return
        self._done(want.name, "update", want.generation, future)

    def _submit_pause(self, want: VirtualNode, info: GuestInfo) -> None:
        self._vn(want.name).busy = True
        action = "freeze" if want.frozen else "thaw"
        self._track(want.name, action, want.generation, self._stops.submit(self._pause, want))

    def _pause(self, want: VirtualNode) -> None:
        """Freeze or thaw the guest as `want` says. A failure leaves it as it
        is, says why in its reason and is tried again after a backoff."""
        name = want.name
        driver_name = self._driver_for(want)
        action = "freeze" if want.frozen else "thaw"
        try:
            driver = self._drivers[driver_name]
            (driver.freeze if want.frozen else driver.thaw)(name)
        except (SodaError, OSError, KeyError) as exc:
            self._pause_failed(name, action, f"{action} failed: {exc}")
            return
        with self._cond:
            # The next pass reports what the driver now finds (FROZEN, or
            # RUNNING once the thawed guest answers).
            vnode = self._vn(name)
            vnode.pause_error, vnode.pause_retry_at = "", 0.0

    def _pause_failed(self, name: str, action: str, why: str) -> None:
        """A freeze, thaw or disk sending that failed: its reason says why
        and when it is tried again."""
        with self._cond:
            delay = self._schedule_retry(name, action, self._clock())
            vnode = self._vn(name)
            vnode.pause_error = f"{why} (retry in {delay:g}s)"
            vnode.pause_retry_at = self._clock() + delay
        log.warning("virtual node %s: %s", name, vnode.pause_error)

    def _submit_send_disk(self, want: VirtualNode) -> None:
        self._vn(want.name).busy = True
        self._track(want.name, "send its disk", want.generation, self._stops.submit(self._send_disk, want))

    def _send_disk(self, want: VirtualNode) -> None:
        """For a move that carries the guest's disk: have the guest write out
        what it holds, freeze it, and send its disk. A failure leaves it
        frozen, says why in its reason and is tried again after a backoff;
        the Master gives the move up (and thaws it) if the disk never comes."""
        name = want.name
        try:
            if self._disks is None:
                raise WrongState("this Agent cannot send a guest's disk")
            driver = self._drivers[self._driver_for(want)]
            info = driver.info(name)
            if info is not None and not info.frozen:
                driver.sync_disk(name)
                driver.freeze(name)
            self._disks.send(want, driver)
        except WrongState as exc:
            # The Master no longer wants it (the move was given up): the
            # desired set that follows says what now.
            log.info("virtual node %s: its disk was not taken: %s", name, exc)
            with self._cond:
                self._vn(name).disk_sent = want.moving_to
            return
        except (SodaError, OSError, KeyError) as exc:
            self._pause_failed(name, "send its disk", f"sending its disk to node {want.moving_to} failed: {exc}")
            return
        with self._cond:
            vnode = self._vn(name)
            vnode.disk_sent, vnode.pause_error, vnode.pause_retry_at = want.moving_to, "", 0.0

    def _submit_stop(self, name: str, driver_name: str, generation: int) -> None:
        self._vn(name).busy = True
        self._track(name, "stop", generation, self._stops.submit(self._stop, name, driver_name, generation))

    def _submit_release(self, name: str, driver_name: str, generation: int) -> None:
        self._vn(name).busy = True
        self._track(name, "stop", generation, self._stops.submit(self._release_fence, name,
                                                                  driver_name, generation))

    def _track(self, name: str, action: str, generation: int, future: Future) -> None:
        future.add_done_callback(lambda f: self._done(name, action, generation, f))

    def _done(self, name: str, action: str, generation: int, future: Future) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            # Not a SodaError or OSError (the actions turn those into phases
            # themselves): a bug, or a library failing in a way nobody
            # foresaw. It is this virtual node's problem only.
            log.error("%s of virtual node %s failed unexpectedly", action, name, exc_info=exc)
        with self._cond:
            if name in self._vnodes:
                self._vnodes[name].busy = False
            if exc is not None:
                self._action_failed(name, action, f"unexpected error: {exc!r}", generation)
            self._cond.notify_all()
        self._wake.set()

    def _action_failed(self, name: str, action: str, why: str, generation: int) -> None:
        """Record that `action` of `name` failed and schedule its retry.
        A failed limit change leaves the guest running on its old limits."""
        if action == "update":
            delay = self._schedule_retry(name, action, self._clock())
            vnode = self._vn(name)
            vnode.limits_error = f"new limits not applied yet: {why} (retry in {delay:g}s)"
            current = vnode.status
            if current is not None and current.phase == Phase.RUNNING:
                self._record(name, Phase.RUNNING, vnode.note(), current.generation)
        else:
            self._failed(name, f"{action} failed: {why}", generation, self._clock(), action)

    def _start(self, want: VirtualNode) -> None:
        name, generation = want.name, want.generation
        driver_name = self._driver_for(want)
        driver = self._drivers[driver_name]
        if not self._still_wanted(want):
            return
        self._set(name, Phase.PULLING, "", generation)
        try:
            path = self._images.ensure(want.image_digest,
                                       want.resources.disk if driver.disk_bound else 0)
        except (SodaError, OSError) as exc:
            self._fail(name, f"pulling image {want.image_digest}: {exc}", generation,
                       temporary=isinstance(exc, TemporaryError))
            return
        if not self._still_wanted(want):
            return
        self._set(name, Phase.BOOTING, "", generation)
        boot_timeout = want.boot_timeout or self._boot_timeout or driver.boot_timeout
        began = self._clock()
        try:
            if driver.info(name) is not None:
                # A guest that died: clear what is left of it (stray helper
                # processes, its fence) so that it boots afresh.
                self._retire_oom_kills(name, driver_name)
                driver.stop(name, self._stop_timeout)
                self._plumbing.release(name, driver_name)
            extras = self._plumbing.prepare(want, driver_name)
            with self._cond:
                vnode = self._vn(name)
                vnode.applied, vnode.limits_error = want.resources, ""
            driver.start(self._guest_spec(want, path, driver_name, **extras))
        except (SodaError, OSError) as exc:
            self._release(name, driver_name)
            self._fail(name, f"starting: {exc}", generation, temporary=isinstance(exc, TemporaryError))
            return
        try:
            while not driver.is_ready(name):
                info = driver.info(name)
                if info is None or info.state != GUEST_RUNNING:
                    why = info.exit_reason if info else "gone"
                    raise SodaError(f"guest exited while booting: {why or 'unknown reason'}")
                if self._clock() - began > boot_timeout:
                    # What its console said is the reason's evidence, and
                    # what `service logs` shows until the retry boots.
                    said = console.quote(driver.console_path(name))
                    self._keep_console(name, driver)
                    # Stopped so that the retry boots it afresh.
                    driver.stop(name, self._stop_timeout)
                    self._release(name, driver_name)
                    raise SodaError(f"not answering on port {want.port} {boot_timeout:g}s after start "
                                    f"(boot_timeout); console: {said or '(nothing meaningful)'}")
                if self._closing.wait(self._ready_poll) or not self._still_wanted(want):
                    return      # the loop (or a restarted Agent) takes over from here
        except (SodaError, OSError) as exc:
            self._fail(name, f"booting: {exc}", generation, temporary=isinstance(exc, TemporaryError))
            return
        with self._cond:
            now = self._clock()
            self._vn(name).running_since = now
            self._record(name, Phase.RUNNING, "", generation, boot_seconds=now - began)
        log.info("virtual node %s running (booted in %.2fs)", name, now - began)

    def _update_limits(self, want: VirtualNode) -> str | None:
        """New CPU, bandwidth or memory for a running guest, applied without
        a restart where the guest allows it (the Master bumps the generation,
        and so restarts, for what never can: a disk, image or hypervisor
        change, memory on a hypervisor without live_memory).

        Memory changes in the guest and in its fence: shrinking, the guest
        gives its RAM back before the cgroup limit drops under it; growing,
        the limit rises first. A guest can grow live only back up to the
        memory it booted with, which only its driver knows: past that it is
        booted again here, and its status says why while it boots."""
        name = want.name
        driver_name = self._driver_for(want)
        driver = self._drivers[driver_name]
        memory = want.resources.memory
        with self._cond:
            old = self._vn(name).applied
        # After an Agent restart nothing is known to be applied; the
        # driver's set_memory takes a target, so asking again is harmless.
        change_memory = (old.memory != memory if old is not None
                         else driver.live_memory)
        grows = old is not None and memory > old.memory
        live = True
        try:
            if change_memory and not grows:
                live = driver.set_memory(name, memory)
            if live:
                self._plumbing.update(want, driver_name)
                if change_memory and grows:
                    live = driver.set_memory(name, memory)
        except (SodaError, OSError) as exc:
            log.warning("applying new limits to %s failed, retrying: %s", name, exc)
            with self._cond:
                # The guest runs on with its old limits: say so in its status.
                self._action_failed(name, "update", str(exc), want.generation)
            return
        if not live:
            why = f"restarting: {memory} MiB of memory is more than it booted with"
            log.info("virtual node %s %s", name, why)
            self._set(name, Phase.BOOTING, why, want.generation)
            return BOOT_AGAIN
        with self._cond:
            vnode = self._vn(name)
            vnode.applied, vnode.limits_error = want.resources, ""
            if vnode.retry is not None and vnode.retry.action == "update":
                vnode.retry = None
        log.info("limits of %s now %s", name, want.resources.as_dict())

    def _stop(self, name: str, driver_name: str, generation: int) -> None:
        self._set(name, Phase.STOPPING, "", generation)
        try:
            self._drivers[driver_name].stop(name, self._stop_timeout)
        except (SodaError, OSError) as exc:
            self._fail(name, f"stopping: {exc}", generation, action="stop")
            return
        self._release_fence(name, driver_name, generation)

    def _release_fence(self, name: str, driver_name: str, generation: int) -> None:
        """Release a stopped guest's fence and network; kept for a retry if
        that fails, so that nothing of it outlives the virtual node."""
        try:
            self._plumbing.release(name, driver_name)
        except (SodaError, OSError) as exc:
            with self._cond:
                self._vn(name).unreleased = driver_name
            self._fail(name, f"releasing its fence: {exc}", generation, action="stop")
            return
        with self._cond:
            self._vn(name).unreleased = ""
        self._set(name, Phase.STOPPED, "", generation)
        log.info("virtual node %s stopped", name)

    def _release_leftovers(self, guests: Mapping[str, object], skip: set[str], now: float) -> None:
        """Release what an earlier Agent left: killed between a guest's stop
        and the release of its fence, it was the only one that knew. Listed
        once the first desired set says what is wanted, off the loop thread
        (the Daemon may be slow or down); a leftover is released when no
        guest of its name runs, none is wanted and no action of its name is
        in flight, and again with backoff until that works. One whose guest
        runs or is wanted is no leftover: that guest's stop releases it, or
        its start takes it over."""
        if self._leftovers is None:
            if not self._listing_leftovers and now >= self._leftovers_listing.retry_at:
                self._listing_leftovers = True
                self._stops.submit(self._list_leftovers)
            return
        for name, leftover in sorted(self._leftovers.items()):
            want = self._desired.get(name)
            if name in guests or (want is not None and not want.deleting):
                del self._leftovers[name]
            elif name not in skip and now >= leftover.retry_at:
                self._vn(name).busy = True
                skip.add(name)
                self._stops.submit(self._release_leftover, name)

    def _list_leftovers(self) -> None:
        found = failure = None
        try:
            found = self._plumbing.leftovers()
        except Exception as exc:     # the Daemon down, or a bug (then with its traceback)
            failure = exc
        with self._cond:
            self._listing_leftovers = False
            if failure is None:
                self._leftovers = {name: _Leftover(self._leftover_backoff()) for name in found}
            else:
                delay = self._put_off(self._leftovers_listing)
                log.warning("cannot list the fences and TAPs on this node (retry in %gs): %s",
                            delay, failure, exc_info=not isinstance(failure, (SodaError, OSError)))
            self._cond.notify_all()
        self._wake.set()

    def _release_leftover(self, name: str) -> None:
        failure = None
        try:
            self._plumbing.release_leftover(name)
            log.info("released the fence and network of %s, left by an earlier Agent", name)
        except Exception as exc:     # the Daemon down, or a bug (then with its traceback)
            failure = exc
        with self._cond:
            self._vnodes[name].busy = False
            if self._vnodes[name] == _Vnode():
                del self._vnodes[name]      # only the busy mark made it
            if failure is None:
                self._leftovers.pop(name, None)
            elif name in self._leftovers:   # else wanted again meanwhile: its start takes over
                delay = self._put_off(self._leftovers[name])
                log.warning("releasing the fence and network of %s, left by an earlier Agent, "
                            "failed (retry in %gs): %s", name, delay, failure,
                            exc_info=not isinstance(failure, (SodaError, OSError)))
            self._cond.notify_all()
        self._wake.set()

    def _leftover_backoff(self) -> Backoff:
        # A virtual node's: without jitter, as nothing else asks this Daemon.
        return Backoff(self._backoff, self._backoff_max, jitter=0)

    def _put_off(self, leftover: _Leftover) -> float:
        """One more failure: the next try after the backoff."""
        delay = leftover.backoff.next()
        leftover.retry_at = self._clock() + delay
        return delay

    # ---- helpers (_observe, _missing, _record, _failed, _forget and the
    # _submit_* ones run with the lock held) ------------------------------
    def _driver_for(self, want: VirtualNode) -> str | None:
        if want.hypervisor:
            return want.hypervisor if want.hypervisor in self._drivers else None
        # None named: the first this node offers (its configured order).
        return next(iter(self._drivers))

    def _matches(self, want: VirtualNode, driver_name: str, info: GuestInfo) -> bool:
        # Generation 0: a driver that cannot tell; trust the guest.
        return (driver_name == self._driver_for(want)
                and info.generation in (0, want.generation))

    def _still_wanted(self, want: VirtualNode) -> bool:
        with self._cond:
            if self._closing.is_set() or self._desired is None:
                return False
            current = self._desired.get(want.name)
            return (current is not None and not current.deleting
                    and current.generation == want.generation
                    and current.hypervisor == want.hypervisor)

    def _update_held(self, name: str, now: float) -> bool:
        """A limit change that failed is not tried again before its backoff."""
        retry = self._vn(name).retry
        return retry is not None and retry.action == "update" and now < retry.retry_at

    def _waiting_for_retry(self, name: str, now: float, action: str) -> bool:
        retry = self._vn(name).retry
        current = self._vn(name).status
        return (retry is not None and retry.action == action and now < retry.retry_at
                and current is not None and current.phase == Phase.FAILED)

    def _guest_spec(self, want: VirtualNode, image_path: str, driver_name: str,
                    **plumbing) -> GuestSpec:
        return GuestSpec(name=want.name, service=want.service, image_path=image_path,
                         image_digest=want.image_digest, resources=want.resources,
                         address=want.address, prefix_length=want.prefix_length,
                         gateway=want.gateway, port=want.port, hypervisor=driver_name,
                         generation=want.generation, **plumbing)

    def _release(self, name: str, driver_name: str) -> None:
        """Undo the plumbing of a guest that did not come up; a failure here
        is logged, since the start failure is what gets reported."""
        try:
            self._plumbing.release(name, driver_name)
        except (SodaError, OSError) as exc:
            log.warning("releasing %s after a failed start: %s", name, exc)

    def _record(self, name: str, phase: Phase, reason: str, generation: int,
                boot_seconds: float | None = None) -> None:
        """Store a status and report it if it changed."""
        old = self._vn(name).status
        if boot_seconds is None:
            keep = old is not None and old.phase == phase == Phase.RUNNING
            boot_seconds = old.boot_seconds if keep else 0.0
        new = VirtualNodeStatus(name=name, phase=phase, reason=reason,
                                boot_seconds=boot_seconds, generation=generation)
        if new == old:
            return
        self._vn(name).status = new
        if phase == Phase.FAILED:
            log.warning("virtual node %s failed: %s", name, reason)
        self._reporter.report([new])

    def _schedule_retry(self, name: str, action: str, now: float) -> float:
        vnode = self._vn(name)
        if vnode.retry is None:
            # No jitter: one node's virtual nodes retry against nothing shared.
            vnode.retry = _Retry(Backoff(self._backoff, self._backoff_max, jitter=0))
        retry = vnode.retry
        retry.failures += 1
        retry.action = action
        delay = retry.backoff.next()
        retry.retry_at = now + delay
        return delay

    def _failed(self, name: str, reason: str, generation: int, now: float,
                action: str = "start", temporary: bool = False) -> None:
        """`temporary`: the cause should pass by itself (a TemporaryError:
        the Daemon or the Master out of reach), which the reason says, so
        that `sodactl --wait` waits for the retry instead of giving up."""
        delay = self._schedule_retry(name, action, now)
        self._vn(name).running_since = None
        self._record(name, Phase.FAILED, f"{reason} {retry_note(delay, temporary)}", generation)

    def _forget(self, name: str) -> None:
        self._vnodes.pop(name, None)

    def _set(self, name: str, phase: Phase, reason: str, generation: int) -> None:
        with self._cond:
            self._record(name, phase, reason, generation)

    def _fail(self, name: str, reason: str, generation: int, action: str = "start",
              temporary: bool = False) -> None:
        with self._cond:
            self._failed(name, reason, generation, self._clock(), action, temporary)
