"""The kernel path without a kernel: weights to numgen slots, endpoint sets to
rules, rules to an nft script (golden), and KernelPath's transactions as a
fake runner sees them (what it runs, in which order, and when it runs
nothing). The real kernel is tests/integration/test_switch_nft.py."""

import asyncio
import json
import logging
import os
import re
from collections import Counter

import pytest

from soda.errors import CommandError, InvalidSpec, WrongState
from soda.model.spec import SwitchSpec
from soda.model.switching import Endpoint, EndpointSet
from soda.switch import nft
from soda.switch.main import SwitchConfig, check_config
from soda.switch.nft import KernelPath, L4Rule, ModeDispatch, l4_rule, render, weight_slots

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
UPDATE = os.environ.get("SODA_UPDATE_GOLDEN") == "1"


def ep(vnode, address="10.233.1.2", port=80, weight=1.0, ready=True):
    return Endpoint(vnode=vnode, address=address, port=port, weight=weight, ready=ready)


def l4(service="web", listen="127.0.0.1:8080", endpoints=(), mode="l4", deleted=False):
    return EndpointSet(service, SwitchSpec(listen=listen, mode=mode), tuple(endpoints), deleted=deleted)


def check_golden(name: str, text: str) -> None:
    path = os.path.join(GOLDEN, f"{name}.nft")
    if UPDATE:
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read(), f"ruleset differs from {path} (SODA_UPDATE_GOLDEN=1 to accept)"


# ---- weights to slots ----------------------------------------------------------

def test_slots_follow_the_weights_and_interleave():
    a, b = ep("a", weight=0.5), ep("b", "10.233.1.3", weight=1.0)
    slots = weight_slots([a, b])
    assert [e.vnode for e in slots] == ["b", "a", "b"]      # 1:2, A never twice, B never three times


def test_slots_are_reduced_by_the_common_divisor():
    slots = weight_slots([ep("a", weight=2.0), ep("b", weight=2.0), ep("c", weight=4.0)])
    assert Counter(e.vnode for e in slots) == {"a": 1, "b": 1, "c": 2}


def test_slots_are_capped_in_proportion_and_every_node_keeps_one():
    endpoints = [ep("a", weight=0.01), ep("b", weight=1.23), ep("c", weight=4.56), ep("d", weight=7.89)]
    slots = weight_slots(endpoints, max_slots=64)
    counts = Counter(e.vnode for e in slots)
    assert sum(counts.values()) == 64
    assert counts["a"] == 1
    total = 0.01 + 1.23 + 4.56 + 7.89
    for e in endpoints[1:]:
        assert abs(counts[e.vnode] - 64 * e.weight / total) <= 1.0


def test_nodes_without_weight_get_no_slot():
    assert weight_slots([ep("a", weight=0.0), ep("b", weight=-1)]) == ()
    assert [e.vnode for e in weight_slots([ep("a", weight=0.0), ep("b")])] == ["b"]
    assert weight_slots([]) == ()


# ---- endpoint sets to rules ---------------------------------------------------------

def test_rule_takes_ready_ipv4_endpoints_only():
    es = l4(endpoints=[ep("web-0", "10.233.1.2", weight=0.5), ep("web-1", "10.233.1.3"),
                       ep("web-2", "10.233.1.4", ready=False), ep("web-3", "fd00::3")])
    rule = l4_rule(es)
    assert (rule.host, rule.port) == ("127.0.0.1", 8080)
    assert Counter(rule.slots) == {("10.233.1.2", 80): 1, ("10.233.1.3", 80): 2}


def test_rule_honours_the_health_source():
    es = l4(endpoints=[ep("web-0", "10.233.1.2"), ep("web-1", "10.233.1.3")])
    rule = l4_rule(es, routable=lambda e: e.vnode != "web-0")
    assert rule.slots == (("10.233.1.3", 80),)


@pytest.mark.parametrize("listen, message", [
    ("[::1]:8080", "IPv4 only"),
    ("localhost:8080", "not a name"),
    ("127.0.0.1:http", "expected HOST:PORT"),
])
def test_listen_addresses_the_kernel_cannot_serve_are_refused(listen, message):
    with pytest.raises(InvalidSpec, match=message):
        l4_rule(l4(listen=listen))


