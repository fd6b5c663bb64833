"""The certificates of a local cluster: its own CA under STATE_DIR/pki and
one certificate per part, made with soda.pki as an operator would with
`sodactl pki` (init once, then issue).

`up` makes them (the Master's for the addresses it listens on) and `down`
removes them with the rest of the cluster: after the next `up`, a shell
asks `soda-devcluster env` again. Within one run, the Master's certificate
is issued anew when the cluster is prepared again (the old one revoked).
"""

from __future__ import annotations

import os
from typing import Iterable

from soda import pki
from soda.config import TlsConfig
from soda.rpc.tls import ENV

PKI_DIR = "pki"
CLUSTER = "devcluster"
MASTER = "master"
SWITCH = "switch"
OPERATOR = "admin"            # who sodactl is in a local cluster


def pki_dir(state_dir: str) -> str:
    return os.path.join(state_dir, PKI_DIR)


def _authority(state_dir: str) -> pki.CertificateAuthority:
    ca = pki.CertificateAuthority(pki_dir(state_dir))
    if not os.path.exists(ca.file(pki.CA_CERT)):
        ca.init(CLUSTER)
    return ca


def ensure(state_dir: str, master_hosts: Iterable[str], agents: Iterable[str]) -> None:
    """The CA, a Master certificate for `master_hosts` (made anew), and a
    certificate for each Agent in `agents`, the Switch and the operator
    (kept while valid)."""
    ca = _authority(state_dir)
    valid = {(e.role, e.name) for e in ca.list() if e.state() == "valid"}
    if ("master", MASTER) in valid:
        ca.revoke("master", MASTER)
    hosts = sorted(set(master_hosts) | {"127.0.0.1", "localhost"})
    ca.issue("master", MASTER, hosts=hosts)
    for role, name in [("agent", a) for a in agents] + [("switch", SWITCH), ("operator", OPERATOR)]:
        if (role, name) not in valid:
            ca.issue(role, name)


def tls_of(state_dir: str, role: str, name: str) -> TlsConfig:
    """The files of ROLE NAME's certificate in the cluster's PKI."""
    return pki.CertificateAuthority(pki_dir(state_dir)).tls(role, name)


def operator_tls(state_dir: str) -> TlsConfig:
    return tls_of(state_dir, "operator", OPERATOR)


def operator_env(state_dir: str) -> dict[str, str]:
    """SODA_CA, SODA_CERT and SODA_KEY for sodactl as the cluster's operator."""
    tls = operator_tls(state_dir)
    return {ENV["ca"]: tls.ca, ENV["cert"]: tls.cert, ENV["key"]: tls.key}


def sodactl_env(state_dir: str) -> dict[str, str]:
    """This process's environment plus the operator's files: what sodactl
    runs in against the cluster."""
    return {**os.environ, **operator_env(state_dir)}
