"""The smallest guest each node boots: what an Agent registers,
how the Master stores it, and the admission check that refuses a smaller
virtual node with INVALID_ARGUMENT before anything is created."""

import json
import os
import sqlite3

import grpc
import pytest

from soda import model
from soda.errors import InvalidSpec, NoCapacity, NotFound, SodaError
from soda.hypervisors import kernels
from soda.hypervisors.uml import UmlDriver
from soda.master.scheduler import place
from soda.master.store import SCHEMA_VERSION, open_store, update_of
from soda.proto.v1 import master_pb2 as pb
from soda.proto.v1 import master_pb2_grpc as pb_grpc
from soda.rpc import convert
from tests.support import master_channel, master_client
from tests.unit.test_store import _as_version_7

CAP = model.Resources(2, 4096, 1000, 100_000)
SODA_UML = model.DriverCapabilities("uml", 16, "/cache/k/linux (soda)")
DEBIAN_UML = model.DriverCapabilities("uml", 32, "/usr/bin/linux.uml (debian)")
QEMU = model.DriverCapabilities("qemu", 96, "/boot/vmlinuz-6.1.0-1-amd64")


def node(name, limits=(), hypervisors=("uml", "qemu"), memory=4096):
    return model.Node(name=name, address="127.0.0.1", capacity=model.Resources(2, memory, 1000, 100_000),
                      hypervisors=hypervisors, limits=tuple(limits))


def req(memory):
    return model.Resources(0.5, memory, 10, 100)


# ---- scheduler ----------------------------------------------------------------

def test_below_the_minimum_is_invalid_and_names_value_minimum_and_kernel():
    with pytest.raises(InvalidSpec) as info:
        place([node("a", [DEBIAN_UML, QEMU])], [req(64), req(24)], hypervisor="uml",
              labels=["web-0", "web-1"])
    text = str(info.value)
    assert "web-1 asks for 24 MiB" in text
    assert "minimum of 32 MiB" in text and "/usr/bin/linux.uml (debian)" in text and "on a" in text


def test_at_the_minimum_places():
    [p] = place([node("a", [DEBIAN_UML])], [req(32)], hypervisor="uml")
    assert (p.node, p.hypervisor) == ("a", "uml")


def test_goes_to_the_node_whose_kernel_boots_that_small():
    nodes = [node("a", [DEBIAN_UML]), node("b", [SODA_UML])]
    assert [p.node for p in place(nodes, [req(16), req(16)], hypervisor="uml")] == ["b", "b"]
    # The error names the most lenient kernel on offer.
    with pytest.raises(InvalidSpec, match=r"minimum of 32 MiB for uml guests with kernel .*debian"):
        place([node("a", [DEBIAN_UML]), node("c", [DEBIAN_UML])], [req(16)], hypervisor="uml")


def test_qemu_minimum_and_no_hypervisor_named():
    with pytest.raises(InvalidSpec, match="64 MiB.*minimum of 96 MiB for qemu guests"):
        place([node("a", [SODA_UML, QEMU])], [req(64)], hypervisor="qemu")
    # Without a named hypervisor the node's first that boots it is taken.
    [p] = place([node("a", [SODA_UML, QEMU])], [req(16)])
    assert p.hypervisor == "uml"
    [p] = place([node("a", [SODA_UML, QEMU], hypervisors=("qemu", "uml"))], [req(128)])
    assert p.hypervisor == "qemu"
    [p] = place([node("a", [SODA_UML, QEMU], hypervisors=("qemu", "uml"))], [req(64)])
    assert p.hypervisor == "uml"                  # too small for qemu there


def test_too_small_comes_before_a_shortage_and_shortage_counts_only_bootable_nodes():
    full_soda = node("b", [SODA_UML], memory=16)
    with pytest.raises(InvalidSpec):
        place([node("a", [DEBIAN_UML])], [req(16), req(100_000)], hypervisor="uml")
    # b boots 16 MiB guests but has room for one only; a has room but cannot boot them.
    with pytest.raises(NoCapacity) as info:
        place([node("a", [DEBIAN_UML]), full_soda], [req(16), req(16)], hypervisor="uml")
    assert info.value.resource == "memory" and "(b)" in str(info.value)


def test_a_node_without_limits_accepts_what_the_spec_allows():
    [p] = place([node("a", hypervisors=("fake",))], [req(16)])
    assert p.hypervisor == "fake"


# ---- what the Agent registers ---------------------------------------------------

