"""Who may call what on the Master's API: authentication from the client's
certificate, the role rules per RPC, and the audit log.

Every connection is mutual TLS (soda.rpc.tls): the handshake already
refuses a client without a certificate of the cluster CA, or with an
expired one. Here, per call, the certificate's identity (`soda://ROLE/NAME`,
soda.pki.identity_of) is read, checked against the CA's revocation list
(reloaded when the file changes: no restart), and matched with RULES:

- operator: everything;
- agent NAME: register, heartbeat, report, watch its assignments, remove
  only node NAME; watch the nodes and endpoints (its routes and policy);
  pull the images of virtual nodes placed on it; take log orders for its
  node and answer them (SendLogs, bound to its node by the order);
- switch NAME: watch the endpoints and nodes, report its stats as NAME,
  start and release the nodes of on-demand services, list services (its
  probe of the Master);
- tenant NAME: create services, and get, list, watch, resize and delete
  its own; push images, and list, pull and delete the ones it owns or that
  are public; read the consoles of its own services' guests.

What a tenant owns is decided with the state, by the Controller (its
`tenant` arguments); this module says which role may make a call at all and
binds agents and switches to their own names. A refusal is
PERMISSION_DENIED naming the identity and the action; a revoked or
unreadable certificate is UNAUTHENTICATED. Every call that changes state,
and every refusal, is one JSON line on the `soda.audit` logger: identity,
action, object, outcome. The gRPC interceptor that applies all this to
every call is soda.master.api.AccessInterceptor.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable

from cryptography import x509

from soda import pki
from soda.errors import InvalidSpec, NotFound, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)
audit = logging.getLogger("soda.audit")

# Who a plaintext caller is, on a Master started with --insecure (loopback only).
INSECURE_IDENTITY = pki.Identity("operator", "insecure")

AGENT, SWITCH, TENANT, OPERATOR = "agent", "switch", "tenant", "operator"

# RPC -> the roles besides the operator that may call it.
RULES: dict[str, frozenset[str]] = {
    "CreateService": frozenset({TENANT}),
    "GetService": frozenset({TENANT}),
    "ListServices": frozenset({TENANT, SWITCH}),
    "DeleteService": frozenset({TENANT}),
    "ResizeService": frozenset({TENANT}),
    "FreezeService": frozenset({TENANT}),
    "MoveVnode": frozenset({TENANT}),
    "WatchServices": frozenset({TENANT}),
    "EnsureNodes": frozenset({SWITCH}),
    "ReleaseNodes": frozenset({SWITCH}),
    "RegisterNode": frozenset({AGENT}),
    "Heartbeat": frozenset({AGENT}),
    "ReportStatus": frozenset({AGENT}),
    "ListNodes": frozenset(),
    "WatchAssignments": frozenset({AGENT}),
    "WatchNodes": frozenset({AGENT, SWITCH}),
    "DrainNode": frozenset(),
    "UndrainNode": frozenset(),
    "RemoveNode": frozenset({AGENT}),
    "PushImage": frozenset({TENANT}),
    "PushVnodeDisk": frozenset({AGENT}),
    "ListImages": frozenset({TENANT}),
    "DeleteImage": frozenset({TENANT}),
    "PullImage": frozenset({AGENT, TENANT}),
    "GetImage": frozenset({TENANT}),
    "FetchImage": frozenset({TENANT}),
    "PrimeImage": frozenset(),
    "GetImageTransfer": frozenset({AGENT, TENANT}),
    "ImageBlockHashes": frozenset({AGENT, TENANT}),
    "ReportSwitchStats": frozenset({SWITCH}),
    "WatchEndpoints": frozenset({AGENT, SWITCH}),
    "ServiceLogs": frozenset({TENANT}),
    "WatchLogOrders": frozenset({AGENT}),
    "SendLogs": frozenset({AGENT}),
    "SetQuota": frozenset(),
    "ListTenants": frozenset({TENANT}),
}
# The request field that names the caller itself, for the roles bound to
# their own name: an Agent acts only as its node, a Switch only as itself.
OWN_NAME: dict[str, dict[str, str]] = {
    AGENT: {"RegisterNode": "name", "Heartbeat": "node", "ReportStatus": "node",
            "WatchAssignments": "node", "RemoveNode": "name", "WatchLogOrders": "node"},
    SWITCH: {"ReportSwitchStats": "switch"},
}
# Calls that change state: each is written to the audit log.
MUTATING = frozenset({"CreateService", "DeleteService", "ResizeService", "MoveVnode", "EnsureNodes",
                      "ReleaseNodes", "PushVnodeDisk",
                      "RegisterNode", "DrainNode", "UndrainNode", "RemoveNode", "PushImage", "DeleteImage",
                      "SetQuota"})
MASTER_SERVICE = "/soda.proto.v1.Master/"
# Other services on the Master's port: health for everyone who proved who
# they are; anything else (reflection) for operators only, as every method
# RULES does not name.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# Fields that name what a call acts on, in the order looked for.
OBJECT_FIELDS = ("name", "node", "image", "service", "switch", "tenant")
CRL_CHECK_SECONDS = 1.0
_CACHE_MAX = 4096


class Authenticator:
    """The identity of a call's client certificate. `ca` (PEM) signs the
    revocation list at `crl` ("" = none kept), which is read again when
    it changes on disk."""

    def __init__(self, ca: bytes | None, crl: str = "", monotonic: Callable[[], float] = time.monotonic):
        self.ca = x509.load_pem_x509_certificate(ca) if ca else None
        self.crl = crl
        self.monotonic = monotonic
        self._lock = threading.Lock()
        self._identities: dict[bytes, tuple[pki.Identity, int]] = {}
        self._revoked: frozenset[int] = frozenset()
        self._crl_seen: tuple[int, int] | None = None
        self._crl_checked = float("-inf")
        if self.ca is not None and crl:
            self.reload_crl(force=True)

    @property
    def insecure(self) -> bool:
        return self.ca is None

    def reload_crl(self, force: bool = False) -> None:
        """Read the CRL again if it changed (at most once a second). A CRL
        that does not verify is logged and the last good one kept: a bad
        file must not open the door to revoked certificates."""
        now = self.monotonic()
        if not force and now - self._crl_checked < CRL_CHECK_SECONDS:
            return
        self._crl_checked = now
        try:
            st = os.stat(self.crl)
        except OSError as exc:
            if force:
                raise InvalidSpec(f"cannot read the revocation list {self.crl}: {exc.strerror}") from None
            log.error("revocation list %s: %s; keeping the last one read", self.crl, exc.strerror)
            return
        seen = (st.st_mtime_ns, st.st_size)
        if seen == self._crl_seen:
            return
        try:
            revoked = pki.load_crl(self.crl, self.ca)
        except (InvalidSpec, NotFound) as exc:
            if force:
                raise
            log.error("revocation list %s: %s; keeping the last one read", self.crl, exc)
            return
        with self._lock:
            changed = revoked != self._revoked
            self._revoked, self._crl_seen = revoked, seen
        if changed and not force:
            log.info("revocation list %s reloaded: %d certificate(s) revoked", self.crl, len(revoked))

    def identify(self, context) -> pki.Identity:
        """The caller's identity; raises Unauthenticated."""
        if self.insecure:
            return INSECURE_IDENTITY
        pems = (context.auth_context() or {}).get("x509_pem_cert") or []
        if not pems:
            raise Unauthenticated("no client certificate")
        pem = pems[0]
        with self._lock:
            known = self._identities.get(pem)
        if known is None:
            try:
                cert = x509.load_pem_x509_certificate(pem)
                known = (pki.identity_of(cert), cert.serial_number)
            except (ValueError, InvalidSpec) as exc:
                raise Unauthenticated(f"the client certificate names no SODA identity: {exc}") from None
            with self._lock:
                if len(self._identities) >= _CACHE_MAX:
                    self._identities.clear()
                self._identities[pem] = known
        identity, serial = known
        if self.crl:
            self.reload_crl()
        if serial in self._revoked:
            raise Unauthenticated(f"the certificate of {identity} (serial {serial:x}) is revoked")
        return identity


