"""Who may do what on the Master's API: every RPC, called by every
kind of caller over real mutual TLS, gives the expected allow,
PERMISSION_DENIED or UNAUTHENTICATED, and a refused call changes nothing.

Each caller gets a Master of its own with the same state: node-1 (agent
node-1's), tenant acme's image and services, tenant beta's image and
service, and a public image of the operators'. A call "allowed" may still
fail for a reason of its own (a node with guests cannot be removed); what
is checked is that it was not refused for who made it."""

from __future__ import annotations

import datetime
import os

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from soda import model, pki
from soda.proto.v1 import master_pb2 as pb
from soda.proto.v1 import master_pb2_grpc as pb_grpc
from soda.rpc import tls
from tests.support import make_ext4_image, master_channel, master_client, start_master, cluster_ca, tls_for

CAP = model.Resources(cpu=8, memory=8192, bandwidth=1000, disk=100_000)
RES = pb.Resources(cpu=0.5, memory_mib=64, bandwidth_mbit=10, disk_mib=64)
ALLOW, DENY, UNAUTH, TLS_REFUSED = "allow", "PERMISSION_DENIED", "UNAUTHENTICATED", "refused in TLS"

# caller -> (role, name) of its certificate; the last four are not valid callers.
CALLERS = {
    "agent": ("agent", "node-1"), "other-agent": ("agent", "node-2"), "switch": ("switch", "edge-1"),
    "tenant-a": ("tenant", "acme"), "tenant-b": ("tenant", "beta"), "operator": ("operator", "root"),
    "no-certificate": None, "foreign-ca": None, "revoked": None, "expired": None,
}


def allowed(*callers: str) -> dict[str, str]:
    """Expected outcome per valid caller: the ones named (and the operator) may."""
    valid = [c for c, ident in CALLERS.items() if ident is not None]
    return {c: ALLOW if c in callers or c == "operator" else DENY for c in valid}


def _image_request(name: str, path: str):
    data = open(path, "rb").read()
    from soda.rpc.client import sha256_file
    yield pb.PushImageRequest(header=pb.ImageHeader(name=name, size=len(data), digest=sha256_file(path)))
    yield pb.PushImageRequest(chunk=data)


def _spec(name: str, image: str, **kw) -> pb.ServiceSpec:
    return pb.ServiceSpec(name=name, image=image, nodes=1, resources=[RES], **kw)


