"""Balancing policies (pure): smooth weighted round robin, weighted least-connections."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soda import model
from soda.errors import InvalidSpec
from soda.switch.balancer import POLICIES, Balancer, scaled_weight


def ep(name, weight=1.0, ready=True, address="127.0.0.1", port=8000):
    return model.Endpoint(vnode=name, address=address, port=port, weight=weight, ready=ready)


def picks(balancer, n, **kw):
    return [balancer.pick(**kw).vnode for _ in range(n)]


def test_registry_has_every_policy_the_model_allows():
    assert set(POLICIES) == set(model.POLICIES)
    assert Balancer().policy == model.DEFAULT_POLICY
    with pytest.raises(InvalidSpec, match="unknown switch policy"):
        Balancer("random")


def test_weights_one_to_two_give_exactly_one_to_two():
    b = Balancer("weighted-round-robin", [ep("a", 0.5), ep("b", 1.0)])
    assert Counter(picks(b, 300)) == {"a": 100, "b": 200}


def test_smooth_round_robin_interleaves():
    b = Balancer("weighted-round-robin", [ep("a", 1.0), ep("b", 2.0)])
    seq = picks(b, 30)
    # Every window of three holds exactly one "a": never a burst of b's.
    for i in range(len(seq) - 2):
        assert seq[i:i + 3].count("a") == 1, seq
    assert "aa" not in "".join(seq) and "bbb" not in "".join(seq)


def test_smooth_round_robin_spreads_a_heavy_node():
    # 5:1:1 -> nginx's classic sequence, the heavy node never runs 5 in a row.
    b = Balancer("weighted-round-robin", [ep("a", 5), ep("b", 1), ep("c", 1)])
    assert "".join(picks(b, 7)) == "aabacaa"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=2000), min_size=1, max_size=8),
       st.integers(min_value=1, max_value=3))
def test_every_cycle_is_exact_and_prefixes_stay_close(milli_weights, cycles):
    endpoints = [ep(f"n{i}", w / 1000) for i, w in enumerate(milli_weights)]
    b = Balancer("weighted-round-robin", endpoints)
    total = sum(milli_weights)
    counts = Counter()
    for n in range(1, total * cycles + 1):
        counts[b.pick().vnode] += 1
        # Smooth: no node ever runs ahead of or behind its share by a whole cycle's worth.
        for i, w in enumerate(milli_weights):
            assert abs(counts[f"n{i}"] - n * w / total) < len(milli_weights)
    assert counts == {f"n{i}": w * cycles for i, w in enumerate(milli_weights)}


def test_float_weights_are_exact():
    # 0.1 + 0.2 is not 0.3 in floats; milli-units make it exact.
    b = Balancer("weighted-round-robin", [ep("a", 0.1), ep("b", 0.2)])
    assert Counter(picks(b, 3000)) == {"a": 1000, "b": 2000}
    assert scaled_weight(0.0001) == 1 and scaled_weight(0) == 0 and scaled_weight(float("nan")) == 0


def test_zero_endpoints_give_none():
    assert Balancer().pick() is None
    assert Balancer(endpoints=[ep("a", ready=False)]).pick() is None
    assert Balancer("weighted-least-connections").pick() is None


def test_only_ready_endpoints_with_weight_are_routed():
    b = Balancer(endpoints=[ep("a"), ep("b", ready=False), ep("c", weight=0), ep("d", weight=-1)])
    assert [e.vnode for e in b.endpoints] == ["a"]
    assert set(picks(b, 10)) == {"a"}


def test_update_keeps_state_of_remaining_endpoints():
    b = Balancer("weighted-round-robin", [ep("a", 1), ep("b", 2)])
    first = picks(b, 2)
    # Same set again: the rotation carries on as if nothing happened.
    b.update([ep("b", 2), ep("a", 1)])
    assert first + picks(b, 4) == picks(Balancer("weighted-round-robin", [ep("a", 1), ep("b", 2)]), 6)


def test_update_adds_removes_and_reweights():
    b = Balancer("weighted-round-robin", [ep("a", 1), ep("b", 2)])
    picks(b, 3)                                    # one full cycle: counters back to 0
    b.update([ep("a", 3), ep("b", 1), ep("c", 1, ready=False)])
    assert Counter(picks(b, 40)) == {"a": 30, "b": 10}
    b.update([ep("a", 3), ep("c", 1)])             # b leaves, c becomes ready
    assert Counter(picks(b, 40)) == {"a": 30, "c": 10}
    b.update([])
    assert b.pick() is None


def test_exclude_skips_tried_endpoints():
    b = Balancer("weighted-round-robin", [ep("a"), ep("b")])
    assert {b.pick(exclude={"a"}).vnode for _ in range(4)} == {"b"}
    assert b.pick(exclude={"a", "b"}) is None


def test_failed_endpoint_is_avoided_until_its_time_unless_it_is_all_there_is():
    b = Balancer("weighted-round-robin", [ep("a"), ep("b")])
    b.mark_failed("a", until=10.0)
    assert set(picks(b, 6, now=5.0)) == {"b"}
    assert b.pick(exclude={"b"}, now=5.0).vnode == "a"     # the only candidate left
    assert set(picks(b, 6, now=10.0)) == {"a", "b"}
    b.mark_failed("a", until=20.0)
    b.mark_ok("a")
    assert set(picks(b, 6, now=11.0)) == {"a", "b"}


def test_moved_endpoint_forgets_its_failures():
    b = Balancer(endpoints=[ep("a"), ep("b")])
    b.mark_failed("a", until=100.0)
    b.update([ep("a", address="127.0.0.9"), ep("b")])
    assert set(picks(b, 6, now=1.0)) == {"a", "b"}


def test_least_connections_prefers_the_least_loaded_by_weight():
    b = Balancer("weighted-least-connections", [ep("a", 1), ep("b", 2)])
    # Connections held open: load (active+1)/weight keeps b at twice a's count.
    for _ in range(30):
        b.acquire(b.pick().vnode)
    assert (b.active("a"), b.active("b")) == (10, 20)
    for _ in range(5):
        b.release("b")
    assert b.pick().vnode == "b"          # loads 11/1 against 16/2


def test_least_connections_ties_alternate_by_smooth_round_robin():
    b = Balancer("weighted-least-connections", [ep("a"), ep("b"), ep("c")])
    assert picks(b, 6) == ["a", "b", "c", "a", "b", "c"]


def test_active_counts_survive_updates_and_policy_switch():
    b = Balancer("weighted-round-robin", [ep("a"), ep("b")])
    b.acquire("a")
    b.acquire("a")
    b.update([ep("b")])                  # a leaves while its connections drain
    b.set_policy("weighted-least-connections")
    b.update([ep("a"), ep("b")])
    assert b.active("a") == 2 and b.total_active() == 2
    assert b.pick().vnode == "b"
    b.release("a")
    b.release("a")
    b.release("a")                       # one too many: never negative
    assert b.active("a") == 0 and b.total_active() == 0
