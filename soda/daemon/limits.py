"""LimitManager: fence virtual nodes, change their limits live, release them.

The Daemon's domain logic, behind the gRPC servicer: it checks a request,
asks `plan` for the values, and has the cgroup backend and the shaper write
them. It keeps no state of its own — everything is read back from the kernel
(cgroup tree, links), so a restarted Daemon carries on where it stopped.
It takes its backend, shaper, clock and sleep in __init__ so tests inject
fakes. No grpc and no pyroute2 here.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from soda import errors, model
from soda.daemon.cgroups import CgroupBackend
from soda.daemon.config import DaemonConfig
from soda.daemon.plan import plan
from soda.model.fence import Fence, Released
from soda.daemon.tc import Shaper, TrafficCounters, check_link_name

log = logging.getLogger(__name__)

KILL_POLL_SECONDS = 0.02


@dataclass(eq=False)
class LimitManager:
    cgroups: CgroupBackend
    shaper: Shaper | None              # None: this Daemon shapes no traffic
    config: DaemonConfig
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    # One change at a time: apply and release of one virtual node must not
    # interleave, and they are rare and quick.
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def _need_shaper(self) -> Shaper:
        if self.shaper is None:
            raise errors.WrongState("this Daemon shapes no traffic (started without netlink)")
        return self.shaper

    def apply(self, name: str, resources: model.Resources, hypervisor: str, memory_overhead: int,
              tap: str = "", cpu_cap: bool = False) -> Fence:
        """Fence (or re-fence) `name`. `memory_overhead`: MiB its hypervisor
        process needs above the guest's memory (its driver declares it);
        `hypervisor` names that driver in the log."""
        model.check_dns_label("virtual node", name, model.NODE_NAME_MAX)
        model.check_hypervisor_name(hypervisor)
        if tap:
            check_link_name(tap)
        limits = plan(resources, cpu_cap, self.config, memory_overhead)
        with self._lock:
            paths = self.cgroups.create(name)
            self.cgroups.set_limits(name, limits)
            ifb = ""
            if tap and limits.rate_bit:
                ifb = self._need_shaper().apply(name, tap, limits.rate_bit, limits.burst_bytes)
            elif self.shaper is not None:
                # Not shaped (any more): drop what an earlier apply set up.
                self.shaper.release(name)
                limits = replace(limits, rate_bit=0, burst_bytes=0)
        log.info("fenced %s (%s): cpu.shares=%d quota=%s memory=%d MiB pids=%d rate=%s",
                 name, hypervisor, limits.cpu_shares,
                 "none" if limits.cpu_quota_us < 0 else f"{limits.cpu_quota_us}us",
                 limits.memory_bytes >> 20, limits.pids_max,
                 f"{limits.rate_bit // 1_000_000} Mbit/s on {tap}/{ifb}" if ifb else "unshaped")
        return Fence(name=name, cgroups=paths, cgroup_version=self.cgroups.version,
                     limits=limits, tap=tap if ifb else "", ifb=ifb)

    def release(self, name: str) -> Released:
        model.check_dns_label("virtual node", name, model.NODE_NAME_MAX)
        with self._lock:
            killed = self._kill_all(name)
            removed = self.cgroups.remove(name)
            shaped = self.shaper.release(name) if self.shaper is not None else False
        existed = removed or shaped or killed > 0
        if existed:
            log.info("released %s (%d process(es) killed)", name, killed)
        return Released(name=name, existed=existed, killed=killed)

    def _kill_all(self, name: str) -> int:
        """SIGKILL every process in the virtual node's cgroups until none is
        left: a guest's helpers can outlive its main process, and a process
        may fork while we kill. With cgroup v2's cgroup.kill the kernel does
        it in one write; else (v1) each pid, through a pidfd."""
        killed: set[int] = set()
        deadline = self.clock() + self.config.kill_timeout_seconds
        pids = self.cgroups.pids(name)
        if pids and self.cgroups.kill_all(name):
            # cgroup.kill (v2): the kernel kills the whole cgroup, forks in
            # flight included; the loop only waits for the processes to go
            # (and signals a straggler again, which costs nothing).
            killed |= pids
            self.sleep(KILL_POLL_SECONDS)
        while True:
            pids = self.cgroups.pids(name)
            if not pids:
                return len(killed)
            if self.clock() > deadline:
                raise errors.TemporaryError(
                    f"processes {', '.join(map(str, sorted(pids)))} of virtual node {name} "
                    f"survive SIGKILL after {self.config.kill_timeout_seconds:g}s")
            for pid in sorted(pids):
                if self.cgroups.kill(name, pid):
                    killed.add(pid)
            # A task the v1 freezer holds dies only once thawed (the v2
            # freezer lets a fatal signal through): thaw after the kill, so
            # that a frozen guest never runs again.
            if self.cgroups.frozen(name):
                self.cgroups.freeze(name, False)
            self.sleep(KILL_POLL_SECONDS)

    def freeze(self, name: str, frozen: bool) -> Fence:
        """Freeze (or thaw) the virtual node's processes in place, through
        the cgroup freezer; idempotent. NotFound when it is not fenced here,
        WrongState when this host's cgroups have no freezer."""
        model.check_dns_label("virtual node", name, model.NODE_NAME_MAX)
        with self._lock:
            if not self.cgroups.exists(name):
                raise errors.NotFound(f"virtual node {name} is not fenced here")
            self.cgroups.freeze(name, frozen)
            log.info("%s %s", "froze" if frozen else "thawed", name)
            return self._read(name)

    def usage(self, name: str) -> model.VnodeUsage:
        model.check_dns_label("virtual node", name, model.NODE_NAME_MAX)
        cgroup = self.cgroups.usage(name)
        traffic = (self.shaper.counters(name) if self.shaper is not None else None) or TrafficCounters()
        return replace(cgroup, **asdict(traffic))

    def get(self, name: str) -> Fence:
        model.check_dns_label("virtual node", name, model.NODE_NAME_MAX)
        if not self.cgroups.exists(name):
            raise errors.NotFound(f"virtual node {name} is not fenced here")
        return self._read(name)

    def list(self) -> list[Fence]:
        fences = []
        for name in self.cgroups.names():
            try:
                fences.append(self._read(name))
            except errors.NotFound:
                continue    # released while we listed
        return fences

    def _read(self, name: str) -> Fence:
        limits = self.cgroups.read_limits(name)
        shaping = self.shaper.read(name) if self.shaper is not None else None
        if shaping is not None:
            limits = replace(limits, rate_bit=shaping.rate_bit, burst_bytes=shaping.burst_bytes)
        return Fence(name=name, cgroups=self.cgroups.paths(name),
                     cgroup_version=self.cgroups.version, limits=limits,
                     tap=shaping.tap if shaping else "", ifb=shaping.ifb if shaping else "",
                     frozen=self.cgroups.frozen(name))
