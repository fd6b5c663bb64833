"""ASP tenants: who owns a service or an image, what a tenant may see, and
its quota.

A tenant is named by its certificate (`soda://tenant/NAME`, soda.pki). A
service belongs to the tenant that created it; an image to every tenant
that pushed its content (a tenant who sends the whole content has proven
it holds it) and to the operators, and is seen by all when an operator
marked it public. The owner "" is the operators': what they create, and
everything made before tenants existed.

A quota caps what a tenant's services ask for in sum (per virtual node
resources times nodes, and the count of virtual nodes) and the bytes of
the images it owns. A field left unset is not limited; a tenant with no
quota at all is not limited either (an operator sets one with `sodactl
tenant set-quota`)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Iterable

from soda.errors import InvalidSpec, PermissionDenied, QuotaExceeded
from soda.model.names import check_dns_label

if TYPE_CHECKING:
    from soda.model.state import Image, Service

OPERATORS = ""               # the owner of what operators make
TENANT_NAME_MAX = 63

# field -> (unit shown, what it counts)
QUOTA_FIELDS = {
    "cpu": ("cores", "CPU of all its virtual nodes"),
    "memory": ("MiB", "memory of all its virtual nodes"),
    "bandwidth": ("Mbit/s", "bandwidth of all its virtual nodes"),
    "disk": ("MiB", "disk of all its virtual nodes"),
    "vnodes": ("", "virtual nodes"),
    "image_bytes": ("bytes", "bytes of the images it owns"),
}


def check_tenant_name(name: str) -> str:
    return check_dns_label("tenant", name, TENANT_NAME_MAX)


@dataclass(frozen=True)
class Quota:
    """None: not limited."""
    cpu: float | None = None
    memory: int | None = None
    bandwidth: int | None = None
    disk: int | None = None
    vnodes: int | None = None
    image_bytes: int | None = None

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (isinstance(value, bool) or value < 0):
                raise InvalidSpec(f"quota {f.name} must be a number of 0 or more, got {value!r}")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TenantUsage:
    """What a tenant's services and images take, the same fields as Quota."""
    cpu: float = 0.0
    memory: int = 0
    bandwidth: int = 0
    disk: int = 0
    vnodes: int = 0
    image_bytes: int = 0

    def as_dict(self) -> dict:
        return {f.name: round(getattr(self, f.name), 6) for f in fields(self)}


@dataclass(frozen=True)
class Tenant:
    name: str
    quota: Quota = Quota()
    usage: TenantUsage = TenantUsage()
    services: int = 0
    images: int = 0


# `tenant` below: the tenant a call acts as, or None for a caller that is
# not a tenant (operators, agents, switches: their role's rules apply).

def owned_by(service: "Service", tenant: str | None, action: str) -> "Service":
    """`service`, if `tenant` may `action` it: only its own."""
    if tenant is not None and service.owner != tenant:
        raise PermissionDenied(f"tenant {tenant} may not {action} service {service.name!r}: it "
                               f"belongs to another tenant")
    return service


def may_use(image: "Image", tenant: str | None) -> bool:
    return tenant is None or image.public or tenant in image.owners


def check_image_use(image: "Image", tenant: str | None, action: str) -> None:
    if not may_use(image, tenant):
        raise PermissionDenied(f"tenant {tenant} may not {action}: the image is neither its own nor public")


def as_seen_by(image: "Image", tenant: str | None) -> "Image":
    """A tenant sees whether it owns an image, not who else does."""
    if tenant is None:
        return image
    return replace(image, owners=tuple(o for o in image.owners if o == tenant))


def usage_of(tenant: str, specs: Iterable, images: Iterable) -> TenantUsage:
    """What `tenant` takes: the resources its services' specs ask for (one
    entry per virtual node) and the sizes of the images it owns. `specs`
    are (owner, ServiceSpec) pairs; `images` model.Image."""
    cpu, memory, bandwidth, disk, vnodes = 0.0, 0, 0, 0, 0
    for owner, spec in specs:
        if owner != tenant:
            continue
        for res in spec.resources:
            cpu += res.cpu
            memory += res.memory
            bandwidth += res.bandwidth
            disk += res.disk
        vnodes += len(spec.resources)
    image_bytes = sum(i.stored_size for i in images if tenant in i.owners)
    return TenantUsage(cpu=cpu, memory=memory, bandwidth=bandwidth, disk=disk, vnodes=vnodes,
                       image_bytes=image_bytes)


def check_quota(tenant: str, quota: Quota, usage: TenantUsage) -> None:
    """Raise QuotaExceeded (RESOURCE_EXHAUSTED, sodactl exit 3) naming the
    first quota that `usage` (what the tenant would take) goes over."""
    for name, (unit, what) in QUOTA_FIELDS.items():
        limit = getattr(quota, name)
        used = getattr(usage, name)
        if limit is not None and used > limit + 1e-9:
            unit = f" {unit}" if unit else ""
            raise QuotaExceeded(f"tenant {tenant} would exceed its {name} quota: {what} would be "
                                f"{round(used, 6)}{unit}, its quota is {limit}{unit} (an operator "
                                f"raises it with sodactl tenant set-quota {tenant} --{name.replace('_', '-')} N)",
                                resource=name)