def test_agent_registers_the_minimum_of_the_kernel_its_uml_driver_boots(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    build = cache / "6.1-abc"
    build.mkdir(parents=True)
    (build / "linux").write_text("#!/bin/sh\n")
    os.chmod(build / "linux", 0o755)
    (build / "metadata.json").write_text(json.dumps({"min_memory_mib": 16}))
    os.symlink(build, cache / "current")
    monkeypatch.setenv(kernels.CACHE_ENV, str(cache))
    soda = UmlDriver(str(tmp_path / "s1"))           # "auto": the SODA kernel in the cache
    debian = UmlDriver(str(tmp_path / "s2"), kernel=kernels.DEBIAN_KERNEL)
    common = dict(memory_overhead=32, live_memory=True, freeze=True, disk_bound=True, plumbing=True,
                  migration="copy")
    assert soda.capabilities() == model.DriverCapabilities(
        "uml", 16, f"{build / 'linux'} (soda)", **common)
    assert debian.capabilities() == model.DriverCapabilities(
        "uml", kernels.DEBIAN_MIN_MEMORY, f"{kernels.DEBIAN_KERNEL} (debian)", **common)
    found = debian.fingerprint()
    assert debian.capabilities(found).attributes == {"kernel_kind": "debian"}


def test_limits_cross_the_wire_unchanged():
    n = node("a", [SODA_UML, QEMU])
    assert convert.node_from_pb(convert.node_to_pb(n)).limits == n.limits


# ---- the store --------------------------------------------------------------------

def _node_with_limits(limits):
    return model.Node(name="a", address="127.0.0.1", capacity=CAP, hypervisors=("uml", "qemu"),
                      subnet="10.0.1.0/24", gateway="10.0.1.1", limits=tuple(limits))


def _register(store, node):
    with store.transaction() as tx:
        try:
            tx.put_node(update_of(tx.get_node(node.name), node))
        except NotFound:
            tx.put_node(node)


def test_store_keeps_limits_across_a_restart_and_replaces_them_on_registration(tmp_path):
    s = open_store(str(tmp_path))
    _register(s, _node_with_limits([DEBIAN_UML, QEMU]))
    s.close()
    s = open_store(str(tmp_path))
    assert s.get_node("a").limits == (DEBIAN_UML, QEMU)
    _register(s, _node_with_limits([SODA_UML]))
    assert s.get_node("a").limits == (SODA_UML,)
    s.close()


def _downgrade_to_v1(path):
    """The file as a version 1 Master left it: no nodes.limits (nor later) column."""
    _as_version_7(path)
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE nodes DROP COLUMN limits")
    db.execute("ALTER TABLE nodes DROP COLUMN assumed")
    db.execute("ALTER TABLE nodes DROP COLUMN labels")
    db.execute("ALTER TABLE nodes DROP COLUMN draining")
    for column in ("moved_from", "moved_at", "moved_why"):
        db.execute(f"ALTER TABLE vnodes DROP COLUMN {column}")
    for table in ("nodes", "images", "services", "vnodes"):
        db.execute(f"ALTER TABLE {table} DROP COLUMN revision")
    db.execute("DELETE FROM meta WHERE key='revision'")
    db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    db.commit()
    db.close()


def test_a_version_1_store_is_migrated_and_keeps_its_nodes(tmp_path):
    s = open_store(str(tmp_path))
    _register(s, _node_with_limits([DEBIAN_UML]))
    s.close()
    _downgrade_to_v1(str(tmp_path / "state.db"))
    s = open_store(str(tmp_path))
    assert s.schema_version() == SCHEMA_VERSION
    migrated = s.get_node("a")
    assert migrated.limits == () and migrated.assumed == () and migrated.subnet == "10.0.1.0/24"
    assert migrated.labels == {}
    s.close()


def test_a_newer_store_is_refused(tmp_path):
    open_store(str(tmp_path)).close()
    db = sqlite3.connect(str(tmp_path / "state.db"))
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(SodaError, match=f"schema version 99, newer than the {SCHEMA_VERSION}"):
        open_store(str(tmp_path))


# ---- through the Master's API ----------------------------------------------------

@pytest.fixture
def client(master, image_file):
    c = master_client(master[1])
    c.push_image(image_file, name="busybox")
    yield c
    c.close()


def spec(memory, nodes=2, **kw):
    return model.parse_spec({"name": "web", "image": "busybox", "nodes": nodes, "hypervisor": "uml",
                             "resources": {"memory": memory}, **kw})


def test_create_below_the_minimum_is_invalid_argument_and_creates_nothing(client, master):
    node_a = client.register_node("a", "127.0.0.1", CAP, ["uml", "qemu"], [DEBIAN_UML, QEMU])
    assert node_a.limits == (DEBIAN_UML, QEMU)
    assert {n.name: n.limits for n in client.list_nodes()} == {"a": (DEBIAN_UML, QEMU)}
    channel = master_channel(master[1])
    try:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.MasterStub(channel).CreateService(
                pb.CreateServiceRequest(spec=convert.spec_to_pb(spec(24))))
    finally:
        channel.close()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "24 MiB" in info.value.details() and "32 MiB" in info.value.details()
    assert "linux.uml" in info.value.details()
    assert client.list_services() == []
    assert client.list_nodes()[0].allocated == model.Resources()
    svc = client.create_service(spec(32))
    assert [v.resources.memory for v in svc.vnodes] == [32, 32]


def test_resize_memory_below_the_minimum_is_refused(client):
    client.register_node("a", "127.0.0.1", CAP, ["uml"], [DEBIAN_UML])
    client.create_service(spec(64))
    with pytest.raises(InvalidSpec, match="web-0 asks for 16 MiB"):
        client.resize_service("web", nodes=None, resources=[req(16)])
    assert [v.resources.memory for v in client.get_service("web").vnodes] == [64, 64]


def test_registration_with_bad_limits_is_refused(client):
    with pytest.raises(InvalidSpec, match="does not offer"):
        client.register_node("a", "127.0.0.1", CAP, ["uml"], [QEMU])
    with pytest.raises(InvalidSpec, match="twice"):
        client.register_node("a", "127.0.0.1", CAP, ["uml"], [SODA_UML, DEBIAN_UML])
    assert client.list_nodes() == []
