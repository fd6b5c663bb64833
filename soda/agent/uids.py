"""Which uid each service's guests run as on this node.

Owns the table from a service to the uid its VMMs run as here (the
launcher drops to it, its TAPs and files are made its own): one uid per
service from the configured range (`guest_uids: "FIRST-LAST"`), so that
two tenants' VMMs never share a uid on a node and cannot signal, trace or
open each other's processes and files. A uid is taken from the range in
turn after the last one given (so a uid let go is not given again at once),
never one a service here still holds; it is the service's while any of its
virtual nodes holds it and let go with the last of them. The table is kept
in the Agent's state dir (written whole at each change), so a restarted
Agent gives an adopted guest's service the uid its VMMs already run as.

It decides uids and nothing else: it makes no users, files or processes.
"""

from __future__ import annotations

import json
import logging
import os
import threading

from soda.errors import InvalidSpec, NoCapacity
from soda.files import write_json_atomic

log = logging.getLogger(__name__)

TABLE = "guest-uids.json"
DEFAULT_RANGE = "200000-265535"
# Below this live the host's own system users and groups.
FIRST_ALLOWED = 1000
LAST_ALLOWED = 0xFFFFFFFE            # (uid_t)-1 is "no uid" to the kernel
NOBODY = 65534                       # owns what NFS squashes: never a tenant's


def parse_uid_range(text: str, where: str = "guest_uids") -> range:
    """`"FIRST-LAST"` (inclusive) as a range; InvalidSpec with the fix."""
    first, dash, last = str(text).strip().partition("-")
    if not (dash and first.strip().isdigit() and last.strip().isdigit()):
        raise InvalidSpec(f"{where}: {text!r} is not a uid range FIRST-LAST "
                          f"(e.g. {DEFAULT_RANGE!r})")
    lo, hi = int(first), int(last)
    if lo > hi:
        raise InvalidSpec(f"{where}: {text!r} is empty (FIRST is above LAST)")
    if lo < FIRST_ALLOWED or hi > LAST_ALLOWED:
        raise InvalidSpec(f"{where}: {text!r} must lie within {FIRST_ALLOWED}-{LAST_ALLOWED} "
                          f"(below {FIRST_ALLOWED} are the host's system users)")
    if lo <= NOBODY <= hi:
        raise InvalidSpec(f"{where}: {text!r} holds {NOBODY} (nobody): start the range "
                          f"above it, e.g. {DEFAULT_RANGE!r}")
    return range(lo, hi + 1)


class GuestUids:
    """The service -> uid table of one node, kept in `state_dir`."""

    def __init__(self, state_dir: str, uids: range):
        self.path = os.path.join(state_dir, TABLE)
        self.uids = uids
        self._lock = threading.Lock()
        # {service: {"uid": N, "vnodes": [names]}}, and where to look next.
        self._services: dict[str, dict] = {}
        self._next = uids.start
        self._load()

    def acquire(self, service: str, vnode: str) -> int:
        """The uid `service`'s VMMs run as here, given to it now if it has
        none; `vnode` holds it until released. NoCapacity when every uid of
        the range is some other service's."""
        with self._lock:
            entry = self._services.get(service)
            if entry is None:
                uid = self._free_uid()
                entry = self._services[service] = {"uid": uid, "vnodes": []}
                log.info("service %s runs its guests here as uid %d", service, uid)
            if vnode not in entry["vnodes"]:
                entry["vnodes"] = sorted([*entry["vnodes"], vnode])
                self._save()
            return entry["uid"]

    def release(self, vnode: str) -> None:
        """`vnode` no longer holds its service's uid; the service lets go of
        it with its last virtual node here. Releasing an unknown one is fine."""
        with self._lock:
            for service, entry in list(self._services.items()):
                if vnode in entry["vnodes"]:
                    entry["vnodes"].remove(vnode)
                    if not entry["vnodes"]:
                        del self._services[service]
                        log.info("service %s has no guest here any more: uid %d is free",
                                 service, entry["uid"])
                    self._save()
                    return

    def vnodes(self) -> set[str]:
        """Every virtual node holding a uid (a restarted Agent releases the
        ones no guest of its own needs)."""
        with self._lock:
            return {v for entry in self._services.values() for v in entry["vnodes"]}

    def uid_of(self, service: str) -> int | None:
        with self._lock:
            entry = self._services.get(service)
            return entry["uid"] if entry else None

    def _free_uid(self) -> int:
        taken = {entry["uid"] for entry in self._services.values()}
        start = self._next if self._next in self.uids else self.uids.start
        count = len(self.uids)
        offset = start - self.uids.start
        for i in range(count):
            uid = self.uids.start + (offset + i) % count
            if uid not in taken:
                self._next = uid + 1 if uid + 1 in self.uids else self.uids.start
                return uid
        raise NoCapacity(f"no free guest uid on this node: all {count} of "
                         f"{self.uids.start}-{self.uids.stop - 1} are other services' "
                         f"(widen guest_uids)")

    def _load(self) -> None:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            # Refuse rather than start over: a fresh table could give a
            # running tenant's uid to another service.
            raise InvalidSpec(f"cannot read the guest uid table {self.path}: {e}") from None
        services = data.get("services", {}) if isinstance(data, dict) else None
        if not isinstance(services, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("uid"), int)
                and isinstance(e.get("vnodes"), list) for e in services.values()):
            raise InvalidSpec(f"the guest uid table {self.path} is malformed: move it away only "
                              f"once no guest runs on this node")
        self._services = {s: {"uid": e["uid"], "vnodes": sorted(map(str, e["vnodes"]))}
                          for s, e in services.items() if e["vnodes"]}
        outside = {s: e["uid"] for s, e in self._services.items() if e["uid"] not in self.uids}
        if outside:
            # Kept while their guests run: taking them away would need a reboot.
            log.warning("services %s hold uids outside guest_uids %d-%d: kept until their "
                        "guests here stop", outside, self.uids.start, self.uids.stop - 1)
        nxt = data.get("next")
        self._next = nxt if isinstance(nxt, int) and nxt in self.uids else self.uids.start

    def _save(self) -> None:
        write_json_atomic(self.path, {"services": self._services, "next": self._next}, indent=1)
