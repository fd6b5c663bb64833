"""The node policy's pure parts (what the endpoint sets call for, the nft
script that makes it) and the follower that keeps it in step with the
Master's endpoint stream, with fakes. The kernel's side is
tests/integration/test_policy.py."""

from __future__ import annotations

import threading
import time

import pytest

from soda import model
from soda.agent.policy import (DesiredPolicy, GuestGuard, PolicyFollower, desired_policy,
                               render_policy)
from soda.errors import Unavailable

SUBNET, GW, UPLINK = "10.0.3.0/24", "10.0.3.1", "10.0.3.254"


def endpoints(service, *addresses, port=80, network=model.NetworkSpec(), deleted=False):
    return model.EndpointSet(service, network=network, deleted=deleted, endpoints=tuple(
        model.Endpoint(f"{service}-{i}", a, port, 1.0, True) for i, a in enumerate(addresses)))


def test_desired_policy_holds_local_guests_their_services_and_every_guest():
    sets = [endpoints("web", "10.0.3.2", "10.0.4.2", port=8080),
            endpoints("api", "10.0.5.2"),                      # nothing of it here
            endpoints("old", "10.0.3.9", deleted=True)]
    got = desired_policy(sets, SUBNET, (GW, UPLINK))
    assert got.local == {"10.0.3.2": "web"}
    assert set(got.services) == {"web"}
    assert got.services["web"].port == 8080
    assert got.services["web"].members == {"10.0.3.2", "10.0.4.2"}     # its guests on other nodes too
    assert got.guests == {"10.0.3.2", "10.0.4.2", "10.0.5.2"}
    assert got.open_addresses == (GW, UPLINK)


def test_the_script_closes_a_guest_to_all_but_its_peers_egress_and_port():
    net = model.parse_network({"egress": ["192.0.2.0/24:443-444"]})
    desired = desired_policy([endpoints("web-a", "10.0.3.2", "10.0.4.2", network=net),
                              endpoints("db", "10.0.3.3", port=5432,
                                        network=model.NetworkSpec(peers=False))], SUBNET, (GW, UPLINK))
    script = render_policy(desired, {})
    lines = script.splitlines()
    # Names: one to one from service names and addresses.
    assert "add chain inet soda out_web_a" in lines and "add chain inet soda in_db" in lines
    assert "add element inet soda m_web_a { 10.0.3.2, 10.0.4.2 }" in lines
    assert "add element inet soda e_web_a { 192.0.2.0/24 . 443-444 }" in lines
    assert "add rule inet soda out_web_a ip daddr @m_web_a accept" in lines
    assert "add rule inet soda out_web_a ip daddr . tcp dport @e_web_a accept" in lines
    assert 'add rule inet soda out_web_a counter name ip saddr map { 10.0.3.2 : "drop_10_0_3_2" } drop' in lines
    assert "add rule inet soda in_web_a ip saddr @m_web_a accept" in lines
    # Peers off: no member rule either way, and no egress set at all.
    assert not [line for line in lines if "@m_db accept" in line]
    assert not [line for line in lines if "e_db" in line]
    assert lines.index("add rule inet soda in_db ip saddr @guests drop") \
        < lines.index("add rule inet soda in_db tcp dport 5432 accept") \
        < lines.index("add rule inet soda in_db drop")
    assert "add element inet soda from_guest { 10.0.3.2 : jump out_web_a }" in lines
    # Replies first, then the guests' maps, then the node's unknown addresses closed.
    forward = [line for line in lines if line.startswith("add rule inet soda forward")]
    assert forward[0].endswith("ct state established,related accept")
    assert forward[-1] == f"add rule inet soda forward ip daddr {SUBNET} ip daddr != {{ {GW}, {UPLINK} }} drop"


