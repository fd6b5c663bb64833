"""The cluster PKI (soda.pki) and `sodactl pki`: certificates are checked
with the cryptography package's own verification and by a real mutual-TLS
gRPC handshake on loopback, not by reading back what soda.pki wrote."""

from __future__ import annotations

import datetime
import json
import os
import stat
from concurrent import futures

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from soda import pki
from soda.cli.sodactl import cli
from soda.errors import AlreadyExists, InvalidSpec, NotFound


def load(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def ca(tmp_path):
    authority = pki.CertificateAuthority(str(tmp_path / "ca"))
    authority.init("test")
    return authority


def test_init_makes_a_ca_whose_key_only_root_reads_and_refuses_a_second(ca):
    assert mode(ca.path) == 0o700 and mode(ca.file(pki.CA_KEY)) == 0o600
    cert = load(ca.file(pki.CA_CERT))
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(cert)
    before = open(ca.file(pki.CA_KEY), "rb").read()
    with pytest.raises(AlreadyExists, match="already holds a CA"):
        ca.init("test")
    assert open(ca.file(pki.CA_KEY), "rb").read() == before
    assert pki.load_crl(ca.file(pki.CRL), cert) == frozenset()


@pytest.mark.parametrize("role", pki.ROLES)
def test_each_role_gets_a_certificate_naming_it_signed_by_the_ca(ca, role):
    entry = ca.issue(role, "n-1", hosts=["10.0.0.5", "m.example"] if role == "master" else ())
    cert, ca_cert = load(ca.file(entry.cert)), load(ca.file(pki.CA_CERT))
    cert.verify_directly_issued_by(ca_cert)
    assert pki.identity_of(cert) == pki.Identity(role, "n-1")
    assert mode(ca.file(entry.key)) == 0o600
    usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert (ExtendedKeyUsageOID.SERVER_AUTH in usages) == (role == "master")
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usages
    days = (cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).days
    assert days in (pki.DEFAULT_DAYS[role] - 1, pki.DEFAULT_DAYS[role])
    if role == "master":
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
        assert san.get_values_for_type(x509.DNSName) == ["m.example"]


def test_a_certificate_never_outlives_its_ca(tmp_path):
    authority = pki.CertificateAuthority(str(tmp_path / "short"))
    ca_cert = authority.init("test", days=10)
    cert = load(authority.file(authority.issue("agent", "node-1").cert))
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc


@pytest.mark.parametrize("role, name, kwargs, message", [
    ("king", "x", {}, "unknown role 'king'"),
    ("agent", "Node_1", {}, "invalid agent name 'Node_1'"),
    ("agent", "node-1", {"hosts": ["10.0.0.1"]}, "--host is for a master"),
    ("master", "m1", {"hosts": ["a b"]}, "neither an address nor a DNS name"),
    ("tenant", "acme", {"days": 0}, "--days must be 1 to 36500"),
])
def test_bad_requests_are_refused_and_issue_nothing(ca, role, name, kwargs, message):
    files = sorted(os.listdir(ca.path))
    with pytest.raises(InvalidSpec, match=message):
        ca.issue(role, name, **kwargs)
    assert sorted(os.listdir(ca.path)) == files and ca.list() == []


def test_one_valid_certificate_per_identity_until_it_is_revoked(ca):
    first = ca.issue("tenant", "acme")
    with pytest.raises(AlreadyExists, match="revoke it first"):
        ca.issue("tenant", "acme")
    revoked, = ca.revoke("tenant", "acme")
    assert revoked.serial == first.serial and revoked.state() == "revoked"
    ca_cert = load(ca.file(pki.CA_CERT))
    assert pki.load_crl(ca.file(pki.CRL), ca_cert) == {first.serial}
    second = ca.issue("tenant", "acme")
    assert [e.state() for e in ca.list()] == ["revoked", "valid"]
    assert pki.load_crl(ca.file(pki.CRL), ca_cert) == {first.serial}
    assert second.serial != first.serial
    with pytest.raises(NotFound, match="no unrevoked certificate of tenant beta"):
        ca.revoke("tenant", "beta")


def test_a_crl_or_certificate_from_another_ca_is_not_taken(ca, tmp_path):
    other = pki.CertificateAuthority(str(tmp_path / "other"))
    other.init("other")
    with pytest.raises(InvalidSpec, match="not signed by the cluster CA"):
        pki.load_crl(other.file(pki.CRL), load(ca.file(pki.CA_CERT)))
    with pytest.raises(NotFound, match="holds no CA"):
        pki.CertificateAuthority(str(tmp_path / "none")).list()


def test_identity_of_refuses_a_certificate_without_one(ca):
    with pytest.raises(InvalidSpec, match="no subjectAltName"):
        pki.identity_of(load(ca.file(pki.CA_CERT)))


# ---- a real mutual-TLS handshake with what the CA issued ----------------------

def _read(ca, name):
    with open(ca.file(name), "rb") as f:
        return f.read()


@pytest.fixture
def mtls_server(ca):
    """A gRPC server with the master's certificate that asks every client
    for one of the CA's; its one method answers with the caller's identity."""
    master = ca.issue("master", "m1", hosts=["127.0.0.1", "localhost"])

    def whoami(request: bytes, context) -> bytes:
        pem = context.auth_context()["x509_pem_cert"][0]
        return str(pki.identity_of(x509.load_pem_x509_certificate(pem))).encode()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Who", {"Am": grpc.unary_unary_rpc_method_handler(whoami)})])
    credentials = grpc.ssl_server_credentials([(_read(ca, master.key), _read(ca, master.cert))],
                                              root_certificates=_read(ca, pki.CA_CERT),
                                              require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield port
    server.stop(0)


def call(port: int, root: bytes, key: bytes | None = None, cert: bytes | None = None) -> str:
    credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=key,
                                               certificate_chain=cert)
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        return channel.unary_unary("/test.Who/Am")(b"", timeout=5).decode()


def test_mutual_tls_with_the_cas_certificates(ca, mtls_server, tmp_path):
    tenant = ca.issue("tenant", "acme")
    root = _read(ca, pki.CA_CERT)
    assert call(mtls_server, root, _read(ca, tenant.key), _read(ca, tenant.cert)) == "tenant acme"
    # No client certificate: the handshake fails.
    with pytest.raises(grpc.RpcError) as no_cert:
        call(mtls_server, root)
    assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
    # A certificate of another CA: refused at the handshake too.
    other = pki.CertificateAuthority(str(tmp_path / "other"))
    other.init("other")
    stranger = other.issue("tenant", "acme")
    with pytest.raises(grpc.RpcError) as foreign:
        call(mtls_server, root, _read(other, stranger.key), _read(other, stranger.cert))
    assert foreign.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- sodactl pki ---------------------------------------------------------------

def sodactl(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_sodactl_pki_init_issue_list_revoke(tmp_path):
    d = str(tmp_path / "pki")
    made = sodactl("pki", "init", "--dir", d, "--cluster", "demo")
    assert made.exit_code == 0 and "CA of cluster demo made in" in made.output
    issued = json.loads(sodactl("pki", "issue", "agent", "node-1", "--dir", d, "-o", "json").output)
    assert issued["role"] == "agent" and issued["state"] == "valid" and mode(issued["key"]) == 0o600
    again = sodactl("pki", "issue", "agent", "node-1", "--dir", d)
    assert again.exit_code == 1
    assert again.output.startswith("error: agent node-1 already has a valid certificate")
    assert len(again.output.strip().splitlines()) == 1
    revoked = sodactl("pki", "revoke", "agent", "node-1", "--dir", d)
    assert revoked.output.strip() == f"revoked agent node-1 (serial {issued['serial']})"
    table = sodactl("pki", "list", "--dir", d).output.splitlines()
    assert table[0].split() == ["SERIAL", "ROLE", "NAME", "STATE", "NOT", "AFTER", "CERTIFICATE"]
    assert table[1].split()[1:4] == ["agent", "node-1", "revoked"]
    bad = sodactl("pki", "revoke", "agent", "node-1", "--dir", d, "--serial", "xyz")
    assert bad.exit_code == 1 and "is not a hexadecimal serial" in bad.output
    missing = sodactl("pki", "list", "--dir", str(tmp_path / "none"))
    assert missing.exit_code == 1 and "holds no CA: make one with sodactl pki init" in missing.output


def test_sodactl_pki_crl_signs_the_list_again_with_what_was_revoked(tmp_path):
    d = str(tmp_path / "pki")
    sodactl("pki", "init", "--dir", d)
    serial = json.loads(sodactl("pki", "issue", "switch", "edge-1", "--dir", d, "-o", "json").output)["serial"]
    sodactl("pki", "revoke", "switch", "edge-1", "--dir", d)
    with open(os.path.join(d, pki.CRL), "rb") as f:
        before = x509.load_pem_x509_crl(f.read())
    done = sodactl("pki", "crl", "--dir", d)
    assert done.exit_code == 0 and "good for 30 days" in done.output
    with open(os.path.join(d, pki.CRL), "rb") as f:
        after = x509.load_pem_x509_crl(f.read())
    assert after.is_signature_valid(load(os.path.join(d, pki.CA_CERT)).public_key())
    assert [f"{r.serial_number:x}" for r in after] == [serial]
    assert after.next_update_utc >= before.next_update_utc