# RPC -> (kind, request builder(caller, files), expected per valid caller). The
# requests act on what tenant acme, node node-1 and switch edge-1 own.
CALLS = {
    "CreateService": ("unary", lambda c, f: pb.CreateServiceRequest(spec=_spec(f"new-{c}", "a-img")),
                      allowed("tenant-a")),
    "GetService": ("unary", lambda c, f: pb.GetServiceRequest(name="a-web"), allowed("tenant-a")),
    "ListServices": ("unary", lambda c, f: pb.ListServicesRequest(), allowed("tenant-a", "tenant-b", "switch")),
    "FreezeService": ("unary", lambda c, f: pb.FreezeServiceRequest(name="a-web", vnodes=["7"]), allowed("tenant-a")),
    # No such virtual node: NOT_FOUND for who may ask.
    "MoveVnode": ("unary", lambda c, f: pb.MoveVnodeRequest(service="a-web", vnode="7"), allowed("tenant-a")),
    "ResizeService": ("unary", lambda c, f: pb.ResizeServiceRequest(name="a-web", nodes=2),
                      allowed("tenant-a")),
    "WatchServices": ("stream", lambda c, f: pb.WatchServicesRequest(name="a-web"), allowed("tenant-a")),
    "EnsureNodes": ("unary", lambda c, f: pb.EnsureNodesRequest(name="a-od", at_least=1), allowed("switch")),
    "ReleaseNodes": ("unary", lambda c, f: pb.ReleaseNodesRequest(name="a-od"), allowed("switch")),
    "RegisterNode": ("unary", lambda c, f: pb.RegisterNodeRequest(
        name="node-1", address="127.0.0.1", hypervisors=["fake"],
        capacity=pb.Resources(cpu=8, memory_mib=8192, bandwidth_mbit=1000, disk_mib=100_000)),
        allowed("agent")),
    "Heartbeat": ("unary", lambda c, f: pb.NodeStatus(node="node-1", complete=True), allowed("agent")),
    "ReportStatus": ("unary", lambda c, f: pb.NodeStatus(node="node-1"), allowed("agent")),
    "ListNodes": ("unary", lambda c, f: pb.ListNodesRequest(), allowed()),
    "WatchAssignments": ("stream", lambda c, f: pb.WatchAssignmentsRequest(node="node-1"), allowed("agent")),
    "WatchNodes": ("stream", lambda c, f: pb.WatchNodesRequest(), allowed("agent", "other-agent", "switch")),
    "PushImage": ("push", lambda c, f: _image_request(f"img-{c}", f), allowed("tenant-a", "tenant-b")),
    "ListImages": ("unary", lambda c, f: pb.ListImagesRequest(), allowed("tenant-a", "tenant-b")),
    "PullImage": ("stream", lambda c, f: pb.PullImageRequest(image="a-img"), allowed("agent", "tenant-a")),
    "DeleteImage": ("unary", lambda c, f: pb.DeleteImageRequest(image="a-img"), allowed("tenant-a")),
    "GetImage": ("unary", lambda c, f: pb.GetImageRequest(image="a-img"), allowed("tenant-a")),
    # A URL refused as such: an allowed caller gets past the access check
    # and fails later (INVALID_ARGUMENT); a denied one fails at it.
    "FetchImage": ("unary", lambda c, f: pb.FetchImageRequest(url="ftp://example.org/x"),
                   allowed("tenant-a", "tenant-b")),
    "GetImageTransfer": ("unary", lambda c, f: pb.Empty(), allowed("agent", "other-agent", "tenant-a",
                                                                 "tenant-b")),
    "PrimeImage": ("unary", lambda c, f: pb.PrimeImageRequest(image="a-img", nodes=["node-1"]), allowed()),
    # An Agent: of an image a virtual node on its node boots.
    "ImageBlockHashes": ("stream", lambda c, f: pb.ImageBlocksRequest(image="a-img"),
                         allowed("tenant-a", "agent")),
    # A disk nobody asked for: WRONG_STATE for the Agent that runs the
    # virtual node, PERMISSION_DENIED for any other.
    "PushVnodeDisk": ("push", lambda c, f: _image_request("a-web-0", f), allowed("agent")),
    "ReportSwitchStats": ("unary", lambda c, f: pb.SwitchReport(switch="edge-1"), allowed("switch")),
    "WatchEndpoints": ("stream", lambda c, f: pb.WatchEndpointsRequest(),
                       allowed("agent", "other-agent", "switch")),
    "SetQuota": ("unary", lambda c, f: pb.SetQuotaRequest(tenant="acme", quota=pb.Quota(vnodes=50)), allowed()),
    "ListTenants": ("unary", lambda c, f: pb.ListTenantsRequest(), allowed("tenant-a", "tenant-b")),
    "DrainNode": ("unary", lambda c, f: pb.NodeRequest(name="node-1"), allowed()),
    "UndrainNode": ("unary", lambda c, f: pb.NodeRequest(name="node-1"), allowed()),
    "DeleteService": ("unary", lambda c, f: pb.DeleteServiceRequest(name="a-web"), allowed("tenant-a")),
    "RemoveNode": ("unary", lambda c, f: pb.NodeRequest(name="node-1"), allowed("agent")),
    # No such virtual node: NOT_FOUND for who may ask (a node that is not
    # connected would answer UNAVAILABLE, which reads as a refused handshake here).
    "ServiceLogs": ("stream", lambda c, f: pb.ServiceLogsRequest(service="a-web", vnode="99"),
                    allowed("tenant-a")),
    "WatchLogOrders": ("stream", lambda c, f: pb.WatchLogOrdersRequest(node="node-1"), allowed("agent")),
    # An order nobody placed: NOT_FOUND for any Agent, bound to its node by the order itself.
    "SendLogs": ("push", lambda c, f: iter([pb.LogPart(id="no-such-order")]), allowed("agent", "other-agent")),
}


def test_the_matrix_names_every_rpc_of_the_master():
    assert set(CALLS) == set(pb.DESCRIPTOR.services_by_name["Master"].methods_by_name)


# ---- callers that may not call at all --------------------------------------------