def test_listen_hosts_bind_the_kernel_path_too():
    with pytest.raises(InvalidSpec, match="listen_hosts"):
        l4_rule(l4(listen="10.0.0.1:80"), listen_hosts=("127.0.0.1",))
    assert l4_rule(l4(listen="127.0.0.1:80"), listen_hosts=("127.0.0.1",)).port == 80


@pytest.mark.parametrize("table", ["", "1abc", "soda-switch", "a" * 65, "tab le", "t;x"])
def test_table_names_are_checked(table):
    with pytest.raises(InvalidSpec, match="nft table name"):
        nft.check_table_name(table)
    with pytest.raises(InvalidSpec):
        check_config(SwitchConfig(nft_table=table))


# ---- rules to a ruleset (golden) ---------------------------------------------------

RULES = [
    L4Rule("web", "127.0.0.1", 8080, (("10.233.1.3", 80), ("10.233.1.2", 80), ("10.233.1.3", 80))),
    L4Rule("api", "0.0.0.0", 9090, (("10.233.2.2", 8000),)),
    L4Rule("shop", "192.0.2.10", 443, (("10.233.3.2", 443), ("10.233.3.3", 443))),
    L4Rule("idle", "127.0.0.1", 8081, ()),
]


def test_first_install_replaces_the_table_in_one_transaction():
    check_golden("nft-first-install", render("soda_switch", RULES, owner="soda-switch pid 42 start 7",
                                             replace=True))


def test_update_flushes_and_refills_keeping_the_base_chains():
    check_golden("nft-update-local-masquerade", render("soda_switch", RULES, masquerade_all=False))


def test_empty_table_keeps_its_hooks():
    text = render("t", [])
    assert "dnat" not in text and "masquerade" not in text
    assert text.startswith("add table ip t\nflush table ip t\n")
    assert "type nat hook output priority -100" in text


def test_service_names_cannot_break_out_of_a_comment():
    text = render("t", [L4Rule('we"b\\\n', "127.0.0.1", 80, (("10.0.0.2", 80),))])
    assert 'comment "web"' in text


# ---- KernelPath transactions with a fake runner -----------------------------------

class FakeRunner:
    """Records every command; answers `ip route get` and `sysctl -n` like the kernel would."""

    def __init__(self, devices=None, listing_error=True, listing=""):
        self.calls: list[tuple[list[str], str | None]] = []
        self.devices = devices or {}            # address -> device
        self.sysctl: dict[str, str] = {}
        self.listing_error = listing_error
        self.listing = listing
        self.fail_nft = False
        self.counters: dict[str, int] = {}      # what the kernel's rule counters hold now

    async def __call__(self, argv, stdin=None):
        self.calls.append((list(argv), stdin))
        if argv[:3] == ["ip", "netns", "exec"]:
            argv = argv[4:]
        if argv[:3] == ["nft", "list", "table"]:
            if self.listing_error:
                raise CommandError(argv, 1, err="Error: No such file or directory")
            return self.listing
        if argv[:4] == ["nft", "-j", "list", "chain"]:
            return json.dumps({"nftables": [{"metainfo": {}}] + [
                {"rule": {"comment": name, "expr": [{"match": {}}, {"counter": {"packets": n, "bytes": 60 * n}}]}}
                for name, n in self.counters.items()]})
        if argv[:2] == ["nft", "-f"] and self.fail_nft:
            raise CommandError(argv, 1, err="Error: Could not process rule: Operation not permitted")
        if argv[:4] == ["ip", "-j", "route", "get"]:
            return json.dumps([{"dst": argv[4], "dev": self.devices.get(argv[4], "lo")}])
        if argv[:2] == ["sysctl", "-n"]:
            return self.sysctl.get(argv[2], "0") + "\n"
        if argv[:3] == ["sysctl", "-q", "-w"]:
            key, value = argv[3].split("=")
            self.sysctl[key] = value
        return ""

    def scripts(self):
        return [stdin for argv, stdin in self.calls if argv[:2] == ["nft", "-f"]]


