"""The layout of a local cluster of several nodes: names, addresses, parts."""

import pytest

from soda.devcluster.cluster import PARTS, layout_of, part_names
from soda.devcluster.fabric import Layout, host_name


def test_hosts_are_numbered_after_the_first_name():
    assert [host_name("dev-node-1", i) for i in (1, 2, 3)] == ["dev-node-1", "dev-node-2", "dev-node-3"]
    assert [host_name("edge", i) for i in (1, 2)] == ["edge-1", "edge-2"]


def test_each_host_has_its_namespace_address_link_and_cgroup_parent():
    layout = Layout.of("n-1", "sodax", "sodacg", 3, "10.231.0.0/24")
    assert layout.gateway == "10.231.0.1" and layout.prefix == 24
    assert [(h.index, h.name, h.netns, h.address, h.cgroup_parent) for h in layout.hosts] == [
        (1, "n-1", "sodax-1", "10.231.0.2", "sodacg-1"),
        (2, "n-2", "sodax-2", "10.231.0.3", "sodacg-2"),
        (3, "n-3", "sodax-3", "10.231.0.4", "sodacg-3")]
    # Link names fit the kernel's 15 characters and differ per host.
    links = [h.link for h in layout.hosts] + [layout.bridge]
    assert all(len(name) <= 15 for name in links) and len(set(links)) == 4
    assert layout.host(2).name == "n-2"


def test_a_fabric_too_small_is_refused():
    with pytest.raises(ValueError, match="room for 5 hosts, not 6"):
        Layout.of("n", "x", "x", 6, "10.0.0.0/29")


def test_parts_start_node_by_node_and_one_node_keeps_its_names():
    assert part_names(None) == PARTS
    config = {"node": "n-1", "netns": "x", "cgroup_parent": "c", "nodes": 2, "fabric_cidr": "10.9.0.0/24"}
    assert part_names(layout_of(config)) == ("master", "daemon-1", "agent-1", "daemon-2", "agent-2",
                                             "switch")
    assert layout_of({**config, "nodes": 1}) is None
