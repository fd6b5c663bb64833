"""A uid per service on each node, so that two tenants' VMMs never share
one: from the configured range, never held by two services, kept across
an Agent restart while the service has guests here, let go with its last
one."""

import json
import threading

import pytest

from soda.agent.main import build_config, parse_args
from soda.agent.plumbing import NodePlumbing
from soda.agent.uids import TABLE, GuestUids, parse_uid_range
from soda.errors import InvalidSpec, NoCapacity
from soda.model.spec import Resources
from soda.model.state import DriverCapabilities, VirtualNode


def test_the_range_is_parsed_and_checked():
    assert parse_uid_range("200000-265535") == range(200000, 265536)
    assert parse_uid_range(" 70000-70000 ") == range(70000, 70001)
    for bad, says in [("200000", "not a uid range"), ("a-b", "not a uid range"),
                      ("300-400", "below 1000"), ("5000-4000", "is empty"),
                      ("60000-70000", "holds 65534"), ("100000-4294967295", "must lie within"),
                      ("-5-10", "not a uid range")]:
        with pytest.raises(InvalidSpec, match=says):
            parse_uid_range(bad)


def test_two_services_never_share_a_uid_and_a_service_keeps_one(tmp_path):
    uids = GuestUids(str(tmp_path), range(200000, 200010))
    a0 = uids.acquire("a", "a-0")
    assert uids.acquire("a", "a-1") == a0 == uids.acquire("a", "a-0")
    b0 = uids.acquire("b", "b-0")
    assert b0 != a0 and {a0, b0} <= set(range(200000, 200010))
    assert uids.vnodes() == {"a-0", "a-1", "b-0"}


def test_a_uid_is_let_go_with_the_services_last_guest_and_not_given_again_at_once(tmp_path):
    uids = GuestUids(str(tmp_path), range(200000, 200003))
    a = uids.acquire("a", "a-0")
    uids.acquire("a", "a-1")
    uids.release("a-0")
    assert uids.uid_of("a") == a                     # a-1 still holds it
    uids.release("a-1")
    uids.release("a-1")                              # unknown now: fine
    assert uids.uid_of("a") is None and uids.vnodes() == set()
    # The next service gets the next uid, not the one just let go.
    assert uids.acquire("b", "b-0") == a + 1
    assert uids.acquire("a", "a-0") == a + 2
    # Wraps round the range to the first free one.
    uids.release("b-0")
    assert uids.acquire("c", "c-0") == a
    assert uids.acquire("d", "d-0") == a + 1


def test_a_full_range_is_no_capacity(tmp_path):
    uids = GuestUids(str(tmp_path), range(200000, 200002))
    uids.acquire("a", "a-0")
    uids.acquire("b", "b-0")
    with pytest.raises(NoCapacity, match=r"no free guest uid .*\(widen guest_uids\)"):
        uids.acquire("c", "c-0")
    assert uids.acquire("a", "a-1") == uids.uid_of("a")   # a service that has one still gets it


def test_a_restarted_agent_gives_a_service_the_same_uid(tmp_path):
    first = GuestUids(str(tmp_path), range(200000, 200100))
    first.acquire("a", "a-0")
    first.acquire("b", "b-0")
    first.release("b-0")
    table = json.loads((tmp_path / TABLE).read_text())
    assert table["services"] == {"a": {"uid": 200000, "vnodes": ["a-0"]}}
    again = GuestUids(str(tmp_path), range(200000, 200100))
    assert again.acquire("a", "a-0") == 200000
    assert again.acquire("c", "c-0") == 200002           # b's uid is not handed out at once


def test_a_damaged_table_is_refused_rather_than_started_over(tmp_path):
    (tmp_path / TABLE).write_text("{not json")
    with pytest.raises(InvalidSpec, match="cannot read the guest uid table"):
        GuestUids(str(tmp_path), range(200000, 200100))
    (tmp_path / TABLE).write_text(json.dumps({"services": {"a": {"uid": "x", "vnodes": []}}}))
    with pytest.raises(InvalidSpec, match="malformed"):
        GuestUids(str(tmp_path), range(200000, 200100))


def test_concurrent_services_get_distinct_uids(tmp_path):
    uids = GuestUids(str(tmp_path), range(200000, 200100))
    got = {}
    threads = [threading.Thread(target=lambda s=s: got.__setitem__(s, uids.acquire(s, f"{s}-0")))
               for s in (f"s{i}" for i in range(40))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got.values())) == 40


def vnode(name, service):
    return VirtualNode(name=name, service=service, index=0, image_digest="sha256:x",
                       resources=Resources(cpu=0.5, memory=64, bandwidth=1, disk=64),
                       address="10.0.0.2", prefix_length=24, gateway="10.0.0.1", port=80)


class Network:
    def __init__(self):
        self.owners, self.unplugged = {}, []

    def plug(self, vnode, address, mac, *, owner=0):
        self.owners[vnode] = owner
        return {"tap": f"t-{vnode}", "netns": "ns"}

    def unplug(self, vnode):
        self.unplugged.append(vnode)

    def plugged(self):
        return set(self.owners) - set(self.unplugged)


def test_plumbing_gives_the_guest_and_its_tap_the_services_uid_and_lets_it_go(tmp_path):
    caps = {"uml": DriverCapabilities("uml", plumbing=True)}
    network = Network()
    plumbing = NodePlumbing(network, None, caps, uids=GuestUids(str(tmp_path), range(200000, 200100)),
                            open_files=512)
    a0 = plumbing.prepare(vnode("a-0", "a"), "uml")
    b0 = plumbing.prepare(vnode("b-0", "b"), "uml")
    assert a0 == {"tap": "t-a-0", "netns": "ns", "uid": 200000, "open_files": 512, "cgroups": ()}
    assert b0["uid"] == 200001 and network.owners == {"a-0": 200000, "b-0": 200001}
    # An Agent restart: the table in the state dir, not memory, says whose uid is whose.
    plumbing = NodePlumbing(network, None, caps, uids=GuestUids(str(tmp_path), range(200000, 200100)))
    assert plumbing.leftovers() == {"a-0", "b-0"}
    plumbing.update(vnode("a-0", "a"), "uml")
    assert network.owners["a-0"] == 200000
    plumbing.release("a-0", "uml")
    assert plumbing.uids.uid_of("a") is None and plumbing.leftovers() == {"b-0"}
    # The drop off: root, as before.
    root = NodePlumbing(Network(), None, caps)
    assert root.prepare(vnode("c-0", "c"), "uml")["uid"] == 0


def test_agent_config_checks_the_range_and_the_open_files(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("guest_uids: '100-200'\n")
    with pytest.raises(InvalidSpec, match="guest_uids: '100-200' must lie within"):
        build_config(parse_args(["--config", str(path)]))
    path.write_text("guest_open_files: 10\n")
    with pytest.raises(InvalidSpec, match="guest_open_files must be at least 64"):
        build_config(parse_args(["--config", str(path)]))
    path.write_text("guest_uids: '300000-300999'\nguest_open_files: 4096\n")
    config = build_config(parse_args(["--config", str(path), "--no-uid-drop"]))
    assert (config.guest_uids, config.guest_open_files, config.guest_uid_drop) == \
        ("300000-300999", 4096, False)
    assert build_config(parse_args(["--config", str(path)])).guest_uid_drop is True