def run(coro):
    return asyncio.run(coro)


WEB = [ep("web-0", "10.233.1.2", weight=0.5), ep("web-1", "10.233.1.3", weight=1.0)]


def test_apply_installs_then_updates_and_skips_what_did_not_change():
    runner = FakeRunner()

    async def scenario():
        path = KernelPath(table="t1", runner=runner)
        await path.apply(l4(endpoints=WEB))
        await path.apply(l4(endpoints=WEB))                  # same rule: no transaction
        await path.apply(l4(endpoints=WEB[1:]))
        return path

    path = run(scenario())
    scripts = runner.scripts()
    assert len(scripts) == 2
    assert scripts[0].startswith("add table ip t1\ndelete table ip t1\n")     # replaces a leftover
    assert "numgen inc mod 3 map { 0 : 10.233.1.3 . 80, 1 : 10.233.1.2 . 80, 2 : 10.233.1.3 . 80 }" in scripts[0]
    assert scripts[1].startswith("add table ip t1\nflush table ip t1\n")
    assert "numgen inc mod 1 map { 0 : 10.233.1.3 . 80 }" in scripts[1]
    assert f'comment "soda-switch pid {os.getpid()} start ' in scripts[0]
    assert path.services() == {"web"}


def test_a_service_leaving_l4_or_deleted_loses_its_rule():
    runner = FakeRunner()

    async def scenario():
        path = KernelPath(table="t1", runner=runner)
        await path.apply(l4(endpoints=WEB))
        await path.apply(l4(endpoints=WEB, mode="proxy"))
        await path.apply(l4("api", "127.0.0.1:9000", endpoints=WEB))
        await path.apply(l4("api", deleted=True))
        await path.remove("never-seen")                       # nothing to do: no transaction
        return path

    path = run(scenario())
    scripts = runner.scripts()
    assert len(scripts) == 4
    assert "dnat" not in scripts[1] and "dnat" in scripts[2] and "dnat" not in scripts[3]
    assert path.services() == set()


def test_an_invalid_listen_removes_the_stale_rule_and_raises():
    runner = FakeRunner()

    async def scenario():
        path = KernelPath(table="t1", runner=runner)
        await path.apply(l4(endpoints=WEB))
        with pytest.raises(InvalidSpec):
            await path.apply(l4(listen="[::1]:8080", endpoints=WEB))
        return path

    path = run(scenario())
    assert "dnat" not in runner.scripts()[-1]
    assert path.services() == set()


def test_loopback_services_get_route_localnet_on_the_way_to_their_nodes_and_it_is_restored():
    runner = FakeRunner(devices={"10.233.1.2": "soda0", "10.233.1.3": "soda0"})
    runner.sysctl["net/ipv4/conf/soda0/route_localnet"] = "0"

    async def scenario():
        path = KernelPath(table="t1", runner=runner, netns="ns1")
        await path.apply(l4(endpoints=WEB))
        assert runner.sysctl["net/ipv4/conf/soda0/route_localnet"] == "1"
        await path.close()

    run(scenario())
    assert runner.sysctl["net/ipv4/conf/soda0/route_localnet"] == "0"
    # Every command ran in the namespace it was given.
    assert all(argv[:4] == ["ip", "netns", "exec", "ns1"] for argv, _ in runner.calls)
    # Restored while the table (which records the value) still exists.
    assert runner.calls[-2][0][4:] == ["sysctl", "-q", "-w", "net/ipv4/conf/soda0/route_localnet=0"]
    assert runner.calls[-1][1] == "add table ip t1\ndelete table ip t1\n"


def test_close_drains_before_deleting_the_table_and_is_idempotent():
    runner = FakeRunner()

    async def scenario():
        path = KernelPath(table="t1", runner=runner)
        await path.apply(l4(endpoints=WEB))
        await path.close(drain_seconds=0.01)
        await path.close(drain_seconds=0.01)
        await path.apply(l4(endpoints=WEB))                   # closed: ignored

    run(scenario())
    scripts = runner.scripts()
    assert len(scripts) == 3
    assert "dnat" not in scripts[1] and "jump services" in scripts[1]     # hooks stay for open connections
    assert scripts[2] == "add table ip t1\ndelete table ip t1\n"


