import pytest

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
