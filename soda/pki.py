"""The cluster's small PKI: one CA, and the certificates of its parties,
each naming who it is in a SAN URI (`soda://ROLE/NAME`).

Owns the CA directory, which `sodactl pki` drives:

    ca.key, ca.crt          the cluster CA (EC P-256; the key 0600)
    crl.pem                 the revocation list, signed by the CA, re-made
                            on every revoke (a Master reloads it when it
                            changes: no restart)
    issued.json             what was issued: serial, role, name, files,
                            not_after, revoked_at
    ROLE-NAME.key/.crt      each party's key (0600) and certificate

Roles: `master` (a server certificate: serverAuth, with the DNS names and
addresses it is reached at, and clientAuth), `agent` (bound to its node
name), `switch`, `operator` and `tenant` (clientAuth). A certificate's
role and name are read back with `identity_of`, the one place that says
what a certificate means.

The directory is the CA's secret: made 0700, every key 0600, written
whole (a temporary file renamed over) so an interrupted issue leaves no
half file."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from soda.config import TlsConfig
from soda.errors import AlreadyExists, InvalidSpec, NotFound
from soda.files import write_file_atomic as _write
# What a certificate names and where the CA keeps its files live in
# soda.model.identity, which needs no cryptography (sodactl starts without
# loading it); they are reached here too, as pki.ROLES etc.
from soda.model.identity import (  # noqa: F401
    CA_CERT, CA_KEY, CRL, CRL_DAYS, DEFAULT_DAYS, ISSUED, NAME_MAX, ROLES, SCHEME, Identity, check_name)


@dataclass(frozen=True)
class Issued:
    serial: int
    role: str
    name: str
    not_after: str           # ISO 8601, UTC
    key: str                 # file names in the CA directory
    cert: str
    revoked_at: str = ""

    def state(self, now: datetime.datetime | None = None) -> str:
        now = now or _now()
        if self.revoked_at:
            return "revoked"
        return "expired" if datetime.datetime.fromisoformat(self.not_after) <= now else "valid"


def identity_of(cert: x509.Certificate) -> Identity:
    """Who a certificate says it is: its one soda:// SAN URI. Raises
    InvalidSpec when it has none, several, or one SODA does not know."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidSpec("the certificate names no SODA identity (no subjectAltName)") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(f"{SCHEME}://")]
    if len(uris) != 1:
        raise InvalidSpec(f"the certificate names {len(uris)} SODA identities, not one")
    role, _, name = uris[0][len(SCHEME) + 3:].partition("/")
    return check_name(role, name)