def authorize(identity: pki.Identity, method: str, request: Any = None) -> None:
    """Raise PermissionDenied unless `identity` may call `method` (its full
    gRPC name) with `request` (None for a stream of requests)."""
    if identity.role == OPERATOR:
        return
    if method.startswith(OPEN_PREFIXES):
        return
    action = method.rsplit("/", 1)[-1]
    allowed = RULES.get(action) if method.startswith(MASTER_SERVICE) else None
    if allowed is None or identity.role not in allowed:
        raise PermissionDenied(f"{identity} may not call {action}"
                               + ("" if allowed is None else f" (allowed to: operator"
                                  f"{''.join(', ' + r for r in sorted(allowed))})"))
    own = OWN_NAME.get(identity.role, {}).get(action)
    if own is not None and request is not None:
        named = getattr(request, own, "")
        if named != identity.name:
            raise PermissionDenied(f"{identity} may not call {action} for {own} {named!r}: only for "
                                   f"its own name {identity.name!r}")


def object_of(request: Any) -> str:
    """What a call acts on, for the audit log."""
    if request is None:
        return ""
    for name in OBJECT_FIELDS:
        value = getattr(request, name, None)
        if isinstance(value, str) and value:
            return value
    spec = getattr(request, "spec", None)
    return getattr(spec, "name", "") if spec is not None else ""


def record(identity: pki.Identity | None, action: str, obj: str, outcome: str, detail: str = "") -> None:
    """One audit line (JSON): who, what, on what, and how it ended."""
    entry = {"identity": identity.uri if identity else "", "action": action, "object": obj,
             "outcome": outcome}
    if detail:
        entry["detail"] = detail
    audit.info("%s", json.dumps(entry, sort_keys=True))


def caller(context) -> pki.Identity:
    """The identity the interceptor admitted for this call. Fails closed: a
    call that did not pass the interceptor has no identity."""
    identity = getattr(context, "soda_identity", None)
    if identity is None:
        raise Unauthenticated("the call was not authenticated")
    return identity


def tenant_of(identity: pki.Identity) -> str | None:
    """The tenant a caller acts as, or None for one that is not a tenant
    (operators, agents, switches: their rules are the role's)."""
    return identity.name if identity.role == TENANT else None
