import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soda import model
from soda.errors import NoCapacity
from soda.master.scheduler import place


def node(name, cpu=2.0, memory=4096, allocated=model.Resources(), hypervisors=("fake",), state="READY"):
    return model.Node(name=name, address="127.0.0.1",
                      capacity=model.Resources(cpu, memory, 1000, 100_000),
                      hypervisors=hypervisors, allocated=allocated, state=state)


def req(cpu=0.5, memory=64):
    return model.Resources(cpu, memory, 10, 100)


def test_spreads_a_service_over_nodes_first():
    nodes = [node("a"), node("b"), node("c")]
    got = place(nodes, [req()] * 4)
    counts = {}
    for p in got:
        counts[p.node] = counts.get(p.node, 0) + 1
    assert sorted(counts.values()) == [1, 1, 2]


def test_prefers_the_least_loaded_node():
    nodes = [node("a", allocated=model.Resources(1.5, 0, 0, 0)), node("b")]
    assert [p.node for p in place(nodes, [req()])] == ["b"]


def test_refusal_names_the_short_resource_and_places_nothing():
    nodes = [node("a"), node("b")]
    with pytest.raises(NoCapacity) as info:
        place(nodes, [req(), req(cpu=8)], labels=["web-0", "web-1"])
    assert info.value.resource == "cpu"
    assert "web-1 needs 8 cores" in str(info.value)


def test_memory_shortage():
    with pytest.raises(NoCapacity) as info:
        place([node("a", memory=128)], [req(memory=64)] * 3)
    assert info.value.resource == "memory"


def test_combined_shortage_is_explained():
    nodes = [node("a", cpu=4, memory=128), node("b", cpu=1, memory=4096)]
    with pytest.raises(NoCapacity) as info:
        place(nodes, [req(cpu=2, memory=1024)])
    assert info.value.resource == "combined"


def test_hypervisor_must_be_offered():
    from soda.errors import InvalidSpec
    with pytest.raises(InvalidSpec, match="hypervisor 'qemu'"):
        place([node("a")], [req()], hypervisor="qemu")


def test_any_hypervisor_is_the_nodes_first():
    assert place([node("a", hypervisors=("fake", "uml"))], [req()])[0].hypervisor == "fake"
    assert place([node("a", hypervisors=("uml", "fake"))], [req()])[0].hypervisor == "uml"


def test_a_hypervisor_no_node_offers_is_a_mistake_not_a_shortage():
    from soda.errors import InvalidSpec
    with pytest.raises(InvalidSpec, match=r"no physical node offers hypervisor 'xen' \(offered: fake\)"):
        place([node("a")], [req()], hypervisor="xen")
    with pytest.raises(NoCapacity):
        place([node("a", state="LOST")], [req()], hypervisor="fake")


def test_lost_nodes_are_not_used():
    with pytest.raises(NoCapacity, match="no ready physical nodes"):
        place([node("a", state="LOST")], [req()])


def test_large_requests_first_lets_a_tight_fit_succeed():
    # In request order a greedy spread would put the 0.5 on b and then find
    # no node with 2 cores; largest-first fits both.
    nodes = [node("a", cpu=2), node("b", cpu=1)]
    got = place(nodes, [req(cpu=0.5), req(cpu=2)])
    assert got[1].node == "a"


def test_is_pure():
    nodes = [node("a"), node("b")]
    assert place(nodes, [req()] * 3) == place(nodes, [req()] * 3)
    assert nodes[0].allocated == model.Resources()


def with_overhead(name, memory, overhead, hypervisor="uml"):
    return model.Node(name=name, address="127.0.0.1", capacity=model.Resources(64, memory, 100_000, 10**7),
                      hypervisors=(hypervisor,),
                      limits=(model.DriverCapabilities(hypervisor, 16, memory_overhead=overhead),))


def test_placement_counts_each_guests_hypervisor_overhead():
    # 1024 MiB: 16 guests of 32 MiB, each with 32 MiB for its UML process.
    n = with_overhead("a", 1024, 32)
    assert len(place([n], [model.Resources(0.1, 32, 1, 1)] * 16)) == 16
    with pytest.raises(NoCapacity) as info:
        place([n], [model.Resources(0.1, 32, 1, 1)] * 17, labels=[f"web-{i}" for i in range(17)])
    assert info.value.resource == "memory"
    assert "needs 32 MiB + 32 MiB for its hypervisor process on a" in str(info.value)


