"""The pure parts of tc.py: IFB names, TAP names, netlink errno mapping,
reading rates and redirects out of netlink messages. No kernel needed."""

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.exceptions import NetlinkError

from soda import errors
from soda.daemon import tc


@given(st.text(min_size=1, max_size=63), st.text(min_size=1, max_size=40))
def test_ifb_name_fits_ifnamsiz_and_is_stable(vnode, scope):
    name = tc.ifb_name(scope, vnode)
    assert len(name) <= tc.IFNAMSIZ
    assert name.startswith("ifb-")
    assert name == tc.ifb_name(scope, vnode)
    assert tc.check_link_name(name) == name


def test_ifb_name_depends_on_scope_and_vnode():
    names = {tc.ifb_name("soda", "web-0"), tc.ifb_name("soda", "web-1"),
             tc.ifb_name("soda-test-1", "web-0")}
    assert len(names) == 3


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "a b", "a:b", ".", ".."])
def test_bad_link_names(name):
    with pytest.raises(errors.InvalidSpec):
        tc.check_link_name(name)


@pytest.mark.parametrize("code, cls", [
    (errno.ENODEV, errors.NotFound), (errno.ENOENT, errors.NotFound),
    (errno.EINVAL, errors.InvalidSpec), (errno.EEXIST, errors.AlreadyExists),
    (errno.EPERM, errors.WrongState), (errno.EOPNOTSUPP, errors.WrongState),
    (errno.ENOBUFS, errors.TemporaryError), (errno.EIO, errors.SodaError),
])
def test_netlink_errors_map_by_errno(code, cls):
    exc = tc.netlink_error(NetlinkError(code, "whatever the kernel says"), "cannot add HTB")
    assert type(exc) is cls
    assert exc.message.startswith("cannot add HTB")


class Msg(dict):
    """Just enough of a pyroute2 nla message: get_attr and the 'attrs' list."""

    def __init__(self, attrs=(), **fields):
        super().__init__(fields, attrs=list(attrs))

    def get_attr(self, name):
        for k, v in self["attrs"]:
            if k == name:
                return v
        return None


def test_htb_rate_reads_rate_and_burst():
    rate_bytes = 1_250_000                      # 10 Mbit/s
    buffer = round(32768 / rate_bytes * tc.TIME_UNITS_PER_SEC * tc.tick_in_usec)
    cls = Msg([("TCA_OPTIONS", Msg([("TCA_HTB_PARMS", {"rate": rate_bytes, "buffer": buffer})]))])
    rate, burst = tc._htb_rate(cls)
    assert rate == 10_000_000
    assert abs(burst - 32768) <= 2


def test_htb_rate64_wins_over_the_32_bit_field():
    opts = Msg([("TCA_HTB_PARMS", {"rate": 2**32 - 1, "buffer": 0}), ("TCA_HTB_RATE64", 5 * 10**9)])
    assert tc._htb_rate(Msg([("TCA_OPTIONS", opts)]))[0] == 40 * 10**9


def test_mirred_targets():
    mirred = Msg([("TCA_ACT_KIND", "mirred"),
                  ("TCA_ACT_OPTIONS", Msg([("TCA_MIRRED_PARMS", {"ifindex": 7, "eaction": 1})]))])
    f_root = Msg([("TCA_KIND", "u32")])
    f_hash = Msg([("TCA_KIND", "u32"), ("TCA_OPTIONS", Msg([("TCA_U32_DIVISOR", 1)]))])
    f_rule = Msg([("TCA_KIND", "u32"), ("TCA_OPTIONS", Msg([("TCA_U32_ACT", Msg([("TCA_ACT_PRIO_1", mirred)]))]))])
    assert tc._mirred_targets([f_root, f_hash, f_rule]) == [7]
    assert tc._mirred_targets([]) == []


def test_class_stats():
    cls = Msg([("TCA_STATS2", Msg([("TCA_STATS_BASIC", {"bytes": 1234, "packets": 3}),
                                   ("TCA_STATS_QUEUE", {"drops": 5})]))])
    assert tc._class_stats(cls) == (1234, 5)
    assert tc._class_stats(None) == (0, 0)