def test_close_without_anything_installed_runs_nothing():
    runner = FakeRunner()
    run(KernelPath(table="t1", runner=runner).close(5.0))
    assert runner.calls == []


LEFT_BY_A_DEAD_SWITCH = 'table ip t1 {\n\tcomment "soda-switch pid 999999999 start 1"\n}\n'


def test_start_takes_over_a_table_left_by_a_dead_switch_and_replaces_it_once_the_endpoints_are_known():
    """The table keeps forwarding across a Switch restart: nothing deletes
    it at start, updates wait for take_over(), which replaces it whole in
    one transaction (whatever its layout); later ones flush and refill."""
    runner = FakeRunner(listing_error=False, listing=LEFT_BY_A_DEAD_SWITCH)
    runner.counters = {"web": 5}                 # what the dead Switch's rule counted

    async def scenario():
        path = KernelPath(table="t1", runner=runner)
        await path.start()
        await path.apply(l4(endpoints=WEB))
        await path.apply(l4("api", "127.0.0.1:9000", endpoints=WEB[1:]))
        assert runner.scripts() == []            # the table left behind forwards meanwhile
        await path.take_over()
        await path.take_over()                   # once only
        await path.apply(l4(endpoints=WEB[1:]))
        return path

    path = run(scenario())
    scripts = runner.scripts()
    assert len(scripts) == 2
    assert scripts[0].startswith("add table ip t1\ndelete table ip t1\ntable ip t1 {")
    assert 'comment "web"' in scripts[0] and 'comment "api"' in scripts[0]
    assert f'comment "soda-switch pid {os.getpid()} start ' in scripts[0]
    assert scripts[1].startswith("add table ip t1\nflush table ip t1\n")
    assert path.services() == {"web", "api"}


def test_a_table_taken_over_is_deleted_by_close_even_before_take_over():
    runner = FakeRunner(listing_error=False, listing=LEFT_BY_A_DEAD_SWITCH)

    async def scenario():
        path = KernelPath(table="t1", runner=runner)
        await path.start()
        await path.close()
        await path.take_over()                   # closed: nothing

    run(scenario())
    assert runner.scripts() == ["add table ip t1\ndelete table ip t1\n"]


def test_take_over_without_a_table_taken_over_does_nothing():
    runner = FakeRunner()

    async def scenario():
        path = KernelPath(table="t1", runner=runner)
        await path.start()
        await path.apply(l4(endpoints=WEB))      # nothing to keep: written at once
        await path.take_over()

    run(scenario())
    assert len(runner.scripts()) == 1


def test_start_leaves_alone_a_table_of_a_live_switch_and_stays_off_the_kernel():
    parent = os.getppid()
    listing = f'table ip t1 {{\n\tcomment "{nft.owner_tag(parent)}"\n}}\n'
    runner = FakeRunner(listing_error=False, listing=listing)

    async def scenario():
        path = KernelPath(table="t1", runner=runner)
        await path.start()
        with pytest.raises(WrongState, match=f"pid {parent}"):
            await path.apply(l4(endpoints=WEB))
        await path.close(1.0)

    run(scenario())
    assert runner.scripts() == []


def test_start_without_a_table_or_without_nft_does_nothing():
    runner = FakeRunner()
    run(KernelPath(table="t1", runner=runner).start())
    assert runner.scripts() == []


class FakeKernel(FakeRunner):
    """A FakeRunner whose `nft list table` shows the table the scripts left,
    with the comment the kernel keeps: the one given when the table was
    created (a table that exists ignores a new one)."""

    def __init__(self, devices=None):
        super().__init__(devices)
        self.comment: str | None = None          # None: no table

    async def __call__(self, argv, stdin=None):
        out = await super().__call__(argv, stdin)
        if argv[:3] == ["ip", "netns", "exec"]:
            argv = argv[4:]
        if argv[:2] == ["nft", "-f"]:
            given = re.search(r'^\tcomment "(.*)"$', stdin, re.M)
            for line in stdin.splitlines():
                if line.startswith("delete table"):
                    self.comment = None
                elif line.startswith(("add table", "table ")) and self.comment is None:
                    self.comment = given.group(1) if given and line.startswith("table ") else ""
            self.listing_error = self.comment is None
            self.listing = f'table ip t1 {{\n\tcomment "{self.comment}"\n}}\n'
        return out


