"""What this physical node offers the Master: its capacity.

Owns the measurement of CPU, memory, disk and bandwidth (with psutil and
os) and the rule that a configured value wins over a measured one. It must
not reserve anything or talk to the Master; the Agent registers the result.
"""

from __future__ import annotations

import os
import shutil

import psutil

from soda.config import CapacityConfig
from soda.model import Resources

DEFAULT_BANDWIDTH_MBIT = 1000
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


def memory_reserve_mib(total_mib: int) -> int:
    return max(MEMORY_RESERVE_MIN_MIB, int(total_mib * MEMORY_RESERVE_FRACTION))


def measure_capacity(configured: CapacityConfig, state_dir: str,
                     probe: HostProbe | None = None) -> Resources:
    """Capacity to register: configured fields as given, zero ones measured."""
    probe = probe or HostProbe()
    cpu = configured.cpu or float(probe.cpu_count())
    memory = configured.memory
    if not memory:
        total = probe.memory_total_mib()
        memory = max(0, total - memory_reserve_mib(total))
    disk = configured.disk or probe.disk_free_mib(state_dir)
    bandwidth = configured.bandwidth or DEFAULT_BANDWIDTH_MBIT
    return Resources(cpu=cpu, memory=memory, bandwidth=bandwidth, disk=disk)