def test_placement_prefers_a_node_where_the_guest_costs_less():
    cheap, dear = with_overhead("cheap", 1000, 10), with_overhead("dear", 1000, 400)
    # Both have room; after placing, "cheap" is the less loaded one.
    assert [p.node for p in place([dear, cheap], [model.Resources(0.1, 300, 1, 1)])] == ["cheap"]
    # 700 MiB fits "cheap" only: "dear" would need 1100.
    got = place([dear, cheap], [model.Resources(0.1, 700, 1, 1)])
    assert [p.node for p in got] == ["cheap"]


# ---- spreading over zones ------------------------------------------------------
# The zone of a node is its "zone" label; nodes without one share one zone.
# These tests count zones from the labels they set, not through the scheduler.

def zoned(name, zone=None, cpu=64.0, memory=1 << 20, allocated=model.Resources(), hypervisors=("fake",),
          state="READY", overhead=0):
    return model.Node(name=name, address=f"192.0.2.{sum(map(ord, name)) % 250}",
                      capacity=model.Resources(cpu, memory, 100_000, 10**8), hypervisors=hypervisors,
                      allocated=allocated, state=state, labels={"zone": zone} if zone else {},
                      limits=tuple(model.DriverCapabilities(h, 0, memory_overhead=overhead)
                                   for h in hypervisors))


def per_zone(nodes, placements):
    zone = {n.name: n.labels.get("zone", "(none)") for n in nodes}
    counts = {}
    for p in placements:
        counts[zone[p.node]] = counts.get(zone[p.node], 0) + 1
    return counts


def per_node(placements):
    counts = {}
    for p in placements:
        counts[p.node] = counts.get(p.node, 0) + 1
    return counts


@pytest.mark.parametrize("layout", [
    {"a": 1, "b": 1, "c": 1},
    {"a": 1, "b": 2, "c": 3},          # more nodes in a zone do not draw more virtual nodes
    {"a": 4, "b": 1, "c": 2},
])
def test_three_zones_six_virtual_nodes_two_each(layout):
    nodes = [zoned(f"{zone}{i}", zone) for zone, count in layout.items() for i in range(count)]
    got = place(nodes, [req()] * 6)
    assert per_zone(nodes, got) == {"a": 2, "b": 2, "c": 2}
    # Within a zone, over its nodes: a zone of two nodes gives each one.
    for zone, count in layout.items():
        placed = [n for n, k in per_node(got).items() if n.startswith(zone)]
        assert len(placed) == min(count, 2)


def test_a_zone_without_room_is_skipped_not_a_refusal():
    full = model.Resources(64, 0, 0, 0)
    nodes = [zoned("a0", "a"), zoned("b0", "b"), zoned("c0", "c", allocated=full), zoned("c1", "c", allocated=full)]
    got = place(nodes, [req()] * 4)
    assert per_zone(nodes, got) == {"a": 2, "b": 2}


def test_a_zone_without_the_hypervisor_is_skipped():
    nodes = [zoned("a0", "a", hypervisors=("uml",)), zoned("b0", "b", hypervisors=("uml",)),
             zoned("c0", "c", hypervisors=("fake",))]
    got = place(nodes, [req()] * 4, hypervisor="uml")
    assert per_zone(nodes, got) == {"a": 2, "b": 2}
    assert {p.hypervisor for p in got} == {"uml"}


def test_nodes_without_a_zone_form_one_zone_together():
    nodes = [zoned("x"), zoned("y"), zoned("z", "a")]
    got = place(nodes, [req()] * 2)
    assert per_zone(nodes, got) == {"a": 1, "(none)": 1}
    got = place(nodes, [req()] * 4)
    assert per_zone(nodes, got) == {"a": 2, "(none)": 2}
    assert per_node(got) == {"x": 1, "y": 1, "z": 2}


def test_without_labels_placement_spreads_over_nodes_as_before():
    nodes = [zoned("x"), zoned("y"), zoned("z")]
    assert sorted(per_node(place(nodes, [req()] * 6)).values()) == [2, 2, 2]


