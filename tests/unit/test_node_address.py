"""The address a node registers: the default route's interface's, from a
fake /proc; loopback, with a warning, when there is none; and the Master
refusing an address another READY node holds."""

import logging
import os

import pytest

from soda import model
from soda.agent.address import (LOOPBACK, NodeAddress, find_node_address, ipv4_default_interfaces,
                                ipv6_default_interfaces, ipv6_global_address)
from soda.agent.main import build_config, parse_args, with_address
from soda.config import MasterConfig
from soda.errors import AlreadyExists, InvalidSpec
from soda.master.controller import Controller
from soda.master.images import ImageStore
from soda.master.notifier import Notifier
from soda.master.store import open_store
from tests.fakes import FakeClock

ROUTE_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"


def route(iface, dest="00000000", gateway="0102A8C0", flags="0003", metric=0, mask="00000000"):
    return f"{iface}\t{dest}\t{gateway}\t{flags}\t0\t0\t{metric}\t{mask}\t0\t0\t0\n"


def fake_proc(tmp_path, routes="", ipv6_routes="", if_inet6=""):
    net = tmp_path / "proc" / "net"
    net.mkdir(parents=True, exist_ok=True)
    (net / "route").write_text(ROUTE_HEADER + routes)
    if ipv6_routes is not None:
        (net / "ipv6_route").write_text(ipv6_routes)
    if if_inet6 is not None:
        (net / "if_inet6").write_text(if_inet6)
    return str(tmp_path / "proc")


ADDRESSES = {"eth0": "192.0.2.10", "eth1": "198.51.100.7", "wlan0": "203.0.113.5"}


# ---- the default route's interface ------------------------------------------------

def test_the_default_routes_interface_address_is_chosen(tmp_path):
    proc = fake_proc(tmp_path, route("docker0", dest="000011AC", gateway="00000000", flags="0001",
                                     mask="0000FFFF") + route("eth0") + route("eth0", dest="0002A8C0",
                                                                              gateway="00000000",
                                                                              flags="0001",
                                                                              mask="00FFFFFF"))
    assert find_node_address(proc, ADDRESSES.get) == NodeAddress("192.0.2.10", "eth0")


def test_the_lowest_metric_default_route_wins(tmp_path):
    proc = fake_proc(tmp_path, route("wlan0", metric=600) + route("eth1", metric=100)
                     + route("eth0", metric=100))
    # eth1 and eth0 tie at 100: the table's order decides (the kernel's own).
    assert find_node_address(proc, ADDRESSES.get) == NodeAddress("198.51.100.7", "eth1")
    assert ipv4_default_interfaces(ROUTE_HEADER + route("wlan0", metric=600) + route("eth1", metric=100)) \
        == ["eth1", "wlan0"]


def test_down_and_reject_routes_and_interfaces_without_an_address_are_passed_over(tmp_path):
    proc = fake_proc(tmp_path, route("eth0", flags="0002") + route("eth1", flags="0203")
                     + route("ppp0", metric=5) + route("wlan0", metric=10))
    assert find_node_address(proc, ADDRESSES.get) == NodeAddress("203.0.113.5", "wlan0")


def test_lines_the_parser_does_not_understand_are_no_default_route():
    table = ROUTE_HEADER + "garbage\n" + "eth0\t00000000\n" + route("eth1", metric="x") + route("eth0")
    assert ipv4_default_interfaces(table) == ["eth0"]


IPV6_DEFAULT = ("00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
                "fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth0\n")
IPV6_LO_REJECT = ("00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
                  "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n")
IF_INET6 = ("fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n"        # link scope
            "fd000000000000000000000000000009 04 40 00 c0     eth0\n"        # tentative
            "fd000000000000000000000000000002 04 40 00 80     eth0\n"
            "00000000000000000000000000000001 01 80 10 80       lo\n")


def test_an_ipv6_only_host_registers_its_global_ipv6_address(tmp_path):
    proc = fake_proc(tmp_path, "", IPV6_LO_REJECT + IPV6_DEFAULT, IF_INET6)
    assert find_node_address(proc, ADDRESSES.get) == NodeAddress("fd00::2", "eth0")
    assert ipv6_default_interfaces(IPV6_LO_REJECT) == []
    assert ipv6_global_address(IF_INET6, "lo") is None


def test_ipv4_comes_before_ipv6(tmp_path):
    proc = fake_proc(tmp_path, route("eth0"), IPV6_DEFAULT, IF_INET6)
    assert find_node_address(proc, ADDRESSES.get).address == "192.0.2.10"


@pytest.mark.parametrize("routes", ["", route("eth0", dest="0002A8C0", flags="0001", mask="00FFFFFF")])
def test_without_a_default_route_it_is_loopback(tmp_path, routes):
    proc = fake_proc(tmp_path, routes, ipv6_routes=None, if_inet6=None)   # no IPv6 in this kernel
    assert find_node_address(proc, ADDRESSES.get) == NodeAddress(LOOPBACK, "")
    assert find_node_address(str(tmp_path / "no-proc"), ADDRESSES.get) == NodeAddress(LOOPBACK, "")


