"""plan(): resources -> cpu.shares, CFS quota, memory limit, pids, HTB rate.

Checked as properties a fence must have (shares in the ratio of the cores
asked, limits that only grow with the request, the kernel's bounds, the
VMM's declared overhead, a cap that changes the quota and nothing else), plus the
few values users read in the README, not by repeating plan()'s formulas."""

import dataclasses
import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from soda.daemon.config import DaemonConfig
from soda.daemon.plan import MIB, NO_QUOTA, burst_bytes, plan
from soda.errors import InvalidSpec
from soda.model.spec import RESOURCE_BOUNDS, Resources

CFG = DaemonConfig()
# What the kernel accepts (cpu.shares MIN/MAX_SHARES, the 1 ms CFS minimum):
# written here, not imported, so a wrong bound in plan.py shows.
KERNEL_MIN_SHARES, KERNEL_MAX_SHARES = 2, 1 << 18
KERNEL_MIN_QUOTA_US = 1000

cores = st.floats(*RESOURCE_BOUNDS["cpu"], allow_nan=False, allow_infinity=False)
# Below 256 cores the shares are not clamped at the kernel's maximum.
unclamped_cores = st.floats(RESOURCE_BOUNDS["cpu"][0], 256.0)
mebibytes = st.integers(*RESOURCE_BOUNDS["memory"])
megabits = st.integers(*RESOURCE_BOUNDS["bandwidth"])
overheads = st.integers(0, 4096)
periods = st.integers(1000, 1_000_000)


def limits(cpu=1.0, memory=64, bandwidth=0, overhead=32, cap=False, cfg=CFG):
    return plan(Resources(cpu=cpu, memory=memory, bandwidth=bandwidth), cap, cfg, overhead)


# ---- what users read ---------------------------------------------------------

def test_the_papers_half_and_whole_core_get_shares_1_to_2():
    half, whole = limits(cpu=0.5).cpu_shares, limits(cpu=1.0).cpu_shares
    assert whole == 2 * half
    # One core is the kernel's default weight, so a guest of one core
    # competes evenly with any unfenced task group.
    assert whole == 1024


def test_unshaped_means_no_rate_and_no_bucket():
    lim = limits(bandwidth=0)
    assert lim.rate_bit == 0 and lim.burst_bytes == 0


def test_bandwidth_is_in_si_megabits():
    assert limits(bandwidth=10).rate_bit == 10_000_000      # tc's "10mbit", not 10 MiB


# ---- CPU ---------------------------------------------------------------------

@given(cpu=unclamped_cores, k=st.integers(2, 8))
def test_shares_follow_the_ratio_of_cores(cpu, k):
    assume(cpu * k <= 256)
    one, many = limits(cpu=cpu).cpu_shares, limits(cpu=cpu * k).cpu_shares
    # Each side rounds to a whole share at most: k times the cores is k times
    # the shares, give or take that rounding.
    assert abs(many - k * one) <= (k + 1) / 2 + 1e-9, (cpu, k, one, many)


@given(a=unclamped_cores, b=unclamped_cores)
def test_two_guests_split_a_core_as_their_cores(a, b):
    sa, sb = limits(cpu=a).cpu_shares, limits(cpu=b).cpu_shares
    # A share of a core is off by at most half a share's worth on each side.
    assert abs(sa / (sa + sb) - a / (a + b)) <= 1 / (sa + sb) + 1e-9, (a, b, sa, sb)


@given(a=cores, b=cores, cap=st.booleans())
def test_more_cores_never_get_fewer_shares_or_less_quota(a, b, cap):
    lo, hi = sorted((a, b))
    small, big = limits(cpu=lo, cap=cap), limits(cpu=hi, cap=cap)
    assert small.cpu_shares <= big.cpu_shares
    assert small.cpu_quota_us <= big.cpu_quota_us


@given(cpu=cores, cap=st.booleans(), overhead=overheads)
def test_shares_stay_within_the_kernels_bounds(cpu, cap, overhead):
    lim = limits(cpu=cpu, cap=cap, overhead=overhead)
    assert KERNEL_MIN_SHARES <= lim.cpu_shares <= KERNEL_MAX_SHARES


def test_shares_saturate_at_the_kernels_maximum():
    assert limits(cpu=RESOURCE_BOUNDS["cpu"][1]).cpu_shares == KERNEL_MAX_SHARES
    assert limits(cpu=300).cpu_shares == limits(cpu=1000).cpu_shares == KERNEL_MAX_SHARES


@given(cpu=cores, period=periods)
def test_a_cap_grants_the_cores_asked_per_period(cpu, period):
    lim = limits(cpu=cpu, cap=True, cfg=DaemonConfig(cpu_period_us=period))
    assert lim.cpu_period_us == period
    assert lim.cpu_quota_us >= KERNEL_MIN_QUOTA_US
    if lim.cpu_quota_us > KERNEL_MIN_QUOTA_US:
        # Quota / period is the fraction of one core: the cores asked, to a microsecond.
        assert abs(lim.cpu_quota_us - cpu * period) <= 0.5 + 1e-6, (cpu, period, lim)
    else:
        assert cpu * period <= KERNEL_MIN_QUOTA_US + 0.5