def identity_of_file(path: str) -> Identity:
    """Who the PEM certificate at `path` says it is (InvalidSpec if it
    cannot be read or names no SODA identity)."""
    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except OSError as exc:
        raise InvalidSpec(f"cannot read certificate {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidSpec(f"{path} is not a PEM certificate ({exc})") from None
    return identity_of(cert)


def own_name(role: str, configured: str, cert: str, fallback: Callable[[], str]) -> str:
    """The name a daemon of `role` goes by: its certificate's when it has
    one (a configured name must then agree), else `configured`, else
    `fallback()` (the host name)."""
    if not cert:
        return configured or fallback()
    identity = identity_of_file(cert)
    if identity.role != role:
        raise InvalidSpec(f"{cert} is the certificate of {identity}, not of a {role}")
    if configured and configured != identity.name:
        raise InvalidSpec(f"name {configured!r} but the certificate {cert} is {identity}: the Master "
                          f"would refuse every call (leave the name out, or issue a certificate for it)")
    return identity.name


class CertificateAuthority:
    """The CA directory `path` (see the module docstring)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # ---- init -------------------------------------------------------------
    def init(self, cluster: str, days: int = DEFAULT_DAYS["ca"]) -> x509.Certificate:
        """Make the CA; refuses to overwrite one."""
        check_name("operator", cluster)          # the same rule for a cluster's name
        if os.path.exists(self.file(CA_KEY)) or os.path.exists(self.file(CA_CERT)):
            raise AlreadyExists(f"{self.path} already holds a CA: a new one would orphan every "
                                f"certificate it issued (use another directory)")
        _check_days(days)
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"SODA cluster CA {cluster}")])
        now = _now()
        cert = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True, crl_sign=True,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256()))
        _write(self.file(CA_KEY), _key_pem(key), 0o600)
        _write(self.file(CA_CERT), cert.public_bytes(serialization.Encoding.PEM), 0o644)
        self._save([])
        self._write_crl(key, cert, [])
        return cert

    # ---- issue ------------------------------------------------------------
    def issue(self, role: str, name: str, days: int | None = None,
              hosts: Iterable[str] = ()) -> Issued:
        """A key and certificate for ROLE NAME, signed by the CA. `hosts`
        (DNS names or addresses) only for a master. Refuses a second valid
        certificate for the same identity: revoke the old one first."""
        identity = check_name(role, name)
        hosts = list(hosts)
        if hosts and role != "master":
            raise InvalidSpec("--host is for a master's certificate (the names clients dial)")
        days = DEFAULT_DAYS[role] if days is None else days
        _check_days(days)
        ca_key, ca_cert = self._load_ca()
        issued = self._load()
        now = _now()
        for entry in issued:
            if (entry.role, entry.name) == (role, name) and entry.state(now) == "valid":
                raise AlreadyExists(f"{identity} already has a valid certificate (serial "
                                    f"{entry.serial:x}, until {entry.not_after}): revoke it first "
                                    f"(sodactl pki revoke {role} {name})")
        key = ec.generate_private_key(ec.SECP256R1())
        san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        for host in hosts:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                if not re.match(r"^[A-Za-z0-9.-]+$", host):
                    raise InvalidSpec(f"--host {host!r} is neither an address nor a DNS name") from None
                san.append(x509.DNSName(host))
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role == "master":
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{role}/{name}")]))
                .issuer_name(ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=True, key_cert_sign=False, crl_sign=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        key_file, cert_file = _file_names(role, name)
        entry = Issued(serial=cert.serial_number, role=role, name=name,
                       not_after=not_after.isoformat(timespec="seconds"), key=key_file, cert=cert_file)
        _write(self.file(entry.key), _key_pem(key), 0o600)
        _write(self.file(entry.cert), cert.public_bytes(serialization.Encoding.PEM), 0o644)
        self._save([*issued, entry])
        return entry

    def tls(self, role: str, name: str) -> TlsConfig:
        """What ROLE NAME configures to speak TLS: the CA's certificate,
        and its own certificate and key in this directory."""
        key_file, cert_file = _file_names(role, name)
        return TlsConfig(ca=self.file(CA_CERT), cert=self.file(cert_file), key=self.file(key_file))

    # ---- list and revoke --------------------------------------------------
    def list(self) -> list[Issued]:
        self._load_ca()
        return self._load()

    def revoke(self, role: str, name: str, serial: int | None = None) -> list[Issued]:
        """Revoke ROLE NAME's certificates that are not yet revoked (or only
        the one with `serial`) and re-make the CRL; the revoked entries."""
        check_name(role, name)
        ca_key, ca_cert = self._load_ca()
        issued = self._load()
        now = _now()
        stamp = now.isoformat(timespec="seconds")
        hit = [e for e in issued if (e.role, e.name) == (role, name) and not e.revoked_at
               and (serial is None or e.serial == serial)]
        if not hit:
            raise NotFound(f"no unrevoked certificate of {role} {name}"
                           + (f" with serial {serial:x}" if serial is not None else ""))
        serials = {e.serial for e in hit}
        issued = [Issued(**{**e.__dict__, "revoked_at": stamp}) if e.serial in serials else e
                  for e in issued]
        self._write_crl(ca_key, ca_cert, issued)
        self._save(issued)
        return [e for e in issued if e.serial in serials]

    def refresh_crl(self) -> None:
        """Sign the CRL again (its next update moves CRL_DAYS ahead)."""
        ca_key, ca_cert = self._load_ca()
        self._write_crl(ca_key, ca_cert, self._load())

    # ---- files ------------------------------------------------------------
    def _load_ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        try:
            with open(self.file(CA_KEY), "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
            with open(self.file(CA_CERT), "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
        except FileNotFoundError:
            raise NotFound(f"{self.path} holds no CA: make one with sodactl pki init") from None
        except ValueError as exc:
            raise InvalidSpec(f"{self.path}: the CA's key or certificate is damaged ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise InvalidSpec(f"{self.path}: {CA_KEY} is not the key of {CA_CERT}")
        return key, cert

    def _load(self) -> list[Issued]:
        try:
            with open(self.file(ISSUED)) as f:
                return [Issued(**entry) for entry in json.load(f)]
        except FileNotFoundError:
            return []
        except (ValueError, TypeError) as exc:
            raise InvalidSpec(f"{self.file(ISSUED)} is damaged ({exc})") from None

    def _save(self, issued: list[Issued]) -> None:
        _write(self.file(ISSUED), json.dumps([e.__dict__ for e in issued], indent=1).encode(), 0o600)

    def _write_crl(self, key, cert: x509.Certificate, issued: list[Issued]) -> None:
        now = _now()
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(cert.subject)
                   .last_update(now - datetime.timedelta(minutes=5))
                   .next_update(now + datetime.timedelta(days=CRL_DAYS)))
        for entry in issued:
            if entry.revoked_at:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(entry.serial)
                    .revocation_date(datetime.datetime.fromisoformat(entry.revoked_at)).build())
        crl = builder.sign(key, hashes.SHA256())
        _write(self.file(CRL), crl.public_bytes(serialization.Encoding.PEM), 0o644)


def load_crl(path: str, ca_cert: x509.Certificate) -> frozenset[int]:
    """The revoked serials of the CRL at `path`, once its CA signature checks
    out (InvalidSpec otherwise): what a Master loads, and loads again when
    the file changes."""
    try:
        with open(path, "rb") as f:
            crl = x509.load_pem_x509_crl(f.read())
    except FileNotFoundError:
        raise NotFound(f"no revocation list at {path}") from None
    except ValueError as exc:
        raise InvalidSpec(f"{path} is not a revocation list ({exc})") from None
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):
        raise InvalidSpec(f"{path} is not signed by the cluster CA")
    return frozenset(r.serial_number for r in crl)


def _file_names(role: str, name: str) -> tuple[str, str]:
    """(key, certificate) file names of ROLE NAME in the CA directory."""
    return f"{role}-{name}.key", f"{role}-{name}.crt"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _check_days(days: int) -> None:
    if not 1 <= days <= 36500:
        raise InvalidSpec(f"--days must be 1 to 36500, not {days}")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