def test_this_hosts_own_table_gives_an_address_without_a_subprocess(monkeypatch):
    # Whatever this machine's routes are, the answer comes from /proc and
    # an ioctl: the Agent may not fork once it talks gRPC.
    def no_fork(*args, **kwargs):
        raise AssertionError("looked up the node address with a subprocess")
    monkeypatch.setattr(os, "fork", no_fork)
    monkeypatch.setattr(os, "posix_spawn", no_fork)
    found = find_node_address()
    assert found.address and (found.interface or found.address == LOOPBACK)


# ---- the Agent's choice --------------------------------------------------------------

def test_a_configured_address_is_kept_and_nothing_is_looked_up():
    config = build_config(parse_args(["--address", "10.1.2.3"]))

    def looked_up():
        raise AssertionError("the default route was looked up although --address was given")
    assert with_address(config, looked_up).address == "10.1.2.3"


def test_the_default_is_found_at_start_and_logged(caplog):
    config = build_config(parse_args([]))
    assert config.address == ""
    with caplog.at_level(logging.INFO, logger="soda.agent"):
        assert with_address(config, lambda: NodeAddress("192.0.2.10", "eth0")).address == "192.0.2.10"
    assert "registering address 192.0.2.10 (eth0" in caplog.text


def test_loopback_warns_that_the_cluster_must_stay_on_one_host(caplog):
    config = build_config(parse_args([]))
    with caplog.at_level(logging.WARNING, logger="soda.agent"):
        assert with_address(config, lambda: NodeAddress(LOOPBACK)).address == LOOPBACK
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "no interface carries a default route" in record.getMessage()
    assert "the whole cluster must run on this one host" in record.getMessage()


# ---- the Master: one READY node per address ------------------------------------------

CAP = model.Resources(2, 4096, 1000, 100_000)


@pytest.fixture
def controller(tmp_path):
    clock = FakeClock()
    store = open_store(str(tmp_path / "m"))
    ctl = Controller(store, ImageStore(str(tmp_path / "m" / "images"), store), Notifier(),
                     MasterConfig(node_lost_seconds=10), clock=clock, monotonic=clock)
    yield ctl, clock
    store.close()


def addresses(ctl):
    return {n.name: (n.address, n.state) for n in ctl.store.list_nodes()}


def test_an_address_another_ready_node_holds_is_refused(controller):
    ctl, _ = controller
    ctl.register_node("a", "192.0.2.10", CAP, ["fake"])
    with pytest.raises(AlreadyExists) as info:
        ctl.register_node("b", "192.0.2.10", CAP, ["fake"])
    message = str(info.value)
    assert "node b: address 192.0.2.10 is already held by node a, which is READY" in message
    assert "--address" in message and "\n" not in message
    assert addresses(ctl) == {"a": ("192.0.2.10", "READY")}        # b was not written
    ctl.register_node("b", "192.0.2.11", CAP, ["fake"])
    assert addresses(ctl)["b"] == ("192.0.2.11", "READY")


def test_the_same_node_registers_again_at_its_address_or_a_new_one(controller):
    ctl, _ = controller
    first = ctl.register_node("a", "192.0.2.10", CAP, ["fake"], labels={"zone": "a"})
    again = ctl.register_node("a", "192.0.2.10", CAP, ["fake"], labels={"zone": "b"})
    assert again.subnet == first.subnet and again.labels == {"zone": "b"}
    ctl.register_node("a", "192.0.2.12", CAP, ["fake"])
    ctl.register_node("b", "192.0.2.10", CAP, ["fake"])             # a left it
    assert addresses(ctl) == {"a": ("192.0.2.12", "READY"), "b": ("192.0.2.10", "READY")}


def test_a_lost_nodes_address_is_free_and_it_cannot_come_back_onto_a_taken_one(controller):
    ctl, clock = controller
    ctl.register_node("old", "192.0.2.10", CAP, ["fake"])
    clock.now += 11
    assert ctl.check_membership() == ["old"]
    ctl.register_node("new", "192.0.2.10", CAP, ["fake"])            # the machine came back renamed
    assert addresses(ctl) == {"new": ("192.0.2.10", "READY"), "old": ("192.0.2.10", "LOST")}
    # "old" heartbeats again: READY would make two nodes at one address.
    with pytest.raises(AlreadyExists, match="address 192.0.2.10 is already held by node new"):
        ctl.report_status("old", [], complete=True)
    assert addresses(ctl)["old"] == ("192.0.2.10", "LOST")


def test_a_node_must_register_an_address(controller):
    ctl, _ = controller
    with pytest.raises(InvalidSpec, match="node a: an address is required"):
        ctl.register_node("a", "", CAP, ["fake"])


def test_bad_labels_are_refused_at_registration_naming_the_node(controller):
    ctl, _ = controller
    with pytest.raises(InvalidSpec, match="node a: invalid label key 'Zone'"):
        ctl.register_node("a", "192.0.2.10", CAP, ["fake"], labels={"Zone": "a"})
    assert addresses(ctl) == {}