def test_a_tiny_cap_is_raised_to_the_kernels_minimum_quota():
    lim = limits(cpu=0.01, cap=True, cfg=DaemonConfig(cpu_period_us=10_000))
    assert lim.cpu_quota_us == KERNEL_MIN_QUOTA_US        # 0.01 x 10 ms = 100 us is refused by the kernel


@given(cpu=cores, memory=mebibytes, bw=st.integers(0, 400_000), overhead=overheads)
def test_the_cap_changes_the_quota_and_nothing_else(cpu, memory, bw, overhead):
    free = limits(cpu=cpu, memory=memory, bandwidth=bw, overhead=overhead, cap=False)
    capped = limits(cpu=cpu, memory=memory, bandwidth=bw, overhead=overhead, cap=True)
    assert free.cpu_quota_us == NO_QUOTA
    assert capped.cpu_quota_us > 0
    assert dataclasses.replace(capped, cpu_quota_us=NO_QUOTA) == free


# ---- memory --------------------------------------------------------------------

@given(memory=mebibytes, overhead=st.integers(1, 4096))
def test_a_vmm_gets_room_above_its_guests_memory(memory, overhead):
    assert limits(memory=memory, overhead=overhead).memory_bytes > memory * MIB


@given(memory=mebibytes)
def test_a_guest_without_overhead_is_limited_to_its_memory_exactly(memory):
    assert limits(memory=memory, overhead=0).memory_bytes == memory * MIB


@given(a=mebibytes, b=mebibytes, overhead=overheads)
def test_each_extra_mib_of_guest_raises_the_limit_by_one_mib(a, b, overhead):
    # The overhead is per VMM, not per MiB: the limit grows exactly with the guest.
    la, lb = limits(memory=a, overhead=overhead).memory_bytes, limits(memory=b, overhead=overhead).memory_bytes
    assert lb - la == (b - a) * MIB


@given(memory=mebibytes, a=overheads, b=overheads)
def test_the_declared_overhead_is_what_the_limit_adds(memory, a, b):
    la, lb = limits(memory=memory, overhead=a).memory_bytes, limits(memory=memory, overhead=b).memory_bytes
    assert lb - la == (b - a) * MIB


def test_pids_limit_comes_from_the_config():
    assert limits(cfg=DaemonConfig(pids_max=64)).pids_max == 64
    assert limits().pids_max > 0


# ---- bandwidth -----------------------------------------------------------------

@given(a=megabits, b=megabits)
def test_more_bandwidth_never_gets_a_lower_rate_or_a_smaller_bucket(a, b):
    lo, hi = sorted((a, b))
    small, big = limits(bandwidth=lo), limits(bandwidth=hi)
    assert small.rate_bit <= big.rate_bit
    assert small.burst_bytes <= big.burst_bytes
    assert (small.rate_bit < big.rate_bit) == (lo < hi)


@given(a=megabits, b=megabits)
def test_rates_add_up(a, b):
    assume(a + b <= RESOURCE_BOUNDS["bandwidth"][1])
    assert limits(bandwidth=a + b).rate_bit == limits(bandwidth=a).rate_bit + limits(bandwidth=b).rate_bit


@given(bw=megabits, burst_ms=st.floats(0.1, 100), floor=st.integers(1, 1 << 20))
def test_the_bucket_holds_a_tick_at_full_rate_and_never_less_than_the_floor(bw, burst_ms, floor):
    cfg = DaemonConfig(burst_ms=burst_ms, burst_min_bytes=floor)
    lim = limits(bandwidth=bw, cfg=cfg)
    assert lim.burst_bytes >= floor
    # A bucket smaller than burst_ms at the rate would cap the rate below what was asked.
    assert lim.burst_bytes * 8 >= lim.rate_bit * burst_ms / 1000 - 8
    # ... and not much more: a huge bucket lets bursts through unshaped.
    assert lim.burst_bytes <= max(floor, math.ceil(lim.rate_bit * burst_ms / 1000 / 8))


def test_burst_of_nothing_is_nothing():
    assert burst_bytes(0, CFG) == 0


# ---- refused -------------------------------------------------------------------

@pytest.mark.parametrize("res, overhead", [
    (Resources(cpu=0, memory=64), 32),
    (Resources(cpu=-1, memory=64), 32),
    (Resources(cpu=float("nan"), memory=64), 32),
    (Resources(cpu=float("inf"), memory=64), 32),
    (Resources(cpu=5000, memory=64), 32),
    (Resources(cpu=1, memory=0), 32),
    (Resources(cpu=1, memory=8), 32),
    (Resources(cpu=1, memory=64, bandwidth=-5), 32),
    (Resources(cpu=1, memory=64, bandwidth=10**9), 32),
    (Resources(cpu=1, memory=64), -1),
    (Resources(cpu=1, memory=64), 4097),
])
def test_bad_requests_are_invalid(res, overhead):
    with pytest.raises(InvalidSpec):
        plan(res, False, CFG, overhead)
