"""The UML guest's MAC follows its address: a new guest at a reused
address keeps the MAC its peers' neighbour entries already hold."""

import pytest

from soda.errors import InvalidSpec
from soda.hypervisors.uml import guest_mac


def test_mac_is_made_from_the_address_and_locally_administered():
    assert guest_mac("10.233.1.2") == "02:50:0a:e9:01:02"
    assert guest_mac("10.233.1.2") == guest_mac("10.233.1.2")
    assert guest_mac("10.233.1.3") != guest_mac("10.233.1.2")
    first = int(guest_mac("192.168.0.1").split(":")[0], 16)
    assert first & 0b10 and not first & 0b1          # locally administered, unicast


@pytest.mark.parametrize("address", ["", "fe80::1", "10.0.0", "10.0.0.256", "a.b.c.d"])
def test_a_non_ipv4_address_is_refused(address):
    with pytest.raises(InvalidSpec):
        guest_mac(address)