def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _expired_operator(directory: str) -> tuple[bytes, bytes]:
    """An operator certificate of the tests' CA that expired yesterday."""
    ca = cluster_ca()
    with open(ca.file(pki.CA_KEY), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    with open(ca.file(pki.CA_CERT), "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "operator/old")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("soda://operator/old")]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _pem(key), cert.public_bytes(serialization.Encoding.PEM)


def _channel(caller: str, target: str, tmp_path) -> grpc.Channel:
    if CALLERS[caller] is not None:
        return master_channel(target, *CALLERS[caller])
    ca = open(cluster_ca().file(pki.CA_CERT), "rb").read()
    if caller == "no-certificate":
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca))
    if caller == "foreign-ca":
        other = pki.CertificateAuthority(str(tmp_path / "other-ca"))
        other.init("elsewhere")
        issued = other.issue("operator", "root")             # the same identity, another CA
        files = tls.TlsFiles(ca=ca, cert=open(other.file(issued.cert), "rb").read(),
                             key=open(other.file(issued.key), "rb").read())
        return tls.channel(target, files)
    if caller == "revoked":
        return master_channel(target, "operator", "revoked")
    key, cert = _expired_operator(str(tmp_path))
    return tls.channel(target, tls.TlsFiles(ca=ca, cert=cert, key=key))


@pytest.fixture(scope="module", autouse=True)
def revoked_operator():
    """An operator certificate of the tests' CA, revoked (its CRL says so)."""
    tls_for("operator", "revoked")
    cluster_ca().revoke("operator", "revoked")


# ---- the state every caller meets ---------------------------------------------------

@pytest.fixture
def cluster(tmp_path):
    server, target = start_master(str(tmp_path / "master"))
    op = master_client(target, "operator", "root")
    acme = master_client(target, "tenant", "acme")
    beta = master_client(target, "tenant", "beta")
    try:
        op.register_node("node-1", "127.0.0.1", CAP, ["fake"])
        acme.push_image(make_ext4_image(str(tmp_path / "a.img"), data=b"acme"), name="a-img")
        beta.push_image(make_ext4_image(str(tmp_path / "b.img"), data=b"beta"), name="b-img")
        op.push_image(make_ext4_image(str(tmp_path / "p.img"), data=b"public"), name="pub", public=True)
        web = model.parse_spec({"name": "a-web", "image": "a-img", "nodes": 1, "resources": {"cpu": 0.5}})
        acme.create_service(web)
        acme.create_service(model.parse_spec({"name": "a-od", "image": "a-img", "nodes": 0,
                                              "on_demand": {"max_nodes": 2}}))
        beta.create_service(model.parse_spec({"name": "b-web", "image": "b-img", "nodes": 1}))
        yield server, target
    finally:
        for c in (op, acme, beta):
            c.close()
        server.stop(grace=0)


def _call(channel: grpc.Channel, rpc: str, kind: str, request) -> grpc.StatusCode:
    stub = pb_grpc.MasterStub(channel)
    method = getattr(stub, rpc)
    try:
        if kind == "stream":
            stream = method(request, timeout=1.5)
            try:
                next(iter(stream))
            finally:
                stream.cancel()
        else:
            method(request, timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _outcome(code: grpc.StatusCode) -> str:
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return DENY
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return UNAUTH
    if code == grpc.StatusCode.UNAVAILABLE:
        return TLS_REFUSED           # the handshake failed: the call never reached the Master
    return ALLOW


def _snapshot(server) -> tuple:
    images = os.path.join(server.cfg.state_dir, "images")
    return server.store.revision(), sorted(os.listdir(images))


@pytest.mark.parametrize("caller", list(CALLERS))
def test_every_rpc_by_every_caller(caller, cluster, tmp_path):
    server, target = cluster
    image = make_ext4_image(str(tmp_path / f"push-{caller}.img"), data=caller.encode())
    channel = _channel(caller, target, tmp_path)
    got, wrong = {}, []
    try:
        for rpc, (kind, build, expected) in CALLS.items():
            want = expected.get(caller, UNAUTH if caller == "revoked" else TLS_REFUSED)
            before = _snapshot(server)
            got[rpc] = _outcome(_call(channel, rpc, kind, build(caller, image)))
            if got[rpc] != want:
                wrong.append(f"{rpc}: {got[rpc]}, expected {want}")
            if want != ALLOW:
                assert _snapshot(server) == before, f"{caller} {rpc} was refused but changed the state"
    finally:
        channel.close()
    assert not wrong, f"{caller}:\n" + "\n".join(wrong)
    if want == TLS_REFUSED:
        # Refused in the handshake, not because the Master was away: the
        # operator gets through at the same moment.
        with master_channel(target, "operator", "root") as ok:
            assert _call(ok, "ListNodes", "unary", pb.ListNodesRequest()) == grpc.StatusCode.OK
