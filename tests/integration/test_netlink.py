"""soda.netlink.NetlinkThread against the real kernel, in a namespace this
test makes: requests the kernel acknowledges after pyroute2 has taken their
answer leave nothing behind (pyroute2 would keep every such ACK, and the
heap it pins, for the life of the Agent or Daemon: bench/chaos.py's soak
measures that)."""

import os

import pytest
from pyroute2 import IPRoute

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("entering a network namespace needs root", allow_module_level=True)

from soda.netlink import NetlinkThread, unclaimed  # noqa: E402

REQUESTS = 200


def test_this_pyroute2_keeps_acknowledgements_nobody_claims():
    # What soda.netlink's drop is for.
    with IPRoute() as ipr:
        assert unclaimed(ipr) is not None, "pyroute2's unclaimed-message queue moved: see soda.netlink"
        for _ in range(REQUESTS):
            ipr.link_lookup(ifname="lo")
        if unclaimed(ipr).qsize() < REQUESTS - 1:
            pytest.skip("this pyroute2 no longer keeps them: the drop in soda.netlink may go")


def test_the_netlink_thread_keeps_none(netns):
    nl = NetlinkThread(netns)
    try:
        for _ in range(REQUESTS):
            assert nl.run(lambda ipr: ipr.link_lookup(ifname="lo"))
            assert nl.run(lambda ipr: ipr.link("get", index=1))
        assert nl.run(lambda ipr: unclaimed(ipr).qsize()) == 0
    finally:
        nl.close()