SODA0 = "net/ipv4/conf/soda0/route_localnet"
SODA1 = "net/ipv4/conf/soda1/route_localnet"


def test_a_path_killed_after_setting_route_localnet_leaves_the_original_to_the_one_that_takes_over():
    runner = FakeKernel(devices={"10.233.1.2": "soda0", "10.233.1.3": "soda0"})
    runner.sysctl[SODA0] = "0"

    async def scenario():
        killed = KernelPath(table="t1", runner=runner)
        await killed.apply(l4(endpoints=WEB))
        assert runner.sysctl[SODA0] == "1"
        del killed                               # kill -9: no close()

        successor = KernelPath(table="t1", runner=runner)
        await successor.start()
        await successor.apply(l4(endpoints=WEB))
        await successor.take_over()
        assert runner.sysctl[SODA0] == "1"
        await successor.close()

    run(scenario())
    assert runner.sysctl[SODA0] == "0"
    assert runner.listing_error                  # the table is gone


@pytest.mark.parametrize("taken_over", [False, True])
def test_the_original_route_localnet_is_handed_on_when_the_successor_is_killed_too(taken_over):
    runner = FakeKernel(devices={"10.233.1.2": "soda0", "10.233.1.3": "soda0"})
    runner.sysctl[SODA0] = "0"

    async def scenario():
        await KernelPath(table="t1", runner=runner).apply(l4(endpoints=WEB))
        second = KernelPath(table="t1", runner=runner)
        await second.start()
        await second.apply(l4(endpoints=WEB))
        if taken_over:
            await second.take_over()             # its own table now, the dead one's record in it
        third = KernelPath(table="t1", runner=runner)
        await third.start()
        await third.close()

    run(scenario())
    assert runner.sysctl[SODA0] == "0"


def test_route_localnet_is_recorded_in_the_kernel_before_it_is_changed():
    """A new device needs a new table (the kernel keeps a table's first
    comment): one transaction with the rules already there and the record,
    then the sysctl, then the new rules."""
    runner = FakeKernel(devices={"10.233.1.2": "soda0", "10.233.1.3": "soda0", "10.233.9.2": "soda1"})
    runner.sysctl[SODA0] = runner.sysctl[SODA1] = "0"

    def steps():
        return [stdin.splitlines()[1] if stdin else argv[-1] for argv, stdin in runner.calls
                if argv[:2] == ["nft", "-f"] or argv[:3] == ["sysctl", "-q", "-w"]]

    async def scenario():
        path = KernelPath(table="t1", runner=runner)
        await path.apply(l4(endpoints=WEB))
        assert steps() == ["delete table ip t1", f"{SODA0}=1", "flush table ip t1"]
        assert "dnat" not in runner.scripts()[0]           # nothing forwarded before it is recorded
        assert runner.comment.endswith(" localnet soda0=0")
        del runner.calls[:]
        await path.apply(l4("api", "127.0.0.1:9000", endpoints=[ep("api-0", "10.233.9.2")]))
        assert steps() == ["delete table ip t1", f"{SODA1}=1", "flush table ip t1"]
        recording, final = runner.scripts()
        assert 'comment "web"' in recording and 'comment "api"' not in recording
        assert 'comment "web"' in final and 'comment "api"' in final
        assert runner.comment.endswith(" localnet soda0=0,soda1=0")
        del runner.calls[:]
        await path.apply(l4("api", "127.0.0.1:9000", endpoints=[ep("api-0", "10.233.9.2"),
                                                                ep("api-1", "10.233.1.2")]))
        assert steps() == ["flush table ip t1"]             # nothing new to record: the table stays
        await path.close()

    run(scenario())
    assert runner.sysctl[SODA0] == runner.sysctl[SODA1] == "0"