def test_the_script_deletes_what_is_no_longer_wanted_and_keeps_counters_of_guests_that_stay():
    desired = desired_policy([endpoints("web", "10.0.3.2")], SUBNET, (GW,))
    existing = {"chain": {"forward": {}, "input": {}, "output": {}, "out_gone": {}, "in_gone": {},
                          "out_web": {}},
                "set": {"guests": {}, "m_gone": {}, "m_web": {}},
                "counter": {"drop_10_0_3_2": {}, "drop_10_0_3_7": {}}}
    lines = render_policy(desired, existing).splitlines()
    assert "delete chain inet soda out_gone" in lines and "delete chain inet soda in_gone" in lines
    assert lines.index("flush chain inet soda out_gone") < lines.index("delete chain inet soda out_gone")
    assert "delete set inet soda m_gone" in lines and "delete counter inet soda drop_10_0_3_7" in lines
    assert not [line for line in lines if line.startswith("delete") and ("web" in line or "10_0_3_2" in line)]
    # Everything that stays is emptied before it is filled again.
    assert lines.index("flush chain inet soda forward") < lines.index(
        "add rule inet soda forward ct state established,related accept")


def test_an_empty_node_still_closes_its_subnet():
    lines = render_policy(desired_policy([], SUBNET, (GW, UPLINK)), {}).splitlines()
    assert f"add rule inet soda output ip daddr {SUBNET} ip daddr != {{ {GW}, {UPLINK} }} drop" in lines
    assert not [line for line in lines if "add element" in line]


class FakeNft:
    def __init__(self):
        self.scripts: list[str] = []
        self.state: dict = {}

    def objects(self, family):
        return self.state.get(family, {})

    def apply(self, script):
        self.scripts.append(script)


def test_the_guard_replaces_a_taps_entry_and_removes_only_what_exists():
    nft = FakeNft()
    guard = GuestGuard(nft)
    guard.guard("st1", "02:50:0a:00:03:02", "10.0.3.2")
    first = nft.scripts[-1].splitlines()
    assert "add rule bridge soda prerouting iifname vmap @guards" in first
    assert 'add rule bridge soda guard_st1 ether saddr != 02:50:0a:00:03:02 counter name "spoof_st1" drop' in first
    assert 'add rule bridge soda guard_st1 arp saddr ip != 10.0.3.2 counter name "spoof_st1" drop' in first
    assert first[-1] == 'add element bridge soda guards { "st1" : jump guard_st1 }'
    nft.state["bridge"] = {"map": {"guards": {"elem": [["st1", {"jump": {"target": "guard_st1"}}]]}},
                           "chain": {"prerouting": {}, "guard_st1": {}}, "counter": {"spoof_st1": {}}}
    guard.guard("st1", "02:50:0a:00:03:02", "10.0.3.2")
    again = nft.scripts[-1].splitlines()
    assert "add rule bridge soda prerouting iifname vmap @guards" not in again      # dispatch once
    assert again[-2:] == ['delete element bridge soda guards { "st1" }',
                          'add element bridge soda guards { "st1" : jump guard_st1 }']
    guard.unguard("st1")
    assert nft.scripts[-1].splitlines() == ['delete element bridge soda guards { "st1" }',
                                            "flush chain bridge soda guard_st1",
                                            "delete chain bridge soda guard_st1",
                                            "delete counter bridge soda spoof_st1"]
    nft.state = {}
    count = len(nft.scripts)
    guard.unguard("st1")
    assert nft.scripts[count:] in ([], [""])
    with pytest.raises(ValueError):
        guard.guard("st2", "02:50:0a:00:03:03", "not-an-address")


# ---- the follower --------------------------------------------------------------

class FakePolicy:
    def __init__(self):
        self.synced: list[DesiredPolicy] = []
        self.event = threading.Event()

    def sync(self, desired):
        if self.synced and self.synced[-1] == desired:
            return False
        self.synced.append(desired)
        self.event.set()
        return True


