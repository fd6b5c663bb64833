"""What this physical node offers the Master: its capacity.

Owns the measurement of CPU, memory, disk and bandwidth (with psutil, os
and sysfs) and the rule that a configured value wins over a measured one.
Bandwidth is the link speed of the interface that carries the default
route; where the kernel does not know it (virtual NICs report none) a
documented default is taken and reported as assumed, so that `node list`
says so. It must not reserve anything or talk to the Master; the Agent
registers the result.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import psutil

from soda.config import CapacityConfig
from soda.model.spec import Resources

# Taken when the uplink reports no speed (virtio, veth, tun): a gigabit NIC.
DEFAULT_BANDWIDTH_MBIT = 1000
SYS_NET = "/sys/class/net"
PROC_ROUTE = "/proc/net/route"
# Memory kept back for the host itself (kernel, Agent, Daemon, page cache):
# a tenth of the machine, at least 256 MiB, so small test VMs still work.
MEMORY_RESERVE_FRACTION = 0.10
MEMORY_RESERVE_MIN_MIB = 256

MiB = 1 << 20


class HostProbe:
    """The machine's raw figures; tests pass a fake one."""

    def cpu_count(self) -> int:
        return os.cpu_count() or 1

    def memory_total_mib(self) -> int:
        return psutil.virtual_memory().total // MiB

    def disk_free_mib(self, path: str) -> int:
        return shutil.disk_usage(path).free // MiB

    def uplink_speed_mbit(self) -> int:
        """Link speed of the default route's interface; 0 when unknown."""
        device = default_route_device()
        return link_speed_mbit(device) if device else 0


def default_route_device(route_table: str = PROC_ROUTE) -> str:
    """The interface of the IPv4 default route ("" when there is none)."""
    try:
        with open(route_table) as f:
            next(f, None)                                  # the header
            for line in f:
                fields = line.split()
                # Destination and Mask 0: the default route.
                if len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000":
                    return fields[0]
    except OSError:
        pass
    return ""


def link_speed_mbit(device: str, sys_net: str = SYS_NET) -> int:
    """What the kernel says the link's speed is, in Mbit/s; 0 when it does
    not know (reading fails with EINVAL, or it says -1: virtual devices)."""
    try:
        with open(os.path.join(sys_net, device, "speed")) as f:
            speed = int(f.read().strip())
    except (OSError, ValueError):
        return 0
    return speed if speed > 0 else 0


@dataclass(frozen=True)
class Capacity:
    resources: Resources
    assumed: tuple[str, ...] = ()      # fields taken from a default, not measured


def memory_reserve_mib(total_mib: int) -> int:
    return max(MEMORY_RESERVE_MIN_MIB, int(total_mib * MEMORY_RESERVE_FRACTION))


def measure_capacity(configured: CapacityConfig, state_dir: str,
                     probe: HostProbe | None = None) -> Capacity:
    """Capacity to register: configured fields as given, zero ones measured."""
    probe = probe or HostProbe()
    assumed = []
    cpu = configured.cpu or float(probe.cpu_count())
    memory = configured.memory
    if not memory:
        total = probe.memory_total_mib()
        memory = max(0, total - memory_reserve_mib(total))
    disk = configured.disk or probe.disk_free_mib(state_dir)
    bandwidth = configured.bandwidth or probe.uplink_speed_mbit()
    if not bandwidth:
        bandwidth = DEFAULT_BANDWIDTH_MBIT
        assumed.append("bandwidth")
    return Capacity(Resources(cpu=cpu, memory=memory, bandwidth=bandwidth, disk=disk), tuple(assumed))