def test_a_device_that_does_not_fit_in_the_comment_is_set_with_a_warning_and_restored_by_close(caplog):
    names = [f"vethsoda{i:07d}" for i in range(6)]            # 15 characters each
    runner = FakeKernel(devices={f"10.233.{i}.2": name for i, name in enumerate(names)})
    for name in names:
        runner.sysctl[f"net/ipv4/conf/{name}/route_localnet"] = "0"

    async def scenario():
        path = KernelPath(table="t1", runner=runner)
        await path.apply(l4(endpoints=[ep(f"web-{i}", f"10.233.{i}.2") for i in range(len(names))]))
        assert all(runner.sysctl[f"net/ipv4/conf/{name}/route_localnet"] == "1" for name in names)
        assert len(runner.comment) <= nft.COMMENT_MAX
        recorded = nft.recorded_localnet(runner.listing)
        assert recorded and list(recorded) == names[:len(recorded)] and len(recorded) < len(names)
        await path.close()

    with caplog.at_level(logging.WARNING, logger="soda.switch.nft"):
        run(scenario())
    assert f"route_localnet of {names[-1]} (was 0) is not recorded" in caplog.text
    assert all(runner.sysctl[f"net/ipv4/conf/{name}/route_localnet"] == "0" for name in names)


def test_the_comment_records_devices_to_restore_in_order_within_bounds():
    owner = "soda-switch pid 4194304 start 123456789012"
    localnet = {"br0": "0", "up": "1", "bad/name": "0", "eth0.100": "2", "x": "0; rm"}
    localnet |= {f"vethsoda{i:07d}": "0" for i in range(8)}
    comment = nft.table_comment(owner, localnet)
    assert comment.startswith(f"{owner} localnet br0=0,eth0.100=2,vethsoda0000000=0,")
    assert len(comment) <= nft.COMMENT_MAX
    recorded = nft.recorded_localnet(f'comment "{comment}"')
    assert list(recorded)[:3] == ["br0", "eth0.100", "vethsoda0000000"]
    assert all(localnet[device] == value for device, value in recorded.items())
    assert nft.table_comment(owner, {"up": "1"}) == owner       # nothing to restore: the owner alone


def test_a_comment_read_back_is_validated():
    listing = ('table ip t1 {\n\tcomment "soda-switch pid 1 start 2 localnet eth0=0,../../x=0,all=0,'
               'eth1=1;rm,eth2=0x,a-device-name-too-long=0,eth0=5,=0,br0=-1,eth3"\n}\n')
    assert nft.recorded_localnet(listing) == {"eth0": "0", "br0": "-1"}
    assert nft.recorded_localnet(LEFT_BY_A_DEAD_SWITCH) == {}
    parent = os.getppid()
    alive = f'table ip t1 {{\n\tcomment "{nft.owner_tag(parent)} localnet eth0=0"\n}}\n'
    assert nft.table_owner_alive(alive) == parent


def test_only_valid_entries_of_a_dead_switch_record_are_restored():
    runner = FakeRunner(listing_error=False, listing=(
        'table ip t1 {\n\tcomment "soda-switch pid 999999999 start 1 localnet ../../../vm=0,all=0,soda0=0"\n}\n'))
    runner.sysctl[SODA0] = "1"

    async def scenario():
        path = KernelPath(table="t1", runner=runner)
        await path.start()
        await path.close()

    run(scenario())
    writes = [argv[3] for argv, _ in runner.calls if argv[:3] == ["sysctl", "-q", "-w"]]
    assert writes == [f"{SODA0}=0"]


class FakeHealth:
    def __init__(self):
        self.unhealthy: set[tuple[str, str]] = set()
        self.observers = []

    def is_healthy(self, service, vnode):
        return (service, vnode) not in self.unhealthy

    def subscribe(self, observer):
        self.observers.append(observer)
        return lambda: self.observers.remove(observer)

    def flip(self, service, vnode):
        self.unhealthy ^= {(service, vnode)}
        for observer in self.observers:
            observer(service, frozenset())