class StreamClient:
    """watch_endpoints() yields what the test queues; None ends a stream,
    an exception is raised."""

    def __init__(self):
        self.items: list = []
        self.cond = threading.Condition()
        self.closed = False

    def push(self, *items):
        with self.cond:
            self.items.extend(items)
            self.cond.notify_all()

    def watch_endpoints(self):
        self.opened = getattr(self, "opened", 0) + 1
        while True:
            with self.cond:
                while not self.items and not self.closed:
                    self.cond.wait(0.05)
                if self.closed:
                    return
                item = self.items.pop(0)
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class NoBackoff:
    cap = 0.01

    def next(self):
        return 0.01

    def reset(self):
        pass


@pytest.fixture
def follower():
    client, policy = StreamClient(), FakePolicy()
    where = {"scope": (SUBNET, (GW, UPLINK))}
    f = PolicyFollower(client, policy, lambda: where["scope"], backoff=NoBackoff(), settle_seconds=0.2)
    f.start()
    yield f, client, policy, where
    f.stop()


def local(policy):
    return dict(policy.synced[-1].local) if policy.synced else None


def test_the_follower_applies_what_the_stream_says(follower):
    f, client, policy, _ = follower
    client.push(endpoints("web", "10.0.3.2"), endpoints("api", "10.0.3.3"))
    wait_for(lambda: local(policy) == {"10.0.3.2": "web", "10.0.3.3": "api"})
    client.push(endpoints("api", "10.0.3.3", deleted=True))
    wait_for(lambda: local(policy) == {"10.0.3.2": "web"})


def test_a_change_after_the_snapshot_settled_follows_on_the_same_stream(follower):
    f, client, policy, _ = follower
    client.push(endpoints("web", "10.0.3.2"))
    wait_for(lambda: local(policy) == {"10.0.3.2": "web"})
    time.sleep(0.4)                         # the snapshot has settled
    client.push(endpoints("web", "10.0.3.2", "10.0.3.4"))
    wait_for(lambda: local(policy) == {"10.0.3.2": "web", "10.0.3.4": "web"})
    assert client.opened == 1               # not by watching again after a failure


def test_a_reconnect_keeps_services_until_the_new_snapshot_settles_then_drops_the_unnamed(follower):
    f, client, policy, _ = follower
    client.push(endpoints("web", "10.0.3.2"), endpoints("api", "10.0.3.3"))
    wait_for(lambda: local(policy) == {"10.0.3.2": "web", "10.0.3.3": "api"})
    count = len(policy.synced)
    client.push(Unavailable("the Master went away"))
    time.sleep(0.1)
    # The new stream names web only (api was deleted while it was down).
    client.push(endpoints("web", "10.0.3.2"))
    time.sleep(0.1)
    assert local(policy) == {"10.0.3.2": "web", "10.0.3.3": "api"}       # no gap while it settles
    wait_for(lambda: local(policy) == {"10.0.3.2": "web"})
    assert len(policy.synced) == count + 1


def test_nothing_is_applied_before_the_node_is_configured(follower):
    f, client, policy, where = follower
    where["scope"] = None
    client.push(endpoints("web", "10.0.3.2"))
    time.sleep(0.3)
    assert policy.synced == []
    where["scope"] = (SUBNET, (GW, UPLINK))          # configured: the follower sees it by itself
    wait_for(lambda: local(policy) == {"10.0.3.2": "web"})


def test_a_failing_apply_is_retried_and_said(follower):
    f, client, policy, _ = follower
    from soda.agent.policy import PolicyError
    calls = []
    real = policy.sync

    def flaky(desired):
        calls.append(desired)
        if len(calls) == 1:
            raise PolicyError("nft refused the node policy: boom")
        return real(desired)
    policy.sync = flaky
    client.push(endpoints("web", "10.0.3.2"))
    wait_for(lambda: f.problem == "nft refused the node policy: boom" or local(policy) is not None)
    wait_for(lambda: local(policy) == {"10.0.3.2": "web"})
    assert f.problem == ""
