"""TLS on SODA's gRPC connections: the files (soda.config.TlsConfig) read
once and checked, channels for clients, credentials for the Master, and
the command-line flags every party shares (--ca, --cert, --key).

The certificates are made by `sodactl pki` (soda.pki); what one means (its
role and name) is read by soda.master.access, not here.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import Sequence

import grpc

from soda.addresses import host_of
from soda.config import TlsConfig
from soda.errors import InvalidSpec

# An environment variable per file, so that sodactl (and scripts around it)
# need no flags: `export SODA_CA=... SODA_CERT=... SODA_KEY=...`.
ENV = {"ca": "SODA_CA", "cert": "SODA_CERT", "key": "SODA_KEY"}


@dataclass(frozen=True)
class TlsFiles:
    """The PEM bytes of a TlsConfig, read and checked for being whole."""
    ca: bytes
    cert: bytes
    key: bytes


def read(tls: TlsConfig, who: str = "") -> TlsFiles | None:
    """The files of `tls`, or None when it names none. InvalidSpec when only
    some are given or one cannot be read: a party never silently falls back
    to plaintext."""
    if not tls.enabled:
        return None
    missing = [f"tls.{name}" for name in ("ca", "cert", "key") if not getattr(tls, name)]
    if missing:
        raise InvalidSpec(f"{who or 'TLS'}: {', '.join(missing)} missing: give the CA, the "
                          f"certificate and its key together (sodactl pki issue makes them)")
    out = {}
    for name in ("ca", "cert", "key"):
        path = getattr(tls, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise InvalidSpec(f"cannot read tls.{name} {path}: {exc.strerror}") from None
        marker = b"PRIVATE KEY-----" if name == "key" else b"-----BEGIN CERTIFICATE-----"
        if marker not in data:
            raise InvalidSpec(f"tls.{name} {path} is not a PEM "
                              f"{'private key' if name == 'key' else 'certificate'}")
        out[name] = data
    return TlsFiles(**out)


def channel(target: str, files: TlsFiles | None, options: Sequence[tuple] = ()) -> grpc.Channel:
    """A channel to `target`: mutual TLS when `files` are given (the server
    must show a certificate of the same CA naming the host dialled),
    plaintext otherwise."""
    if files is None:
        return grpc.insecure_channel(target, options=list(options))
    credentials = grpc.ssl_channel_credentials(root_certificates=files.ca, private_key=files.key,
                                               certificate_chain=files.cert)
    return grpc.secure_channel(target, credentials, options=list(options))


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Credentials that make a client show a certificate of the cluster CA
    (the handshake fails otherwise: no certificate, another CA, expired)."""
    return grpc.ssl_server_credentials([(files.key, files.cert)], root_certificates=files.ca,
                                       require_client_auth=True)


def is_loopback(listen: str) -> bool:
    """Whether HOST:PORT listens on loopback only."""
    host = host_of(listen)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_flags(parser: argparse.ArgumentParser) -> None:
    """--ca, --cert and --key, as every SODA daemon takes them."""
    group = parser.add_argument_group("TLS (files made by sodactl pki)")
    group.add_argument("--ca", metavar="FILE", help="the cluster CA's certificate")
    group.add_argument("--cert", metavar="FILE", help="this party's certificate")
    group.add_argument("--key", metavar="FILE", help="this party's private key")


def flags(tls: TlsConfig | None) -> list[str]:
    """The --ca/--cert/--key a SODA daemon is started with for `tls`; none
    for plaintext."""
    return ["--ca", tls.ca, "--cert", tls.cert, "--key", tls.key] if tls and tls.enabled else []


def apply_flags(config, args: argparse.Namespace):
    """`config` (any config with a `tls` section) with the --ca, --cert and
    --key flags that were given laid over its section."""
    given = {name: getattr(args, name) for name in ("ca", "cert", "key")
             if getattr(args, name, None) is not None}
    return dataclasses.replace(config, tls=dataclasses.replace(config.tls, **given)) if given else config