def test_health_changes_rewrite_the_map():
    runner, health = FakeRunner(), FakeHealth()

    async def scenario():
        path = KernelPath(table="t1", runner=runner, health=health)
        await path.apply(l4(endpoints=WEB))
        health.flip("web", "web-1")
        await asyncio.sleep(0.01)
        health.flip("other", "x")                            # not ours: nothing
        await asyncio.sleep(0.01)
        health.flip("web", "web-1")
        await asyncio.sleep(0.01)
        await path.close()
        assert health.observers == []

    run(scenario())
    scripts = runner.scripts()
    assert "mod 3" in scripts[0]
    assert "numgen inc mod 1 map { 0 : 10.233.1.2 . 80 }" in scripts[1]
    assert "mod 3" in scripts[2]
    assert len(scripts) == 4                                  # + the delete at close


class FakeProxy:
    def __init__(self):
        self.applied, self.removed = [], []

    async def apply(self, es):
        self.applied.append(es.service)

    async def remove(self, name):
        self.removed.append(name)


def test_dispatch_keeps_the_proxy_serving_when_the_kernel_path_fails(caplog):
    runner, proxy = FakeRunner(), FakeProxy()
    runner.fail_nft = True

    async def scenario():
        dispatch = ModeDispatch(proxy, KernelPath(table="t1", runner=runner))
        await dispatch.apply(l4(endpoints=WEB))
        await dispatch.remove("web")

    run(scenario())
    assert proxy.applied == ["web"] and proxy.removed == ["web"]
    assert "kernel path failed, the userspace proxy serves it" in caplog.text


def test_connection_counts_survive_rewrites_of_the_table():
    runner = FakeRunner()

    async def scenario():
        path = KernelPath(table="t1", runner=runner)
        assert await path.connection_counts() == {}
        await path.apply(l4(endpoints=WEB))
        runner.counters = {"web": 30}
        assert await path.connection_counts() == {"web": 30}
        await path.apply(l4("api", "127.0.0.1:9000", endpoints=WEB))    # rewrites: counters restart
        runner.counters = {"web": 5, "api": 2}
        assert await path.connection_counts() == {"web": 35, "api": 2}
        await path.remove("api")
        runner.counters = {"web": 1}
        assert await path.connection_counts() == {"web": 36}

    run(scenario())


def test_counters_are_read_from_nft_json():
    listing = json.dumps({"nftables": [{"metainfo": {"version": "1.0.6"}},
                                       {"chain": {"name": "services"}},
                                       {"rule": {"comment": "web", "expr": [{"counter": {"packets": 7, "bytes": 420}},
                                                                             {"dnat": {}}]}},
                                       {"rule": {"expr": [{"counter": {"packets": 3}}]}}]})
    assert nft.parse_counters(listing) == {"web": 7}
    assert nft.parse_counters("") == {}


def test_a_failed_transaction_is_retried_by_the_next_update_even_if_nothing_changed():
    runner = FakeRunner()

    async def scenario():
        path = KernelPath(table="t1", runner=runner)
        await path.apply(l4(endpoints=WEB))
        runner.fail_nft = True
        with pytest.raises(CommandError):
            await path.apply(l4(endpoints=WEB[1:]))
        runner.fail_nft = False
        await path.apply(l4(endpoints=WEB[1:]))               # same rule as the failed one: written now

    run(scenario())
    scripts = runner.scripts()
    assert len(scripts) == 3 and scripts[1] == scripts[2] and "mod 1" in scripts[2]


def test_the_switch_sends_endpoint_sets_through_the_kernel_path_with_its_config():
    from soda.switch.main import Switch

    async def scenario():
        switch = Switch(SwitchConfig(master="127.0.0.1:1", nft_table="soda_other", nft_masquerade_all=False,
                                     listen_hosts=("127.0.0.1",)), client=object())
        assert isinstance(switch.sync.target, ModeDispatch)
        kernel = switch.sync.target.kernel
        assert (kernel.table, kernel.masquerade_all, kernel.listen_hosts) == ("soda_other", False,
                                                                               {"127.0.0.1"})
        assert kernel.health is switch.proxy.health

    run(scenario())
