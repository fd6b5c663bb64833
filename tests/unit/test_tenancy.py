"""Tenants on the Master's API, over real mutual TLS: what one sees of
another's, quotas at admission (and sodactl's exit 3), the revocation list
taken without a restart, the audit log, and a plaintext Master only on
loopback."""

from __future__ import annotations

import json
import logging
import time

import pytest
from click.testing import CliRunner

from soda import config as soda_config, errors, model
from soda.cli.sodactl import Session, cli
from soda.master.main import MasterServer
from tests.support import cluster_ca, make_ext4_image, master_client, master_config, start_master, tls_for

CAP = model.Resources(cpu=8, memory=8192, bandwidth=1000, disk=100_000)


def spec(name: str, image: str, nodes: int = 1, cpu: float = 0.5, **kw) -> model.ServiceSpec:
    return model.parse_spec({"name": name, "image": image, "nodes": nodes, "resources": {"cpu": cpu}, **kw})


@pytest.fixture
def cluster(tmp_path):
    server, target = start_master(str(tmp_path / "master"))
    clients = {"op": master_client(target, "operator", "root"),
               "acme": master_client(target, "tenant", "acme"),
               "beta": master_client(target, "tenant", "beta")}
    try:
        clients["op"].register_node("node-1", "127.0.0.1", CAP, ["fake"])
        clients["acme"].push_image(make_ext4_image(str(tmp_path / "a.img"), data=b"a"), name="a-img")
        clients["beta"].push_image(make_ext4_image(str(tmp_path / "b.img"), data=b"b"), name="b-img")
        yield server, target, clients, tmp_path
    finally:
        for c in clients.values():
            c.close()
        server.stop(grace=0)


def test_a_tenant_sees_and_changes_only_its_own(cluster):
    server, _, c, tmp_path = cluster
    c["acme"].create_service(spec("a-web", "a-img"))
    c["beta"].create_service(spec("b-web", "b-img"))
    assert [s.name for s in c["acme"].list_services()] == ["a-web"]
    assert [s.name for s in c["beta"].list_services()] == ["b-web"]
    assert {s.name: s.owner for s in c["op"].list_services()} == {"a-web": "acme", "b-web": "beta"}
    before = server.store.revision()
    for call in (lambda: c["beta"].get_service("a-web"), lambda: c["beta"].resize_service("a-web", 3),
                 lambda: c["beta"].delete_service("a-web"),
                 lambda: c["beta"].create_service(spec("b-copy", "a-img"))):
        with pytest.raises(errors.PermissionDenied, match="tenant beta may not"):
            call()
    assert server.store.revision() == before
    # Images: each sees its own (and public ones), owners of others hidden.
    assert [i.names for i in c["acme"].list_images()] == [("a-img",)]
    c["op"].push_image(make_ext4_image(str(tmp_path / "p.img"), data=b"p"), name="pub", public=True)
    assert sorted(i.names[0] for i in c["beta"].list_images()) == ["b-img", "pub"]
    c["beta"].create_service(spec("b-pub", "pub"))
    with pytest.raises(errors.PermissionDenied):
        c["beta"].delete_image("a-img")
    with pytest.raises(errors.PermissionDenied, match="another owner holds it"):
        c["beta"].push_image(make_ext4_image(str(tmp_path / "x.img"), data=b"x"), name="a-img")
    assert c["op"].list_images()[0].names == ("a-img",)           # still acme's content
    with pytest.raises(errors.PermissionDenied, match="may not make an image public"):
        c["beta"].push_image(make_ext4_image(str(tmp_path / "y.img"), data=b"y"), public=True)


def test_the_same_content_pushed_by_two_tenants_is_each_ones_until_both_let_go(cluster):
    _, _, c, tmp_path = cluster
    path = make_ext4_image(str(tmp_path / "same.img"), data=b"same")
    first = c["acme"].push_image(path, name="acme-same")
    second = c["beta"].push_image(path, name="beta-same")
    assert first.digest == second.digest and second.owners == ("beta",)     # beta does not learn of acme
    assert c["op"].list_images()[-1].owners == ("acme", "beta")
    c["acme"].delete_image(first.digest)
    assert [i.digest for i in c["beta"].list_images() if i.digest == first.digest]
    assert not [i for i in c["acme"].list_images() if i.digest == first.digest]
    c["beta"].delete_image(first.digest)
    assert not [i for i in c["op"].list_images() if i.digest == first.digest]