def test_the_services_virtual_nodes_already_placed_count_for_their_zone():
    nodes = [zoned("a0", "a"), zoned("a1", "a"), zoned("b0", "b")]
    # Two already run in zone a (one on each node): the next goes to b
    # although b0 is no emptier than a node of zone a by node count alone.
    got = place(nodes, [req()], service_counts={"a0": 1, "a1": 1})
    assert [p.node for p in got] == ["b0"]
    # Full nodes of a zone still count: the service runs there.
    full = model.Resources(64, 0, 0, 0)
    nodes = [zoned("a0", "a", allocated=full), zoned("a1", "a"), zoned("b0", "b")]
    assert [p.node for p in place(nodes, [req()], service_counts={"a0": 1})] == ["b0"]


def test_virtual_nodes_on_a_lost_node_count_for_no_zone():
    nodes = [zoned("a0", "a", state="LOST"), zoned("a1", "a"), zoned("b0", "b")]
    # a0's two are being placed again: zone a runs none of the service, b one.
    got = place(nodes, [req()], service_counts={"a0": 2, "b0": 1})
    assert [p.node for p in got] == ["a1"]


def test_the_zone_rule_never_places_over_capacity_or_overhead():
    # Zone b has room for one guest with its overhead: the rest go to a.
    nodes = [zoned("a0", "a", memory=4096, overhead=32), zoned("b0", "b", memory=100, overhead=32)]
    got = place(nodes, [req(memory=64)] * 3)
    assert per_zone(nodes, got) == {"a": 2, "b": 1}
    with pytest.raises(NoCapacity):
        place([zoned("b0", "b", memory=100, overhead=32)], [req(memory=64)] * 2)


# ---- properties --------------------------------------------------------------------

ZONES = st.sampled_from([None, "a", "b", "c", "d"])


@st.composite
def clusters(draw, roomy):
    """Nodes in random zones; `roomy`: each could hold every request alone."""
    count = draw(st.integers(1, 8))
    nodes = []
    for i in range(count):
        if roomy:
            cpu, memory, used = 64.0, 1 << 20, model.Resources()
        else:
            cpu = draw(st.sampled_from([0.5, 1.0, 2.0, 4.0]))
            memory = draw(st.sampled_from([128, 256, 1024]))
            used = model.Resources(draw(st.sampled_from([0.0, 0.5, 1.0])), draw(st.sampled_from([0, 64])), 0, 0)
        nodes.append(zoned(f"n{i}", draw(ZONES), cpu=cpu, memory=memory, allocated=used,
                           overhead=draw(st.sampled_from([0, 16, 32]))))
    return nodes


REQUESTS = st.lists(st.builds(lambda cpu, memory: model.Resources(cpu, memory, 10, 100),
                              st.sampled_from([0.1, 0.25, 0.5, 1.0]), st.sampled_from([16, 32, 64, 128])),
                    min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(clusters(roomy=True), REQUESTS)
def test_where_everything_fits_zones_then_nodes_differ_by_at_most_one(nodes, requests):
    got = place(nodes, requests)
    zones = {n.labels.get("zone", "(none)") for n in nodes}
    counts = per_zone(nodes, got)
    spread = [counts.get(z, 0) for z in zones]
    assert max(spread) - min(spread) <= 1
    for zone in zones:
        members = [n.name for n in nodes if n.labels.get("zone", "(none)") == zone]
        on = [per_node(got).get(name, 0) for name in members]
        # Within a zone: evenly over its nodes, as far as the zone's share goes.
        assert max(on) - min(on) <= 1


@settings(max_examples=300, deadline=None)
@given(clusters(roomy=False), REQUESTS)
def test_never_places_where_it_does_not_fit(nodes, requests):
    try:
        got = place(nodes, requests)
    except NoCapacity:
        return
    by_name = {n.name: n for n in nodes}
    taken = {}
    for want, p in zip(requests, got):
        overhead = by_name[p.node].limits[0].memory_overhead
        cpu, memory = taken.get(p.node, (0.0, 0))
        taken[p.node] = (cpu + want.cpu, memory + want.memory + overhead)
    for name, (cpu, memory) in taken.items():
        node = by_name[name]
        assert node.allocated.cpu + cpu <= node.capacity.cpu + 1e-9
        assert node.allocated.memory + memory <= node.capacity.memory
