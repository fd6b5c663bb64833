"""The kernel path without a kernel: weights to numgen slots, endpoint sets to
rules, rules to an nft script (golden), and KernelPath's transactions as a
fake runner sees them (what it runs, in which order, and when it runs
nothing). The real kernel is tests/integration/test_switch_nft.py."""

import asyncio
import json
import os
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
    assert runner.calls[-2][1] == "add table ip t1\ndelete table ip t1\n"


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
