"""`soda-agent --teardown` in the real kernel: what an Agent made on its host
for a node that leaves the cluster goes, and nothing else. The "host" is a
namespace of the test's own (the command runs in it with `ip netns exec`),
holding what an Agent leaves when it stops: the node's namespace joined by
an uplink veth, SODA's nft tables, a route of SODA's protocol to another
node's guests; beside them a table, a bridge and a route that are not
SODA's. What is left is read back with ip and nft."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root
if os.geteuid() != 0:
    pytest.skip("the teardown needs root (network namespaces, nftables)", allow_module_level=True)

from soda.routing import RTPROT_SODA  # noqa: E402
from tests.integration.conftest import NETNS_PREFIX, delete_netns, run, unique  # noqa: E402

SUBNET_PREFIX = "10.237.9"          # the node's subnet: gateway .1, uplink .254
OTHER_SUBNET = "10.237.98.0/24"      # another node's guests, via .200 on the uplink's segment
NOT_OURS = "10.237.97.0/24"          # a route of someone else's, on the same link


@pytest.fixture
def host(tmp_path):
    names = {"host": unique(NETNS_PREFIX), "node": unique(NETNS_PREFIX)}
    try:
        for name in names.values():
            run(["ip", "netns", "add", name])
        yield names
    finally:
        for name in names.values():
            delete_netns(name)


def agent_config(tmp_path, netns: str) -> str:
    path = tmp_path / "agent.yaml"
    path.write_text(f"name: leaving\nmaster: 127.0.0.1:1\nstate_dir: {tmp_path / 'state'}\n"
                    f"hypervisors: [fake]\nnetns: '{netns}'\nbridge: soda0\n")
    return str(path)


def teardown(host: str, config: str, *more: str) -> subprocess.CompletedProcess:
    return run(["ip", "netns", "exec", host, sys.executable, "-m", "soda.agent.main", "--config",
                config, "--teardown", *more], check=False, timeout=60)


def tables(netns: str) -> set[str]:
    out = json.loads(run(["ip", "netns", "exec", netns, "nft", "-j", "list", "tables"]).stdout)
    return {f"{t['table']['family']} {t['table']['name']}" for t in out["nftables"] if "table" in t}


def links(netns: str) -> set[str]:
    return {link["ifname"] for link in json.loads(run(["ip", "-n", netns, "-j", "link", "show"]).stdout)}


def routes(netns: str) -> dict[str, str]:
    """destination -> protocol of the main table's routes."""
    out = json.loads(run(["ip", "-n", netns, "-j", "-4", "route", "show", "table", "main"]).stdout or "[]")
    return {r["dst"]: str(r.get("protocol", "")) for r in out}


def soda_tables(netns: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], check=True, text=True,
                   input="add table inet soda\nadd chain inet soda forward "
                         "{ type filter hook forward priority 0; policy accept; }\n"
                         "add table bridge soda\nadd chain bridge soda forward "
                         "{ type filter hook forward priority 0; policy accept; }\n"
                         "add table inet someone_else\n")


def route_to_other_node(host: str, dev: str) -> None:
    run(["ip", "-n", host, "route", "add", OTHER_SUBNET, "via", f"{SUBNET_PREFIX}.200", "dev", dev,
         "proto", str(RTPROT_SODA)])
    run(["ip", "-n", host, "route", "add", NOT_OURS, "via", f"{SUBNET_PREFIX}.200", "dev", dev])


def test_a_namespaced_node_goes_with_its_namespace_and_routes(host, tmp_path):
    h, n = host["host"], host["node"]
    # As NodeNetwork leaves a namespaced node: bridge and uplink in the node's
    # namespace, the uplink's host end holding the last address of the subnet.
    run(["ip", "-n", h, "link", "add", "su-leaving", "type", "veth", "peer", "name", "uplink0",
         "netns", n])
    run(["ip", "-n", h, "addr", "add", f"{SUBNET_PREFIX}.254/24", "dev", "su-leaving"])
    run(["ip", "-n", h, "link", "set", "su-leaving", "up"])
    run(["ip", "-n", n, "link", "add", "soda0", "type", "bridge"])
    run(["ip", "-n", n, "link", "set", "uplink0", "master", "soda0", "up"])
    soda_tables(n)
    route_to_other_node(h, "su-leaving")
    config = agent_config(tmp_path, n)

    done = teardown(h, config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "removed 1 route(s) to other nodes' guests",
        f"removed network namespace {n} (its bridge, TAPs and nft tables with it)"], done.stdout
    assert n not in run(["ip", "netns", "list"]).stdout.split()
    assert "su-leaving" not in links(h)
    assert OTHER_SUBNET not in routes(h)

    again = teardown(h, config)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "nothing of node leaving left on this host"


def test_a_node_in_the_hosts_namespace_loses_its_bridge_tables_and_routes_only(host, tmp_path):
    h = host["host"]
    for bridge in ("soda0", "br-mine"):
        run(["ip", "-n", h, "link", "add", bridge, "type", "bridge"])
        run(["ip", "-n", h, "link", "set", bridge, "up"])
    run(["ip", "-n", h, "addr", "add", f"{SUBNET_PREFIX}.1/24", "dev", "soda0"])
    run(["ip", "-n", h, "addr", "add", "10.237.96.1/24", "dev", "br-mine"])
    soda_tables(h)
    route_to_other_node(h, "soda0")
    # The route of someone else's would go with soda0: give it a link of its own.
    run(["ip", "-n", h, "route", "replace", NOT_OURS, "via", "10.237.96.200", "dev", "br-mine"])
    config = agent_config(tmp_path, "")

    done = teardown(h, config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["removed 1 route(s) to other nodes' guests",
                                        "removed bridge soda0", "removed nft table inet soda",
                                        "removed nft table bridge soda"], done.stdout
    assert tables(h) == {"inet someone_else"}
    assert links(h) >= {"br-mine"} and "soda0" not in links(h)
    assert OTHER_SUBNET not in routes(h) and routes(h).get(NOT_OURS) != str(RTPROT_SODA)
    assert NOT_OURS in routes(h)

    again = teardown(h, config)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "nothing of node leaving left on this host"


def test_keep_routes_leaves_a_switch_of_the_host_its_routes(host, tmp_path):
    h = host["host"]
    run(["ip", "-n", h, "link", "add", "soda0", "type", "bridge"])
    # The host's fabric link, to another host (the test's other namespace).
    run(["ip", "-n", h, "link", "add", "fabric0", "type", "veth", "peer", "name", "fabric0",
         "netns", host["node"]])
    for link in ("soda0", "fabric0"):
        run(["ip", "-n", h, "link", "set", link, "up"])
    run(["ip", "-n", h, "addr", "add", f"{SUBNET_PREFIX}.1/24", "dev", "soda0"])
    run(["ip", "-n", h, "addr", "add", "10.237.95.1/24", "dev", "fabric0"])
    run(["ip", "-n", h, "route", "add", OTHER_SUBNET, "via", "10.237.95.200", "dev", "fabric0",
         "proto", str(RTPROT_SODA)])
    done = teardown(h, agent_config(tmp_path, ""), "--keep-routes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["removed bridge soda0"], done.stdout
    assert routes(h).get(OTHER_SUBNET) == str(RTPROT_SODA)
