"""What a real guest needs around its hypervisor process: a TAP on the node
bridge, owned by the uid its service's VMMs run as on this node
(soda.agent.uids), and the Daemon's fence (cgroups, tc). Prepared before a
guest starts, released after it stops, so that nothing outlives a virtual
node.

The reconciler calls `prepare` and `release`; this module owns the order
(uid, then TAP, since the TAP is the uid's, then the fence, since the Daemon
shapes the TAP; release in reverse, the uid let go with a service's last
guest here) and the undo of a half-done prepare. Only guests of drivers that
declare `plumbing` get any (the fake driver does not). Fences, TAPs and
uids are found again (`leftovers`: in the kernel, in the uid table), so a
restarted Agent can release those whose release an earlier Agent did not
live to finish.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Mapping, Protocol

from soda.agent.network import NetworkBackend
from soda.agent.uids import GuestUids
from soda.errors import NotFound, SodaError, WrongState
from soda.hypervisors.base import guest_mac
from soda.model.state import DriverCapabilities, VirtualNode
from soda.model.usage import Usage

log = logging.getLogger(__name__)


class Daemon(Protocol):
    """The Daemon as the Agent sees it (soda.rpc.daemon_client.DaemonClient):
    apply_limits returns the fence, whose `cgroups` the guest must join."""
    def apply_limits(self, name: str, resources, hypervisor: str, memory_overhead: int,
                     tap: str = "", cpu_cap: bool = False): ...
    def release_limits(self, name: str): ...
    def freeze(self, name: str, frozen: bool): ...
    def usage(self, name: str): ...
    def list(self): ...


class GuestPlumbing:
    """No plumbing at all: what the fake driver gets, and unit tests."""

    def prepare(self, want: VirtualNode, hypervisor: str) -> dict:
        return {}

    def update(self, want: VirtualNode, hypervisor: str) -> None:
        """Apply changed limits to a running guest, live."""
        return None

    def release(self, name: str, hypervisor: str) -> None:
        return None

    def freeze(self, name: str, hypervisor: str, frozen: bool) -> None:
        """Freeze (or thaw) the guest's fence, every process in it: for
        drivers whose VMM cannot pause itself (their `freezer`)."""
        raise WrongState(f"virtual node {name} has no fence to freeze on this node")

    def usage(self, name: str, hypervisor: str) -> Usage | None:
        """What the guest has used so far; None when nothing measures it."""
        return None

    def leftovers(self) -> set[str]:
        """Every virtual node that has a fence or a network on this node,
        whichever Agent made them."""
        return set()

    def release_leftover(self, name: str) -> None:
        """Release a virtual node's fence and network whatever its driver:
        for what an earlier Agent left behind."""
        return None


class NodePlumbing(GuestPlumbing):
    def __init__(self, network: NetworkBackend, daemon: Daemon | None,
                 drivers: Mapping[str, DriverCapabilities], uids: GuestUids | None = None,
                 open_files: int = 0):
        self.network = network
        self.daemon = daemon
        # The uid each service's VMMs run as (None: root, the drop is off),
        # and each VMM's open-files limit (0: the Agent's own).
        self.uids = uids
        self.open_files = open_files
        # What each hypervisor's driver declares: whether its guests need
        # plumbing, and the MiB its process needs above the guest's memory
        # (the Daemon's memory limit adds it).
        self.drivers = dict(drivers)

    def _plumbed(self, hypervisor: str) -> bool:
        caps = self.drivers.get(hypervisor)
        return caps is not None and caps.plumbing

    def prepare(self, want: VirtualNode, hypervisor: str) -> dict:
        """TAP, then limits; returns the GuestSpec fields they fill in.
        Idempotent: preparing an adopted guest again changes nothing."""
        if not self._plumbed(hypervisor):
            return {}
        try:
            plugged = self._plug(want)
            cgroups = (self._fence(want, hypervisor, plugged["tap"]).cgroups
                       if self.daemon is not None else ())
        except SodaError:
            self.release(want.name, hypervisor)
            raise
        return {**plugged, "cgroups": tuple(cgroups)}

    def update(self, want: VirtualNode, hypervisor: str) -> None:
        # ApplyLimits is idempotent and changes cgroup values and HTB rates
        # in place: the guest keeps running. Plugging in again is idempotent
        # too, and says which TAP the limits shape.
        if self._plumbed(hypervisor) and self.daemon is not None:
            self._fence(want, hypervisor, self._plug(want)["tap"])

    def _plug(self, want: VirtualNode) -> dict:
        """The TAP, owned by the uid the guest's VMM runs as; with the
        GuestSpec fields that say how it runs (uid, open-files limit)."""
        uid = self.uids.acquire(want.service, want.name) if self.uids is not None else 0
        plugged = self.network.plug(want.name, want.address, guest_mac(want.address), owner=uid)
        return {**plugged, "uid": uid, "open_files": self.open_files}

    def _fence(self, want: VirtualNode, hypervisor: str, tap: str):
        return self.daemon.apply_limits(want.name, want.resources, hypervisor,
                                        self.drivers[hypervisor].memory_overhead, tap=tap,
                                        cpu_cap=want.cpu_cap)

    def usage(self, name: str, hypervisor: str) -> Usage | None:
        if not self._plumbed(hypervisor) or self.daemon is None:
            return None
        try:
            u = self.daemon.usage(name)
        except NotFound:
            return None           # not fenced (yet, or any more)
        except SodaError as exc:
            # Usage is a report, not a duty: the heartbeat goes out without it.
            log.debug("no usage for %s from the Daemon: %s", name, exc)
            return None
        return replace(u.usage(), packets_refused=self.network.refused_packets(name))

    def freeze(self, name: str, hypervisor: str, frozen: bool) -> None:
        if not self._plumbed(hypervisor) or self.daemon is None:
            return super().freeze(name, hypervisor, frozen)
        self.daemon.freeze(name, frozen)

    def release(self, name: str, hypervisor: str) -> None:
        if self._plumbed(hypervisor):
            self.release_leftover(name)

    def leftovers(self) -> set[str]:
        """The Daemon's fences and the network backend's TAPs, by virtual node."""
        fenced = {fence.name for fence in self.daemon.list()} if self.daemon is not None else set()
        holding = self.uids.vnodes() if self.uids is not None else set()
        return fenced | self.network.plugged() | holding

    def release_leftover(self, name: str) -> None:
        # Limits first: the Daemon kills what is left in the cgroups and
        # removes the qdiscs that sit on the TAP.
        if self.daemon is not None:
            self.daemon.release_limits(name)
        self.network.unplug(name)
        # Last: the uid is free for another service only once the TAP it
        # owned is gone (the VMM is, before any release).
        if self.uids is not None:
            self.uids.release(name)
