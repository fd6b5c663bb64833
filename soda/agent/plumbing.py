"""What a real guest needs around its hypervisor process: a TAP on the node
bridge and the Daemon's fence (cgroups, tc). Prepared before a guest starts,
released after it stops, so that nothing outlives a virtual node.

The reconciler calls `prepare` and `release`; this module owns the order
(TAP first, since the Daemon shapes it; release in reverse) and the undo of
a half-done prepare. The fake driver gets no plumbing.
"""

from __future__ import annotations

import logging
from typing import Protocol

from soda.agent.network import NodeNetwork
from soda.errors import SodaError
from soda.model import VirtualNode

log = logging.getLogger(__name__)

# Hypervisors whose guests are real processes with a network device.
REAL_HYPERVISORS = ("uml", "qemu")


class Daemon(Protocol):
    """The Daemon as the Agent sees it (soda.rpc.daemon_client.DaemonClient):
    apply_limits returns the fence, whose `cgroups` the guest must join."""
    def apply_limits(self, name: str, resources, hypervisor: str, tap: str, cpu_cap: bool = False): ...
    def release_limits(self, name: str): ...


class GuestPlumbing:
    """No plumbing at all: what the fake driver gets, and unit tests."""

    def prepare(self, want: VirtualNode, hypervisor: str) -> dict:
        return {}

    def update(self, want: VirtualNode, hypervisor: str) -> None:
        """Apply changed limits to a running guest, live."""
        return None

    def release(self, name: str, hypervisor: str) -> None:
        return None


class NodePlumbing(GuestPlumbing):
    def __init__(self, network: NodeNetwork, daemon: Daemon | None):
        self.network = network
        self.daemon = daemon

    def prepare(self, want: VirtualNode, hypervisor: str) -> dict:
        """TAP, then limits; returns the GuestSpec fields they fill in.
        Idempotent: preparing an adopted guest again changes nothing."""
        if hypervisor not in REAL_HYPERVISORS:
            return {}
        try:
            tap = self.network.ensure_tap(want.name)
            cgroups = (self.daemon.apply_limits(want.name, want.resources, hypervisor, tap,
                                                cpu_cap=want.cpu_cap).cgroups
                       if self.daemon is not None else ())
        except SodaError:
            self.release(want.name, hypervisor)
            raise
        return {"tap": tap, "netns": self.network.netns, "cgroups": tuple(cgroups)}

    def update(self, want: VirtualNode, hypervisor: str) -> None:
        # ApplyLimits is idempotent and changes cgroup values and HTB rates
        # in place: the guest keeps running.
        if hypervisor in REAL_HYPERVISORS and self.daemon is not None:
            self.daemon.apply_limits(want.name, want.resources, hypervisor,
                                     self.network.ensure_tap(want.name), cpu_cap=want.cpu_cap)

    def release(self, name: str, hypervisor: str) -> None:
        if hypervisor not in REAL_HYPERVISORS:
            return
        # Limits first: the Daemon kills what is left in the cgroups and
        # removes the qdiscs that sit on the TAP.
        if self.daemon is not None:
            self.daemon.release_limits(name)
        self.network.remove_tap(name)
