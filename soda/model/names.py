"""Names in SODA and the rules they obey: services, nodes, virtual nodes,
images and hypervisors. Matched as whole strings ("\\Z", not "$", which
also matches before a trailing newline: "web\\n" would pass and its guest
never start)."""

from __future__ import annotations

import re
from typing import Any

from soda.errors import InvalidSpec

# A hypervisor driver's name (uml, qemu, fake, or a plugin's): which drivers
# exist is each node's business (its Agent's registry); the Master knows a
# hypervisor only from the nodes that offer it and what they declare of it.
_HYPERVISOR_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}\Z")
# A DNS label; services leave room for the "-NNN" virtual node suffix.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
SERVICE_NAME_MAX = 50
NODE_NAME_MAX = 63
IMAGE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}\Z")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")


def check_dns_label(kind: str, name: Any, max_len: int) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidSpec(f"{kind} name is required")
    if len(name) > max_len or not _DNS_LABEL.match(name):
        raise InvalidSpec(
            f"invalid {kind} name {name!r}: use lowercase letters, digits and '-', "
            f"start and end with a letter or digit, at most {max_len} characters")
    return name


def check_image_ref(ref: Any) -> str:
    if not isinstance(ref, str) or not ref:
        raise InvalidSpec("image is required (a name or sha256:<hex> digest)")
    if DIGEST_RE.match(ref) or IMAGE_NAME_RE.match(ref):
        return ref
    raise InvalidSpec(f"invalid image reference {ref!r}: expected a name "
                      "([a-z0-9._-], at most 128 characters) or sha256:<64 hex digits>")


def check_image_name(name: Any) -> str:
    if not isinstance(name, str) or not IMAGE_NAME_RE.match(name) or name.startswith("sha256"):
        raise InvalidSpec(f"invalid image name {name!r}: use [a-z0-9._-], start with a letter "
                          "or digit, at most 128 characters")
    return name


def check_hypervisor_name(name: Any) -> str:
    if not isinstance(name, str) or not _HYPERVISOR_NAME.match(name):
        raise InvalidSpec(f"invalid hypervisor name {name!r}: lowercase letters, digits, '-' and "
                          "'_', starting with a letter, at most 32 characters")
    return name


def vnode_name(service: str, index: int) -> str:
    return f"{service}-{index}"
