"""The Master's IPAM: node subnets, each node's gateway and uplink, guest
addresses, and that the Master hands a node all three."""

import ipaddress

import pytest

from soda import model
from soda.errors import NoCapacity
from soda.master import ipam
from tests.support import master_client


def test_a_node_gets_the_first_free_subnet_with_its_gateway_and_uplink():
    got = ipam.allocate_subnet("10.9.0.0/16", 24, ["10.9.0.0/24", "10.9.2.0/24"])
    assert got == ipam.NodeAddresses("10.9.1.0/24", "10.9.1.1", "10.9.1.254")
    with pytest.raises(NoCapacity, match="no free /24 subnet left in 10.9.0.0/23") as info:
        ipam.allocate_subnet("10.9.0.0/23", 24, ["10.9.0.0/24", "10.9.1.0/24"])
    assert info.value.resource == "subnets"


def test_guests_get_neither_the_gateway_nor_the_uplink():
    subnet = "10.9.1.0/29"                         # hosts .1 to .6
    given = []
    for _ in range(4):
        given.append(ipam.allocate_guest(subnet, given))
    assert given == ["10.9.1.2", "10.9.1.3", "10.9.1.4", "10.9.1.5"]
    with pytest.raises(NoCapacity, match="no free guest address left in 10.9.1.0/29"):
        ipam.allocate_guest(subnet, given)
    assert ipam.allocate_guest(subnet, given[1:]) == "10.9.1.2"      # a freed address is reused


def test_the_master_hands_a_registering_node_all_its_addresses(master):
    client = master_client(master[1])
    try:
        node = client.register_node("n0", "127.0.0.1", model.Resources(2, 4096, 1000, 10000), ["fake"])
        expect = ipam.node_addresses(node.subnet)
        assert (node.gateway, node.uplink) == (expect.gateway, expect.uplink)
        [listed] = client.list_nodes()
        assert listed.uplink == expect.uplink
    finally:
        client.close()


@pytest.mark.parametrize("subnet", ["10.0.3.0/24", "10.0.0.0/16", "10.1.0.0/29", "10.1.0.0/30",
                                    "10.2.0.0/31", "fd00::/120"])
def test_addresses_agree_with_the_hosts_of_the_subnet(subnet):
    # Worked out by arithmetic; the reference is ipaddress's own list.
    hosts = [str(h) for h in ipaddress.ip_network(subnet).hosts()]
    addresses = ipam.node_addresses(subnet)
    assert (addresses.gateway, addresses.uplink) == (hosts[0], hosts[-1])
    guests = hosts[1:-1]
    taken = guests[:3] + guests[4:5]
    free = [h for h in guests if h not in taken]
    if free:
        assert ipam.allocate_guest(subnet, taken) == free[0]
    else:
        with pytest.raises(NoCapacity):
            ipam.allocate_guest(subnet, taken)
