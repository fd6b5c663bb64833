"""Who a party of the cluster is, as its certificate names it
(`soda://ROLE/NAME`), and the names of the CA directory's files: what
soda.pki issues and reads back, without the cryptography it needs for
that (sodactl loads soda.pki only for its pki commands)."""

from __future__ import annotations

from dataclasses import dataclass

from soda.errors import InvalidSpec
from soda.model.names import check_dns_label

ROLES = ("master", "agent", "switch", "operator", "tenant")
# Days a certificate lives unless told: people's certificates are shorter
# (a lost laptop), machines' a year, the CA ten.
DEFAULT_DAYS = {"ca": 3650, "master": 365, "agent": 365, "switch": 365, "operator": 90, "tenant": 365}
SCHEME = "soda"
NAME_MAX = 63                        # a DNS label, as node and service names
CA_KEY, CA_CERT, CRL, ISSUED = "ca.key", "ca.crt", "crl.pem", "issued.json"
CRL_DAYS = 30        # a CRL's next_update: re-signed on each revoke, or by sodactl pki crl


@dataclass(frozen=True)
class Identity:
    role: str
    name: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}://{self.role}/{self.name}"

    def __str__(self) -> str:
        return f"{self.role} {self.name}"


def check_name(role: str, name: str) -> Identity:
    if role not in ROLES:
        raise InvalidSpec(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    return Identity(role, check_dns_label(role, name, NAME_MAX))