def test_quotas_refuse_at_admission_and_nothing_is_placed(cluster):
    server, _, c, tmp_path = cluster
    c["op"].set_quota("acme", model.Quota(cpu=1.5, vnodes=2))
    c["acme"].create_service(spec("a-web", "a-img", nodes=2, cpu=0.5))
    before = server.store.revision()
    with pytest.raises(errors.NoCapacity,
                       match="tenant acme would exceed its vnodes quota"):
        c["acme"].create_service(spec("a-two", "a-img", nodes=1, cpu=0.1))
    with pytest.raises(errors.NoCapacity, match="cpu quota"):
        c["acme"].resize_service("a-web", resources=[model.Resources(cpu=1.0, memory=64, bandwidth=10,
                                                                     disk=64)])
    assert server.store.revision() == before
    assert [s.name for s in c["op"].list_services()] == ["a-web"]
    # Shrinking is never refused; the tenant's listing shows use against quota.
    c["acme"].resize_service("a-web", 1)
    [acme] = c["acme"].list_tenants()
    assert (acme.name, acme.usage.vnodes, acme.quota.vnodes, acme.quota.memory) == ("acme", 1, 2, None)
    assert {t.name for t in c["op"].list_tenants()} == {"acme", "beta"}
    # On demand: the Switch's ensure counts against the owner's quota too.
    c["acme"].create_service(spec("a-od", "a-img", nodes=0, on_demand={"max_nodes": 4,
                                                                          "resources": {"cpu": 0.5}}))
    c["op"].ensure_nodes("a-od", 1)
    with pytest.raises(errors.NoCapacity, match="quota"):
        c["op"].ensure_nodes("a-od", 2)
    # Image bytes: refused before the content is sent, nothing kept.
    c["op"].set_quota("beta", model.Quota(image_bytes=5 << 20))
    with pytest.raises(errors.NoCapacity, match="image_bytes quota"):
        c["beta"].push_image(make_ext4_image(str(tmp_path / "big.img"), size=4 << 20, data=b"big"))
    assert len(c["op"].list_images()) == 2


def test_sodactl_over_quota_exits_3_naming_the_quota(cluster):
    _, target, c, _ = cluster
    c["op"].set_quota("acme", model.Quota(vnodes=1))

    def sodactl(*args, role=("tenant", "acme")):
        return CliRunner().invoke(cli, ["--master", target, *args], obj=Session(
            connect=lambda master, **kw: master_client(master, *role)))
    ok = sodactl("service", "create", "a-web", "--image", "a-img", "--nodes", "1")
    assert ok.exit_code == 0, ok.output
    over = sodactl("service", "create", "a-two", "--image", "a-img", "--nodes", "1")
    assert over.exit_code == 3 and "vnodes quota" in over.output
    listed = sodactl("-o", "json", "tenant", "list", role=("operator", "root"))
    assert json.loads(listed.output)[0]["quota"]["vnodes"] == 1
    table = sodactl("tenant", "set-quota", "acme", "--cpu", "2", "--unlimited", "vnodes",
                    role=("operator", "root"))
    assert table.exit_code == 0 and "CPU" in table.output
    assert c["op"].list_tenants()[0].quota == model.Quota(cpu=2.0)
    denied = sodactl("tenant", "set-quota", "acme", "--cpu", "9")
    assert denied.exit_code == 1 and "tenant acme may not call SetQuota" in denied.output


def test_a_revoked_certificate_is_refused_without_a_restart(tmp_path):
    server, target = start_master(str(tmp_path / "master"))
    tls_for("operator", "soon-revoked")
    client = master_client(target, "operator", "soon-revoked")
    try:
        client.list_nodes()
        cluster_ca().revoke("operator", "soon-revoked")
        deadline = time.monotonic() + 5
        while True:
            try:
                client.list_nodes()
            except errors.Unauthenticated as exc:
                assert "revoked" in str(exc)
                break
            assert time.monotonic() < deadline, "the Master still takes a revoked certificate"
            time.sleep(0.1)
    finally:
        client.close()
        server.stop(grace=0)


def test_every_mutating_call_and_refusal_is_audited(cluster, caplog):
    _, _, c, _ = cluster
    with caplog.at_level(logging.INFO, logger="soda.audit"):
        c["acme"].create_service(spec("a-web", "a-img"))
        with pytest.raises(errors.PermissionDenied):
            c["beta"].delete_service("a-web")
        c["acme"].list_services()                     # reads are not audited
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "soda.audit"]
    assert lines == [
        {"identity": "soda://tenant/acme", "action": "CreateService", "object": "a-web", "outcome": "OK"},
        {"identity": "soda://tenant/beta", "action": "DeleteService", "object": "a-web",
         "outcome": "PERMISSION_DENIED",
         "detail": "tenant beta may not delete service 'a-web': it belongs to another tenant"}]


def test_plaintext_only_on_loopback_and_only_when_asked(tmp_path):
    with pytest.raises(errors.InvalidSpec, match="serves mutual TLS"):
        MasterServer(soda_config.MasterConfig(listen="127.0.0.1:0", state_dir=str(tmp_path / "a")))
    with pytest.raises(errors.InvalidSpec, match="only on loopback"):
        MasterServer(master_config(str(tmp_path / "b"), insecure=True, listen="127.0.0.1:0,0.0.0.0:0"))
    server, target = start_master(str(tmp_path / "c"), insecure=True)
    try:
        from soda.rpc.client import MasterClient
        with MasterClient(target) as plain:
            assert plain.list_nodes() == []
        with master_client(target) as secure:     # a TLS client does not talk to it by mistake
            with pytest.raises(errors.SodaError):
                secure.list_nodes()
    finally:
        server.stop(grace=0)
