"""plan(): resources -> cpu.shares, CFS quota, memory limit, pids, HTB rate."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from soda.daemon.config import DaemonConfig, HeadroomConfig
from soda.daemon.plan import MIB, NO_QUOTA, burst_bytes, plan
from soda.errors import InvalidSpec
from soda.model import Resources

CFG = DaemonConfig()


def test_half_a_core_uncapped_uml():
    lim = plan(Resources(cpu=0.5, memory=64, bandwidth=10, disk=256), "uml", False, CFG)
    assert lim.cpu_shares == 512
    assert lim.cpu_quota_us == NO_QUOTA
    assert lim.cpu_period_us == 100_000
    assert lim.memory_bytes == (64 + 32) * MIB
    assert lim.pids_max == 512
    assert lim.rate_bit == 10_000_000
    assert lim.burst_bytes == 32 * 1024      # 10 ms at 10 Mbit is less than the floor


def test_cap_is_cores_times_period():
    lim = plan(Resources(cpu=1.5, memory=128), "qemu", True, CFG)
    assert lim.cpu_shares == 1536
    assert lim.cpu_quota_us == 150_000
    assert lim.memory_bytes == (128 + 160) * MIB


def test_fake_has_no_headroom_and_no_bandwidth_means_unshaped():
    lim = plan(Resources(cpu=1, memory=64), "fake", False, CFG)
    assert lim.memory_bytes == 64 * MIB
    assert lim.rate_bit == 0 and lim.burst_bytes == 0


def test_config_changes_headroom_pids_and_period():
    cfg = DaemonConfig(headroom=HeadroomConfig(uml=10), pids_max=64, cpu_period_us=50_000)
    lim = plan(Resources(cpu=0.25, memory=32), "uml", True, cfg)
    assert lim.memory_bytes == 42 * MIB
    assert lim.pids_max == 64
    assert (lim.cpu_period_us, lim.cpu_quota_us) == (50_000, 12_500)


def test_tiny_cap_respects_kernel_minimum_quota():
    lim = plan(Resources(cpu=0.01, memory=32), "fake", True, DaemonConfig(cpu_period_us=10_000))
    assert lim.cpu_quota_us == 1000
    assert lim.cpu_shares == 10


def test_burst_grows_with_rate():
    assert burst_bytes(1_000_000_000, CFG) == 1_250_000     # 10 ms at 1 Gbit/s
    assert burst_bytes(0, CFG) == 0


@pytest.mark.parametrize("res, hv", [
    (Resources(cpu=0, memory=64), "uml"),
    (Resources(cpu=-1, memory=64), "uml"),
    (Resources(cpu=float("nan"), memory=64), "uml"),
    (Resources(cpu=5000, memory=64), "uml"),
    (Resources(cpu=1, memory=0), "uml"),
    (Resources(cpu=1, memory=64, bandwidth=-5), "uml"),
    (Resources(cpu=1, memory=64), "xen"),
    (Resources(cpu=1, memory=64), ""),
])
def test_bad_requests_are_invalid(res, hv):
    with pytest.raises(InvalidSpec):
        plan(res, hv, False, CFG)


@given(cpu=st.floats(0.01, 256), memory=st.integers(16, 1 << 20), bw=st.integers(1, 400_000),
       hv=st.sampled_from(["uml", "qemu", "fake"]), cap=st.booleans())
def test_plan_properties(cpu, memory, bw, hv, cap):
    lim = plan(Resources(cpu=cpu, memory=memory, bandwidth=bw), hv, cap, CFG)
    assert lim.cpu_shares == round(1024 * cpu)
    assert lim.memory_bytes == (memory + getattr(CFG.headroom, hv)) * MIB
    assert lim.rate_bit == bw * 1_000_000
    assert lim.burst_bytes >= CFG.burst_min_bytes
    if cap:
        assert lim.cpu_quota_us == max(1000, round(cpu * 100_000))
    else:
        assert lim.cpu_quota_us == NO_QUOTA
