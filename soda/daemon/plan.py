"""The pure rule from a virtual node's resources to concrete kernel values.

`plan(resources, cpu_cap, config, memory_overhead)` returns the cpu.shares,
CFS quota, memory limit, pids limit and HTB rate that fence one virtual node.
It checks the request again (the Master already did; the node must not trust
it blindly) and does no I/O: cgroups.py and tc.py write what it decides.
"""

from __future__ import annotations

import math


from soda import model
from soda.daemon.config import DaemonConfig
from soda.errors import InvalidSpec
from soda.model.fence import Limits

MIB = 1 << 20
# cpu.shares per core: the kernel's default weight of one task group.
SHARES_PER_CORE = 1024
# The kernel's bounds for cpu.shares (MIN_SHARES, MAX_SHARES) and the
# smallest CFS quota it accepts (1 ms).
MIN_SHARES = 2
MAX_SHARES = 1 << 18
MIN_QUOTA_US = 1000
NO_QUOTA = -1


# The most a hypervisor process may claim above its guest's memory.
MAX_MEMORY_OVERHEAD_MIB = 4096


def check_memory_overhead(memory_overhead: int) -> int:
    """MiB the memory limit adds above the guest's memory for the hypervisor
    process itself, as the Agent's driver declared it."""
    if isinstance(memory_overhead, bool) or not isinstance(memory_overhead, int) \
            or not 0 <= memory_overhead <= MAX_MEMORY_OVERHEAD_MIB:
        raise InvalidSpec(f"memory overhead must be between 0 and {MAX_MEMORY_OVERHEAD_MIB} MiB, "
                          f"got {memory_overhead!r}")
    return memory_overhead


def _check(resources: model.Resources) -> None:
    lo, hi = model.RESOURCE_BOUNDS["cpu"]
    if not isinstance(resources.cpu, (int, float)) or not math.isfinite(resources.cpu) \
            or not lo <= resources.cpu <= hi:
        raise InvalidSpec(f"cpu must be between {lo} and {hi} cores, got {resources.cpu}")
    lo, hi = model.RESOURCE_BOUNDS["memory"]
    if not lo <= resources.memory <= hi:
        raise InvalidSpec(f"memory must be between {lo} and {hi} MiB, got {resources.memory}")
    lo, hi = model.RESOURCE_BOUNDS["bandwidth"]
    if resources.bandwidth != 0 and not lo <= resources.bandwidth <= hi:
        raise InvalidSpec(f"bandwidth must be 0 (not shaped) or between {lo} and {hi} Mbit/s, "
                          f"got {resources.bandwidth}")


def burst_bytes(rate_bit: int, cfg: DaemonConfig) -> int:
    """Enough bytes for `burst_ms` at full rate: HTB refills tokens on timer
    ticks, and a bucket smaller than one tick's worth caps the rate below
    what was asked."""
    if rate_bit <= 0:
        return 0
    return max(cfg.burst_min_bytes, int(rate_bit / 8 * cfg.burst_ms / 1000))


def plan(resources: model.Resources, cpu_cap: bool, cfg: DaemonConfig,
         memory_overhead: int = 0) -> Limits:
    _check(resources)
    extra = check_memory_overhead(memory_overhead)
    shares = min(MAX_SHARES, max(MIN_SHARES, round(SHARES_PER_CORE * resources.cpu)))
    quota = max(MIN_QUOTA_US, round(resources.cpu * cfg.cpu_period_us)) if cpu_cap else NO_QUOTA
    rate = resources.bandwidth * 1_000_000
    return Limits(
        cpu_shares=shares,
        cpu_quota_us=quota,
        cpu_period_us=cfg.cpu_period_us,
        memory_bytes=(resources.memory + extra) * MIB,
        pids_max=cfg.pids_max,
        rate_bit=rate,
        burst_bytes=burst_bytes(rate, cfg),
    )
