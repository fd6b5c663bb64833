"""The Master's domain logic: desired state of services, node membership,
placement through the scheduler, addresses, and what each Agent and Switch
must be told.

A plain class over the state store, image store, notifier and clocks (all
injected). Every change of durable state is one unit of work
(`_unit_of_work`: one store transaction that reads what the decision
depends on and writes all of it, run again on fresh state if another
writer got in first), so admission is decided on the state it commits and
a crash leaves each mutation whole or absent. Notifications and the
in-memory record of usage follow a change once it has committed (a
heartbeat is noted as it arrives, a drain hold taken before the commit: see
`_seen` and `_hold_for_draining`). The lock guards that in-memory state
only and is never held while a transaction opens. No gRPC here: `api.py`
is a thin translation layer on top.

Node drain: a draining node gets no new placements, and the membership
pass moves its virtual nodes elsewhere, one at a time per draining node
and per service: a replacement (same service, resources and image, the
next index) is placed on another node while the old one runs on, and once
it is RUNNING, and healthy at the Switch when a Switch serves the service,
the old one leaves through the Switch's drain like any removed virtual
node. A move in flight is the pair itself: the replacement names the
virtual node it `replaces` (`moves_of`), so a Master restarted mid-move
carries on where it stopped.

Moves (`move_vnode`, and a drain's): where the drivers of both nodes can
carry a guest's disk (`DriverCapabilities.migration`), the one leaving is
drained at the Switches, then frozen, and its Agent sends its disk (a
layer over the root of its image: `receive_vnode_disk`), which becomes the
image the replacement boots; the Switches hold new connections of a
service with nothing else to serve them meanwhile. Elsewhere (`cold`) the
replacement boots the image afresh while the old one serves on. A move
whose replacement's node is lost, or whose disk does not come within
DISK_WAIT_SECONDS, is given up and the old one thawed; one whose old node is
lost goes on (the replacement boots the image afresh if the disk had not
come).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import threading
import time
from dataclasses import replace
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

from soda import model
from soda.config import MasterConfig
from soda.errors import (AlreadyExists, Conflict, InvalidSpec, NoCapacity, NotFound, PermissionDenied,
                         WrongState)
from soda.master import ipam, scheduler
from soda.master.group_commit import GroupCommit
from soda.master.fetch import FetchLimits, UrlDownload
from soda.master.images import ImageStore
from soda.master.notifier import Notifier
from soda.master.store import StateReader, StateStore, Transaction, update_of
from soda.master.switches import STALE_SECONDS, SwitchRegistry

log = logging.getLogger(__name__)

READY, LOST = "READY", "LOST"
# How a draining node is shown to the scheduler, which places on READY nodes
# only: never stored (a node's state is READY or LOST, drained or not), but
# unlike leaving it out, it still counts as a node that offers its hypervisors.
DRAINING = "DRAINING"
# A unit of work that keeps meeting a Conflict is given up on after this many
# attempts: the caller sees the Conflict (ABORTED) and may try again.
CONFLICT_ATTEMPTS = 5
# A move that carries a disk gives up (and thaws the guest) when the disk
# has not arrived this long after the guest was frozen.
DISK_WAIT_SECONDS = 300.0
# What the image of a carried disk is named: one per virtual node that
# boots it, deleted with that virtual node.
DISK_IMAGE_PREFIX = "disk."


def disk_image_name(vnode: str) -> str:
    return DISK_IMAGE_PREFIX + vnode

T = TypeVar("T")


def node_topic(node: str) -> str:
    return f"node:{node}"


SERVICE_TOPIC_PREFIX = "service:"


def service_topic(service: str) -> str:
    return SERVICE_TOPIC_PREFIX + service


SERVICES_TOPIC = "services"
ENDPOINTS_TOPIC = "endpoints"
# Membership: a node joined, changed address, state or drain, or was removed.
NODES_TOPIC = "nodes"
# How often a Switch reports by default (soda.switch.main's report_seconds):
# what a drain allows for a Switch's word on a replacement's health to arrive.
SWITCH_REPORT_SECONDS = 2.0


class Controller:
    def __init__(self, store: StateStore, images: ImageStore, notifier: Notifier,
                 config: MasterConfig = MasterConfig(), clock=time.time, monotonic=time.monotonic):
        self.store = store
        self.images = images
        self.notifier = notifier
        self.config = config
        self.clock = clock
        self.monotonic = monotonic
        self._lock = threading.RLock()
        self._usage: dict[str, model.Usage] = {}     # vnode name -> latest reported
        self._image_caches: dict[str, model.ImageCacheState] = {}   # node -> as its heartbeat said
        self._primes: dict[str, set[str]] = {}      # node -> images to pull ahead (image prime)
        self.switches = SwitchRegistry()        # Switch reports: figures, listen checks, draining
        self.fetch_limits = FetchLimits(stall_seconds=config.image_fetch_stall_seconds,
                                        deadline_seconds=config.image_fetch_timeout_seconds)
        # Node drain, as the last membership pass saw it (memory only: the
        # next pass after a restart sees it again): vnode -> (service, why it
        # moves or waits), shown as its reason while its Agent reports none;
        # and when each replacement was first seen RUNNING and healthy.
        self._drain_notes: dict[str, tuple[str, str]] = {}
        self._replacements: dict[str, _Replacement] = {}
        # Heartbeats are kept in memory only: after a Master restart every
        # known node gets a full grace period to reconnect before it is LOST.
        started = monotonic()
        self._last_seen = {n.name: started for n in store.list_nodes()}
        # Status reports and heartbeats of all Agents: many small units at
        # once, committed together (soda.master.group_commit).
        self._reports = GroupCommit(lambda: self.store.transaction())

    def _unit_of_work(self, work: Callable[[Transaction], T], grouped: bool = False) -> T:
        """`work(tx)` in one transaction (`grouped`: in a part of one that
        other threads' grouped units share). A Conflict means another writer
        changed what it read: it runs again from scratch on the new state
        (its after-commit actions of the failed attempt are dropped with it)."""
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                if grouped:
                    return self._reports.run(work)
                with self.store.transaction() as tx:
                    return work(tx)
            except Conflict as exc:
                if attempt == CONFLICT_ATTEMPTS:
                    raise
                log.info("retrying after a conflicting write (attempt %d): %s", attempt, exc)
        raise AssertionError("unreachable")

    # ---- services -----------------------------------------------------
    # `tenant` in what follows: the tenant a call acts as (soda.model.tenancy),
    # which sees and changes only its own; None for the others (operators,
    # and the Switch's on-demand calls), whose role soda.master.access checked.
    def create_service(self, spec: model.ServiceSpec, tenant: str | None = None) -> model.Service:
        spec = model.validate_spec(spec)

        def work(tx: Transaction) -> list[model.VirtualNode]:
            image = tx.resolve_image(spec.image)
            model.check_image_use(image, tenant, f"use image {spec.image!r}")
            self._check_quota(tx, tenant or model.OPERATORS, spec)
            for res in spec.resources:
                model.check_disk_holds_image(res.disk, image)
            if spec.on_demand is not None:      # refused now, not at the first request
                model.check_disk_holds_image(spec.on_demand.resources.disk, image)
            existing = tx.list_service_specs()
            if any(other.name == spec.name for other in existing):
                raise AlreadyExists(f"service {spec.name!r} already exists")
            self._check_listen_free(spec, existing)
            if spec.switch.listen:
                with self._lock:
                    self.switches.check_listen(spec.switch.listen, self.monotonic())
            names = [model.vnode_name(spec.name, i) for i in range(spec.nodes)]
            vnodes = self._place_new(tx, spec, image.digest, list(range(spec.nodes)), spec.resources,
                                     names, {})
            tx.create_service(model.Service(spec=spec, image_digest=image.digest, vnodes=tuple(vnodes),
                                            created_at=self.clock(), owner=tenant or model.OPERATORS))
            tx.after_commit(functools.partial(self._publish_service, spec.name, {v.node for v in vnodes}))
            if not vnodes and spec.on_demand is not None and spec.on_demand.warm:
                # Created idle: its warm pool boots (and freezes) now.
                self._go_idle(tx, tx.get_service(spec.name))
                vnodes = list(tx.get_service(spec.name).vnodes)
            return vnodes

        vnodes = self._unit_of_work(work)
        log.info("service %s created: %d virtual node(s) on %s", spec.name, len(vnodes),
                 ", ".join(sorted({v.node for v in vnodes})) or "-")
        return self.store.get_service(spec.name)

    def _check_listen_free(self, spec: model.ServiceSpec, others: Iterable[model.ServiceSpec]) -> None:
        if not spec.switch.listen:
            return
        for other in others:
            if other.name != spec.name and other.switch.listen == spec.switch.listen:
                raise AlreadyExists(f"switch address {spec.switch.listen} is already used by "
                                    f"service {other.name!r}")

    def _place_new(self, tx: StateReader, spec: model.ServiceSpec, digest: str, indexes: Sequence[int],
                   resources: Sequence[model.Resources], names: Sequence[str],
                   service_counts: dict[str, int], only: Iterable[str] | None = None,
                   avoid: str | None = None) -> list[model.VirtualNode]:
        """Virtual nodes for `names`, placed (on the nodes `only`, or on any
        node, but never on `avoid`), with addresses; not yet stored."""
        nodes = tx.list_nodes()
        draining = {n.name for n in nodes if n.draining}
        view = [n for n in _placement_view(nodes, draining)
                if (only is None or n.name in only) and n.name != avoid]
        try:
            placements = scheduler.place(view, resources,
                                         hypervisor=spec.hypervisor, service_counts=service_counts,
                                         labels=names)
        except NoCapacity as exc:
            if exc.resource == "nodes" and any(n.state == READY for n in nodes if n.name in draining):
                raise NoCapacity("no ready physical node that is not draining: undrain one (sodactl node "
                                 "undrain NAME) or start a soda-agent", resource="nodes") from None
            raise
        by_name = {n.name: n for n in nodes}
        addresses = self._allocate_addresses(tx, by_name, [p.node for p in placements])
        return [model.VirtualNode(
            name=name, service=spec.name, index=index, resources=res, node=p.node,
            address=address, prefix_length=ipaddress.ip_network(by_name[p.node].subnet).prefixlen,
            gateway=by_name[p.node].gateway, weight=model.share_weight(res), image_digest=digest,
            hypervisor=p.hypervisor, port=spec.port, phase=model.Phase.PENDING, cpu_cap=spec.cpu_cap,
            boot_timeout=spec.boot_timeout)
            for name, index, res, p, address in zip(names, indexes, resources, placements, addresses)]

    def _allocate_addresses(self, tx: StateReader, nodes: dict[str, model.Node],
                            targets: Sequence[str]) -> list[str]:
        taken: dict[str, set[str]] = {}
        out = []
        for target in targets:
            if target not in taken:
                taken[target] = tx.vnode_addresses(target)
            try:
                address = ipam.allocate_guest(nodes[target].subnet, taken[target])
            except NoCapacity as exc:
                raise NoCapacity(f"physical node {target}: {exc}", resource=exc.resource) from None
            taken[target].add(address)
            out.append(address)
        return out

    def get_service(self, name: str, tenant: str | None = None) -> model.Service:
        return self._observed(model.owned_by(self.store.get_service(name), tenant, "get"))

    def vnode_of(self, service: str, ref: str, tenant: str | None = None) -> model.VirtualNode:
        """Virtual node `ref` (its name or index; "" = the first by index) of
        `service`, placed on a node: whose console `service logs` reads."""
        vnodes = sorted(self.get_service(service, tenant).vnodes, key=lambda v: v.index)
        if not vnodes:
            raise WrongState(f"service {service} has no virtual node")
        if not ref:
            vnode = vnodes[0]
        else:
            vnode = next((v for v in vnodes if ref in (v.name, str(v.index))), None)
            if vnode is None:
                raise NotFound(f"service {service} has no virtual node {ref!r} "
                               f"(it has {', '.join(v.name for v in vnodes)})")
        if not vnode.node:
            raise WrongState(f"virtual node {vnode.name} is not placed on a node yet "
                             f"({vnode.phase.name}{': ' + vnode.reason if vnode.reason else ''})")
        return vnode

    def list_services(self, tenant: str | None = None) -> list[model.Service]:
        return [self._observed(s) for s in self.store.list_services()
                if tenant is None or s.owner == tenant]

    def _check_quota(self, tx: StateReader, owner: str, spec: model.ServiceSpec) -> None:
        """Refuse (QuotaExceeded) when `owner`'s services, with `spec` in
        place of the service of that name, would go over its quota (the
        operators have none)."""
        quota = tx.quotas().get(owner) if owner != model.OPERATORS else None
        if quota is None:
            return
        specs = [(o, s) for o, s in tx.list_service_owners() if s.name != spec.name] + [(owner, spec)]
        model.check_quota(owner, quota, model.usage_of(owner, specs, ()))

    # Usage is observed, changes with every heartbeat and is worthless after
    # a restart (the next heartbeat brings it back): kept in memory, never
    # in the store, and never a reason to publish a service event. A drain
    # note is shown as the reason of a virtual node whose Agent gives none:
    # the Agent's reports overwrite a stored reason, and a move's progress
    # is read again by every membership pass anyway.
    def _observed(self, service: model.Service) -> model.Service:
        with self._lock:
            usage = dict(self._usage)
            switched = self.switches.vnode_stats(self.monotonic())
            notes = {name: text for name, (svc, text) in self._drain_notes.items() if svc == service.name}
        if not any(v.name in usage or v.name in switched or v.name in notes for v in service.vnodes):
            return service
        return replace(service, vnodes=tuple(replace(v, usage=usage.get(v.name),
                                                     switch_stats=switched.get(v.name),
                                                     reason=v.reason or notes.get(v.name, ""))
                                             for v in service.vnodes))

    def _record_usage(self, mine: dict, statuses: Sequence[model.VirtualNodeStatus],
                      complete: bool) -> None:
        """Called with the lock held."""
        for s in statuses:
            if s.name not in mine:
                continue
            if s.usage is None:
                # A phase report carries no usage; a heartbeat without it
                # means the guest is no longer measured.
                if complete:
                    self._usage.pop(s.name, None)
            else:
                self._usage[s.name] = s.usage
        if complete:
            reported = {s.name for s in statuses}
            for name in mine:
                if name not in reported:
                    self._usage.pop(name, None)

    def delete_service(self, name: str, tenant: str | None = None) -> model.Service:
        def work(tx: Transaction) -> model.Service:
            service = model.owned_by(tx.get_service(name), tenant, "delete")
            tx.put_service(replace(service, deleting=True))
            # Virtual nodes nobody runs (unplaced, or on a lost node) go at
            # once; the others stay, marked, until their Agent has stopped them.
            states = tx.node_states()
            orphans = [v for v in service.vnodes if not v.node or states.get(v.node) != READY]
            leaving = [v for v in service.vnodes if not v.deleting]
            gone = {v.name for v in orphans}
            tx.delete_vnodes(orphans)
            tx.put_vnodes(replace(v, deleting=True) for v in leaving if v.name not in gone)
            self._finish_deletions(tx, {name})
            self._hold_for_draining(leaving, service.spec.switch.drain_seconds)
            tx.after_commit(functools.partial(log.info, "service %s marked for deletion", name))
            tx.after_commit(functools.partial(self._publish_service, name,
                                              {v.node for v in service.vnodes if v.node}))
            return replace(service, deleting=True,
                           vnodes=tuple(replace(v, deleting=True) for v in service.vnodes))

        marked = self._unit_of_work(work)
        try:
            return self.store.get_service(name)
        except NotFound:
            return marked

    def freeze_service(self, name: str, vnodes: Sequence[str] = (), frozen: bool = True,
                       tenant: str | None = None) -> model.Service:
        """Freeze (or thaw) a service's virtual nodes, all or those named
        (by name or index): a frozen one keeps its memory and address, uses
        no CPU and gets no new connections. The Switches drain it first: its
        Agent is told to freeze once no Switch holds it (or the service's
        drain time has passed). Only where its driver can freeze."""
        def work(tx: Transaction) -> list[model.VirtualNode]:
            service = model.owned_by(tx.get_service(name), tenant, "freeze or thaw")
            if service.deleting:
                raise WrongState(f"service {name} is being deleted")
            live = [v for v in service.vnodes if not v.deleting]
            chosen = live
            if vnodes:
                by_ref = {**{v.name: v for v in live}, **{str(v.index): v for v in live}}
                unknown = [r for r in vnodes if r not in by_ref]
                if unknown:
                    raise NotFound(f"service {name} has no virtual node {', '.join(map(repr, unknown))} "
                                   f"(it has {', '.join(v.name for v in live) or 'none'})")
                chosen = list({by_ref[r].name: by_ref[r] for r in vnodes}.values())
            if frozen:
                for v in chosen:
                    _check_can_freeze(tx, v)
            changed = [replace(v, frozen=frozen) for v in chosen if v.frozen != frozen]
            tx.put_vnodes(changed)
            if frozen and changed:
                self._hold_for_draining(changed, service.spec.switch.drain_seconds)
            elif changed:
                tx.after_commit(lambda: self._forget_holds(changed))
            what = "frozen" if frozen else "thawed"
            tx.after_commit(functools.partial(log.info, "service %s: %s %s", name,
                                              ", ".join(v.name for v in changed) or "nothing", what))
            tx.after_commit(functools.partial(self._publish_service, name, {v.node for v in changed}))
            return changed

        self._unit_of_work(work)
        return self.get_service(name, tenant)

    def move_vnode(self, name: str, ref: str, to: str = "", cold: bool = False,
                   tenant: str | None = None) -> model.Service:
        """Move virtual node `ref` (name or index) of service `name` to node
        `to` ("": where placement finds room), carrying its disk where the
        drivers of both nodes can (the guest is frozen meanwhile and boots
        from it there); elsewhere only with `cold`, which boots its image
        afresh there while it serves on here. Either way the one here stays
        until the replacement is ready, then leaves through the Switches'
        drain. Returns the service, the move under way."""
        def work(tx: Transaction) -> model.VirtualNode:
            service = model.owned_by(tx.get_service(name), tenant, "move")
            if service.deleting:
                raise WrongState(f"service {name} is being deleted")
            live = [v for v in service.vnodes if not v.deleting]
            v = next((x for x in live if ref in (x.name, str(x.index))), None)
            if v is None:
                raise NotFound(f"service {name} has no virtual node {ref!r} "
                               f"(it has {', '.join(x.name for x in live) or 'none'})")
            moves, _ = moves_of(service, set())
            busy = next((m for m in moves if v.name in (m.old.name, m.new.name)), None)
            if busy is not None or v.replaces:
                other = busy.new if busy is not None and busy.old.name == v.name else None
                raise WrongState(f"virtual node {v.name} is being moved already"
                                 + (f" (to {other.name} on {other.node})" if other else
                                    f" (it replaces {v.replaces})"))
            if not v.node:
                raise WrongState(f"virtual node {v.name} is not placed on a node: it is placed "
                                 f"where there is room by itself")
            nodes = {n.name: n for n in tx.list_nodes()}
            if to:
                target = nodes.get(to)
                if target is None:
                    raise NotFound(f"no physical node named {to!r} (sodactl node list)")
                if to == v.node:
                    raise InvalidSpec(f"virtual node {v.name} runs on node {to} already")
                if target.state != READY or target.draining:
                    raise WrongState(f"node {to} takes no new virtual nodes: it is "
                                     f"{'draining' if target.draining else target.state}")
            receivers = _disk_receivers(nodes.values(), v, {n for n, x in nodes.items() if x.draining},
                                        only=to or None)
            if not receivers and not cold:
                raise WrongState(_cannot_carry(nodes, v, to))
            why = f"moved to node {to}" if to else "moved"
            return self._begin_move(tx, service, v, receivers or ([to] if to else None), bool(receivers),
                                    f"replaces {v.name}: {why} by an operator", operator=True)

        try:
            new = self._unit_of_work(work)
        except NoCapacity as exc:
            raise NoCapacity(f"cannot move {ref} of service {name}: {exc.message}",
                             resource=exc.resource) from None
        self._publish_service(name)
        return self.get_service(new.service, tenant)

    def receive_vnode_disk(self, node: str | None, vnode: str, size: int, digest: str, base: str,
                           chunks: Iterable[bytes]) -> model.Image:
        """The disk of `vnode`, moving off `node` (None: any), as its Agent sends it: a
        layer over its `disk_base`, checked like any pushed image, kept as
        the image `disk.<replacement>` (its service owner's) and handed to
        the replacement to boot. A disk for a move given up meanwhile is
        not kept."""
        if not model.DIGEST_RE.match(digest or ""):
            raise InvalidSpec(f"a disk must announce the sha256 digest of its content, got {digest!r}")
        [v] = self.store.list_vnodes(names=[vnode]) or [None]
        if v is None or (node is not None and v.node != node):
            raise PermissionDenied(f"agent {node} may not send the disk of {vnode!r}: it does not run it")
        if not v.moving_to or not v.frozen or v.deleting:
            raise WrongState(f"virtual node {vnode} is not moving with its disk: its disk is not wanted")
        if base != v.disk_base:
            raise InvalidSpec(f"the disk of {vnode} must be a layer over {v.disk_base}, not {base!r}")
        service = self.store.get_service(v.service)
        new = next((x for x in service.vnodes if x.replaces == vnode and not x.deleting), None)
        if new is None or not new.awaits_disk:
            raise WrongState(f"virtual node {vnode} has no replacement waiting for its disk")
        init = self.store.resolve_image(v.image_digest).init
        image = self.images.receive(disk_image_name(new.name), size, digest, init, chunks,
                                    owner=service.owner, base=self.store.resolve_image(base))

        def work(tx: Transaction) -> bool:
            [waiting] = tx.list_vnodes(names=[new.name]) or [None]
            if waiting is None or waiting.deleting or not waiting.awaits_disk or waiting.replaces != vnode:
                self._collect_disk_images(tx)       # the move was given up meanwhile
                return False
            tx.put_vnodes([replace(waiting, image_digest=image.digest)])
            tx.after_commit(functools.partial(self.notifier.publish, node_topic(waiting.node)))
            return True

        if not self._unit_of_work(work):
            raise WrongState(f"the move of {vnode} was given up while its disk came")
        log.info("the disk of %s arrived (%d bytes, a layer of %d): %s boots it on %s", vnode, image.size,
                 image.layer_size, new.name, new.node)
        self._publish_service(v.service)
        return image

    def _collect_disk_images(self, tx: Transaction) -> None:
        """Delete (in `tx`) the images of carried disks that no virtual node boots."""
        images = tx.list_images()
        disks = [i for i in images if any(n.startswith(DISK_IMAGE_PREFIX) for n in i.names)]
        if not disks:
            return
        used = {v.image_digest for s in tx.list_services() for v in s.vnodes}
        parents = {i.parent for i in images}
        for image in disks:
            if image.digest not in used and image.digest not in parents:
                self.images.delete(tx, image, [])
                tx.after_commit(functools.partial(log.info, "image %s (%s) deleted: no virtual node boots it",
                                                  image.digest[:19], ", ".join(image.names)))

    def _forget_holds(self, vnodes: Iterable[model.VirtualNode]) -> None:
        with self._lock:
            for v in vnodes:
                self.switches.forget(v.name)

    def _finish_deletions(self, tx: Transaction, services: Iterable[str]) -> list[str]:
        """Drop services marked deleting whose last virtual node is gone."""
        done = []
        for name in services:
            # Counted first: reading a service reads all its virtual nodes,
            # and while any is left it is not done whatever its state.
            if tx.count_vnodes(name):
                continue
            try:
                service = tx.get_service(name)
            except NotFound:
                continue
            if service.deleting and not service.vnodes:
                tx.delete_service(service)
                done.append(name)
                tx.after_commit(functools.partial(log.info, "service %s deleted", name))
        return done

    def resize_service(self, name: str, nodes: int | None,
                       resources: Sequence[model.Resources], tenant: str | None = None) -> model.Service:
        self._unit_of_work(lambda tx: self._resize(tx, name, nodes, resources, tenant))
        return self.store.get_service(name)

    def _resize(self, tx: Transaction, name: str, nodes: int | None,
                resources: Sequence[model.Resources], tenant: str | None = None) -> None:
        service = model.owned_by(tx.get_service(name), tenant, "resize")
        if service.deleting:
            raise WrongState(f"service {name!r} is being deleted")
        # A resize starts from the virtual nodes the service wants: a move
        # in flight is given up (its replacement goes) and the drain starts
        # it again after the resize, from the resized service.
        nodes_now = tx.list_nodes()
        moves, strays = moves_of(service, {n.name for n in nodes_now if n.draining})
        if moves or strays:
            self._drop(tx, service, [m.new for m in moves] + strays, nodes_now)
            service = tx.get_service(name)
        live = sorted((v for v in service.vnodes if not v.deleting), key=lambda v: v.index)
        count = len(live) if nodes is None or nodes < 0 else nodes
        if resources and len(resources) not in (1, count):
            raise InvalidSpec(f"{len(resources)} resource entries for {count} virtual nodes; "
                              "give one, or one per virtual node")
        wanted = [(resources[0] if len(resources) == 1 else resources[i]) if resources
                  else (live[i].resources if i < len(live) else
                        (live[-1].resources if live else _template(service.spec)))
                  for i in range(count)]
        spec = model.validate_spec(replace(service.spec, nodes=count, resources=tuple(wanted)))
        if count > len(live) or resources:      # what only grows: a shrink is never refused
            self._check_quota(tx, service.owner, spec)
        image = tx.resolve_image(service.image_digest)
        for res in spec.resources:
            model.check_disk_holds_image(res.disk, image)
        keep, drop = live[:count], live[count:]
        changed = self._resize_in_place(tx, keep, spec.resources[:len(keep)], freed=drop)
        used_indexes = {v.index for v in service.vnodes}
        new_indexes, i = [], 0
        while len(new_indexes) < count - len(keep):
            if i not in used_indexes:
                new_indexes.append(i)
            i += 1
        counts: dict[str, int] = {}
        for v in keep:
            counts[v.node] = counts.get(v.node, 0) + 1
        added = self._place_new(tx, spec, service.image_digest, new_indexes, spec.resources[len(keep):],
                                [model.vnode_name(name, j) for j in new_indexes], counts)
        dropped = [replace(v, deleting=True) for v in drop]
        tx.put_service(replace(service, spec=spec))
        # Virtual nodes whose resources stay as they were are not written.
        tx.put_vnodes([new for new, old in zip(changed, keep) if new is not old] + added + dropped)
        self._hold_for_draining(dropped, spec.switch.drain_seconds)
        tx.after_commit(functools.partial(log.info, "service %s resized to %d virtual node(s)", name, count))
        tx.after_commit(functools.partial(self._publish_service, name,
                                          {v.node for v in changed + added + dropped if v.node}))

    def _hold_for_draining(self, leaving: Sequence[model.VirtualNode], drain_seconds: float) -> None:
        """Keep the guests of `leaving` while a Switch drains them. Done
        before the commit, unlike what else follows a change: an Agent that
        reads the committed deletion must find the hold already. A hold left
        by a transaction that rolls back only keeps a guest that stays anyway."""
        with self._lock:
            self.switches.leaving(list(leaving), drain_seconds, self.monotonic())

    def _resize_in_place(self, tx: StateReader, vnodes: Sequence[model.VirtualNode],
                         wanted: Sequence[model.Resources],
                         freed: Sequence[model.VirtualNode] = ()) -> list[model.VirtualNode]:
        """New resources for running virtual nodes, checked against their
        node's room (counting what the virtual nodes being removed free)."""
        nodes = {n.name: n for n in tx.list_nodes()}
        extra: dict[str, model.Resources] = {}
        for v in freed:
            extra[v.node] = extra.get(v.node, model.Resources()) - v.resources
        out = []
        for v, res in zip(vnodes, wanted):
            if res == v.resources:
                out.append(v)
                continue
            delta = res - v.resources
            extra[v.node] = extra.get(v.node, model.Resources()) + delta
            node = nodes.get(v.node)
            if node is not None:
                if res.memory != v.resources.memory:
                    scheduler.check_min_memory(node, v.hypervisor, res.memory, v.name)
                free = node.capacity - node.allocated - extra[v.node]
                for r in ("cpu", "memory", "bandwidth", "disk"):
                    if getattr(free, r) < -1e-9:
                        raise NoCapacity(f"not enough {r} on {v.node} to grow {v.name}", resource=r)
            caps = node.limit(v.hypervisor) if node is not None else None
            live_memory = caps is not None and caps.live_memory
            if res.disk == v.resources.disk and (res.memory == v.resources.memory or live_memory):
                # CPU and bandwidth change live (the Daemon rewrites cgroup
                # values and HTB rates), and so does memory where the guest
                # can give it back and take it again (its Agent boots it
                # again if it must grow past its boot size): same
                # generation, the guest runs on.
                out.append(replace(v, resources=res, weight=model.share_weight(res)))
            else:
                # A disk change, or memory elsewhere, needs a new boot: a
                # new generation makes the Agent boot the guest again, so
                # its phase starts over (sodactl says so).
                out.append(replace(v, resources=res, weight=model.share_weight(res),
                                   generation=v.generation + 1, phase=model.Phase.PENDING, reason=""))
        return out

    # ---- deploy on first request (Dynasoar) ------------------------------
    # The Switch knows the connections, so it decides when: it asks for a
    # node when a connection finds none ready, and for the idle state once
    # the service has been idle for on_demand.idle_seconds. Both calls are
    # idempotent and decided in the unit of work that grows or shrinks the
    # service, so concurrent asks give one node and an ensure that follows a
    # release always gets a node in use again. The idle state is the warm
    # pool: on_demand.warm virtual nodes booted and frozen (none by default);
    # an ensure thaws those before it boots any.
    def ensure_nodes(self, name: str, at_least: int = 1) -> model.Service:
        """At least `at_least` virtual nodes in use (not frozen): frozen ones
        thawed first where their node has the CPU for them again, then new
        ones (they get on_demand.resources)."""
        def work(tx: Transaction) -> None:
            service = tx.get_service(name)
            on_demand = _on_demand(service, "start virtual nodes on demand for")
            if not 1 <= at_least <= on_demand.max_nodes:
                raise InvalidSpec(f"service {name!r}: at_least must be from 1 to on_demand.max_nodes "
                                  f"({on_demand.max_nodes}), got {at_least}")
            live = sorted((v for v in service.vnodes if not v.deleting), key=lambda v: v.index)
            need = at_least - sum(1 for v in live if not v.frozen)
            if need <= 0:
                return
            thawed, unfit = _thawable(tx, [v for v in live if v.frozen], need)
            if thawed:
                tx.put_vnodes(thawed)
                tx.after_commit(lambda: self._forget_holds(thawed))
                tx.after_commit(functools.partial(self._publish_service, name, {v.node for v in thawed}))
                tx.after_commit(functools.partial(log.info, "service %s: thawed %s on demand", name,
                                                  ", ".join(v.name for v in thawed)))
                need -= len(thawed)
            if need <= 0:
                return
            # Frozen ones that cannot thaw where they are give their place
            # under max_nodes to new ones.
            excess = max(0, len(live) + need - on_demand.max_nodes)
            if excess:
                self._drop(tx, service, unfit[:excess], tx.list_nodes(),
                           "frozen where their node has no CPU left to thaw them")
                live = [v for v in live if v not in unfit[:excess]]
            tx.after_commit(functools.partial(log.info, "service %s: %d virtual node(s) asked on demand",
                                              name, need))
            self._resize(tx, name, len(live) + need, [v.resources for v in live]
                         + [on_demand.resources] * need)

        self._unit_of_work(work)
        return self.get_service(name)

    def release_nodes(self, name: str) -> model.Service:
        """An idle service to its idle state: on_demand.warm frozen virtual
        nodes, none else. `idle: freeze` freezes those that served (the
        already frozen first), `idle: stop` stops them all and boots new
        ones for the pool. A service in its idle state is left as it is."""
        def work(tx: Transaction) -> None:
            self._go_idle(tx, tx.get_service(name))

        self._unit_of_work(work)
        return self.get_service(name)

    def _go_idle(self, tx: Transaction, service: model.Service) -> None:
        name = service.name
        on_demand = _on_demand(service, "release the on-demand virtual nodes of")
        live = sorted((v for v in service.vnodes if not v.deleting), key=lambda v: v.index)
        frozen = [v for v in live if v.frozen]
        active = [v for v in live if not v.frozen]
        if on_demand.idle == "freeze":
            keep, drop = [], []
            for v in frozen + active:
                if len(keep) < on_demand.warm and (v.frozen or _can_freeze(tx, v)):
                    keep.append(v)
                else:
                    drop.append(v)
        else:
            keep, drop = frozen[:on_demand.warm], active + frozen[on_demand.warm:]
        freezing = [replace(v, frozen=True) for v in keep if not v.frozen]
        add = on_demand.warm - len(keep)
        if not drop and not freezing and not add:
            return
        self._drop(tx, service, drop, tx.list_nodes(), "idle, beyond the warm pool")
        if freezing:
            tx.put_vnodes(freezing)
            self._hold_for_draining(freezing, service.spec.switch.drain_seconds)
            tx.after_commit(functools.partial(log.info, "service %s: idle, %s frozen", name,
                                              ", ".join(v.name for v in freezing)))
        kept = [replace(v, frozen=True) for v in keep]
        added: list[model.VirtualNode] = []
        if add:
            used = {v.index for v in service.vnodes}
            indexes = [i for i in range(len(used) + add) if i not in used][:add]
            counts: dict[str, int] = {}
            for v in kept:
                counts[v.node] = counts.get(v.node, 0) + 1
            spec = replace(service.spec, nodes=len(kept) + add,
                           resources=tuple(v.resources for v in kept) + (on_demand.resources,) * add)
            try:
                added = [replace(v, frozen=True) for v in self._place_new(
                    tx, spec, service.image_digest, indexes, [on_demand.resources] * add,
                    [model.vnode_name(name, i) for i in indexes], counts)]
            except NoCapacity as exc:
                # The pool is a speed-up: the release goes on without it.
                tx.after_commit(functools.partial(log.warning, "service %s: no room for its warm pool "
                                                  "of %d: %s", name, on_demand.warm, exc))
            if added:
                tx.put_vnodes(added)
                tx.after_commit(functools.partial(log.info, "service %s: %s booting for the warm pool",
                                                  name, ", ".join(v.name for v in added)))
        final = sorted(kept + added, key=lambda v: v.index)
        spec = model.validate_spec(replace(service.spec, nodes=len(final),
                                           resources=tuple(v.resources for v in final)))
        tx.put_service(replace(service, spec=spec))
        tx.after_commit(functools.partial(self._publish_service, name,
                                          {v.node for v in freezing + added if v.node}))

    # ---- nodes --------------------------------------------------------
    def register_node(self, name: str, address: str, capacity: model.Resources,
                      hypervisors: Sequence[str],
                      limits: Sequence[model.DriverCapabilities] = (),
                      assumed: Sequence[str] = (),
                      labels: Mapping[str, str] | None = None) -> model.Node:
        model.check_dns_label("node", name, model.NODE_NAME_MAX)
        if not address:
            raise InvalidSpec(f"node {name}: an address is required (where other hosts reach it)")
        try:
            labels = model.check_labels(labels)
        except InvalidSpec as exc:
            raise InvalidSpec(f"node {name}: {exc}") from None
        odd = sorted(set(assumed) - set(model.RESOURCE_UNITS))
        if odd:
            raise InvalidSpec(f"node {name}: assumed capacity names unknown resources: {', '.join(odd)}")
        for field in ("cpu", "memory", "bandwidth", "disk"):
            if getattr(capacity, field) <= 0:
                raise InvalidSpec(f"node {name}: capacity {field} must be positive")
        if not hypervisors:
            raise InvalidSpec(f"node {name}: it must offer at least one hypervisor")
        for hypervisor in hypervisors:
            model.check_hypervisor_name(hypervisor)
        _check_limits(name, hypervisors, limits)

        def work(tx: Transaction) -> str:
            _check_address_free(tx, name, address)
            state = READY
            try:
                old = tx.get_node(name)
                subnet, gateway = old.subnet, old.gateway
                if old.state == LOST:
                    # Fencing: its old guests may still run, and others
                    # replace them now. It is READY again (and gets new
                    # work) only at its first heartbeat, which its Agent
                    # sends once it has stopped what it no longer owns.
                    state = LOST
                    tx.after_commit(functools.partial(
                        log.info, "node %s registers again after it was lost: READY once its Agent "
                        "has stopped the guests it no longer owns", name))
            except NotFound:
                old = None
                given = ipam.allocate_subnet(self.config.cluster_cidr, self.config.node_prefix,
                                             (n.subnet for n in tx.list_nodes()))
                subnet, gateway = given.subnet, given.gateway
            node = model.Node(name=name, address=address, capacity=capacity, hypervisors=tuple(hypervisors),
                              subnet=subnet, gateway=gateway, state=state, limits=tuple(limits),
                              assumed=tuple(sorted(set(assumed))), labels=labels,
                              draining=old.draining if old is not None else False)
            tx.put_node(node if old is None else update_of(old, node))
            self._seen(name)
            tx.after_commit(functools.partial(self.notifier.publish, SERVICES_TOPIC, NODES_TOPIC))
            return subnet

        subnet = self._unit_of_work(work)
        log.info("node %s registered from %s (subnet %s, labels %s)", name, address, subnet,
                 model.format_labels(labels) or "none")
        return _addressed(self.store.get_node(name))

    def drain_node(self, name: str) -> model.Node:
        """Place nothing new on `name` and have the membership pass move
        its virtual nodes elsewhere, one at a time. Refused (NoCapacity,
        naming the resource) when the virtual nodes left on draining nodes,
        its own included, would not all fit on the READY nodes that are not
        draining; draining a draining node again changes nothing."""
        def work(tx: Transaction) -> model.Node:
            node = tx.get_node(name)
            if node.draining:
                return node
            nodes = tx.list_nodes()
            self._check_room_to_drain(tx, name, nodes)
            tx.put_node(replace(node, draining=True))
            tx.after_commit(functools.partial(self.notifier.publish, NODES_TOPIC, SERVICES_TOPIC))
            tx.after_commit(functools.partial(log.info, "node %s draining: %d virtual node(s) to move", name,
                                              sum(1 for v in tx.list_vnodes(node=name) if not v.deleting)))
            return node

        self._unit_of_work(work)
        return _addressed(self.store.get_node(name))

    def _check_room_to_drain(self, tx: StateReader, name: str, nodes: Sequence[model.Node]) -> None:
        """A dry run of the placements a drain of `name` leads to: every
        live virtual node on a READY draining node (`name` included) that no
        replacement is under way for yet, on the READY nodes not draining,
        as the scheduler would place them (one batch per hypervisor asked
        for, each taking its room before the next)."""
        draining = {n.name for n in nodes if n.draining} | {name}
        homeless: dict[str, list[model.VirtualNode]] = {}       # hypervisor asked for -> vnodes
        services = sorted({v.service for n in nodes if n.name in draining and n.state == READY
                           for v in tx.list_vnodes(node=n.name) if not v.deleting})
        for service in map(tx.get_service, services):
            if service.deleting:
                continue
            moves, strays = moves_of(service, draining)
            settled = {m.old.name for m in moves} | {v.name for v in strays}
            homeless.setdefault(service.spec.hypervisor, []).extend(
                v for v in service.vnodes
                if not v.deleting and v.node in draining and v.name not in settled)
        count = sum(len(vs) for vs in homeless.values())
        if not count:
            return
        if not any(n.state == READY and n.name not in draining for n in nodes):
            raise NoCapacity(f"cannot drain node {name}: no other READY node that is not draining to "
                             f"move {count} virtual node(s) to", resource="nodes")
        view = {n.name: n for n in _placement_view(nodes, draining)}
        for hypervisor, vnodes in sorted(homeless.items()):
            wants = [v.resources for v in vnodes]
            try:
                placements = scheduler.place(list(view.values()), wants, hypervisor=hypervisor,
                                             labels=[v.name for v in vnodes])
            except NoCapacity as exc:
                raise NoCapacity(f"cannot drain node {name}: {exc.message}", resource=exc.resource) from None
            except InvalidSpec as exc:
                # Nothing wrong with the request: the other nodes cannot
                # boot what runs here (too small for their kernels).
                raise WrongState(f"cannot drain node {name}: {exc.message}") from None
            for p, want in zip(placements, wants):
                target = view[p.node]
                view[p.node] = replace(target, allocated=target.allocated
                                       + scheduler.charged(target, p.hypervisor, want))

    def undrain_node(self, name: str) -> model.Node:
        """Place on `name` again. Moves already done stay done; a move in
        flight from it is given up (its replacement goes), unless another
        draining node holds a virtual node it can replace instead."""
        def work(tx: Transaction) -> None:
            node = tx.get_node(name)
            if not node.draining:
                return
            tx.put_node(replace(node, draining=False))
            nodes = tx.list_nodes()
            draining = {n.name for n in nodes if n.draining}
            for service in map(tx.get_service, sorted({v.service for v in tx.list_vnodes(node=name)})):
                _, strays = moves_of(service, draining)
                self._drop(tx, service, strays, nodes)
            tx.after_commit(functools.partial(self.notifier.publish, NODES_TOPIC, SERVICES_TOPIC))
            tx.after_commit(functools.partial(log.info, "node %s no longer draining", name))

        self._unit_of_work(work)
        return _addressed(self.store.get_node(name))

    def _drop(self, tx: Transaction, service: model.Service, vnodes: Sequence[model.VirtualNode],
              nodes: Sequence[model.Node], why: str = "move given up") -> None:
        """Take `vnodes` (replacements of moves given up, pooled guests that
        served or cannot thaw) out of `service`: through the Switch's drain
        where an Agent runs them, at once where none does."""
        if not vnodes:
            return
        ready = {n.name for n in nodes if n.state == READY}
        gone = [v for v in vnodes if v.node not in ready]
        leaving = [replace(v, deleting=True) for v in vnodes if v.node in ready]
        tx.delete_vnodes(gone)
        tx.put_vnodes(leaving)
        self._resume_moved_from(tx, vnodes)
        self._hold_for_draining(leaving, service.spec.switch.drain_seconds)
        tx.after_commit(functools.partial(log.info, "service %s: %s dropped (%s)", service.name,
                                          ", ".join(v.name for v in vnodes), why))
        tx.after_commit(functools.partial(self._publish_service, service.name, {v.node for v in leaving}))

    def _resume_moved_from(self, tx: Transaction, replacements: Sequence[model.VirtualNode]) -> None:
        """The virtual nodes that `replacements` (given up) were to replace
        stay, thawed where the move froze them."""
        names = {v.replaces for v in replacements if v.replaces}
        olds = [v for v in tx.list_vnodes(names=names) if v.moving_to and not v.deleting]
        if not olds:
            return
        tx.put_vnodes([replace(v, frozen=False, moving_to="", disk_base="") for v in olds])
        tx.after_commit(lambda: self._forget_holds(olds))
        tx.after_commit(functools.partial(log.info, "%s stay(s) where they run, thawed: their move was "
                                          "given up", ", ".join(v.name for v in olds)))
        for node in {v.node for v in olds}:
            tx.after_commit(functools.partial(self.notifier.publish, node_topic(node)))

    def remove_node(self, name: str) -> model.Node:
        """Forget a node that runs nothing (drained, or LOST with its
        virtual nodes placed elsewhere): its subnet is free again and every
        host drops its route."""
        def work(tx: Transaction) -> model.Node:
            node = tx.get_node(name)
            held = tx.list_vnodes(node=name)
            if held:
                raise WrongState(f"node {name} still holds {len(held)} virtual node(s) "
                                 f"({', '.join(sorted(v.name for v in held)[:5])}"
                                 f"{', ...' if len(held) > 5 else ''}): drain it first "
                                 f"(sodactl node drain {name} --wait)")
            if node.state == READY and not node.draining:
                raise WrongState(f"node {name} is READY: drain it first (sodactl node drain {name}), "
                                 "or stop its Agent")
            tx.delete_node(node)
            tx.after_commit(functools.partial(self.notifier.publish, NODES_TOPIC, SERVICES_TOPIC))
            tx.after_commit(functools.partial(log.info, "node %s removed (subnet %s is free)", name,
                                              node.subnet))
            return node

        node = self._unit_of_work(work)
        with self._lock:
            self._last_seen.pop(name, None)
            self._image_caches.pop(name, None)
            self._primes.pop(name, None)
        return _addressed(node)

    def _seen(self, node: str) -> None:
        """A node was heard from. Noted as it is heard, before the commit of
        what it said: a LOST node committed READY again must not look
        silent to a membership pass that reads it next."""
        with self._lock:
            self._last_seen[node] = self.monotonic()

    def list_nodes(self) -> list[model.Node]:
        now, wall = self.monotonic(), self.clock()
        with self._lock:
            usage = dict(self._usage)
            last_seen = dict(self._last_seen)
            caches = dict(self._image_caches)
        by_node: dict[str, list[model.Usage]] = {}
        for v in self.store.list_vnodes():
            if v.name in usage and v.node:
                by_node.setdefault(v.node, []).append(usage[v.name])
        out = []
        for n in self.store.list_nodes():
            if n.name in last_seen:
                n = replace(n, last_heartbeat=wall - (now - last_seen[n.name]))
            if n.name in caches:
                n = replace(n, image_cache=caches[n.name])
            out.append(replace(_addressed(n), usage=model.Usage.total(by_node.get(n.name, ()))))
        return out

    def membership(self) -> list[model.Node]:
        """Every node as a node-set watcher routes by: from the store alone,
        without the figures that change with every heartbeat (usage, last
        heartbeat), so the set moves only when membership does."""
        return [replace(_addressed(n), allocated=model.Resources(), vnodes=0, limits=(), assumed=())
                for n in self.store.list_nodes()]

    def report_status(self, node: str, statuses: Sequence[model.VirtualNodeStatus],
                      complete: bool, image_cache: model.ImageCacheState | None = None) -> None:
        """Record what an Agent observed. A complete report (heartbeat) also
        says which virtual nodes it no longer runs, and `image_cache` what
        its image cache holds."""
        if image_cache is not None:
            with self._lock:
                self._image_caches[node] = image_cache
                if node in self._primes:
                    self._primes[node] -= set(image_cache.images)
        def work(tx: Transaction) -> None:
            current = tx.get_node(node)      # NotFound makes the Agent register again
            self._seen(node)
            # Only a heartbeat brings a node back: its Agent sends the first
            # once it has stopped the guests it no longer owns (fencing); a
            # phase report may come before that.
            # A phase report needs only the virtual nodes it names; a
            # heartbeat all of the node's, to find those it no longer runs.
            mine = {v.name: v for v in tx.list_vnodes(
                node=node, names=None if complete else [s.name for s in statuses])}
            if current.state != READY and complete:
                # A heartbeat that still lists guests this node no longer
                # owns (an Agent that outlived a partition without
                # registering again) does not bring it back either.
                strangers = sorted(s.name for s in statuses if s.phase != model.Phase.STOPPED and (
                    s.name not in mine or (s.generation and s.generation < mine[s.name].generation)))
                if strangers:
                    tx.after_commit(functools.partial(
                        log.info, "node %s stays %s: it still runs %s, placed elsewhere since", node,
                        current.state, ", ".join(strangers)))
                else:
                    _check_address_free(tx, node, current.address)
                    tx.put_node(replace(current, state=READY))
                    tx.after_commit(functools.partial(log.info, "node %s is back", node))
                    tx.after_commit(functools.partial(self.notifier.publish, NODES_TOPIC))
            reported = {s.name: s for s in statuses}
            changed, removed = [], []
            for s in statuses:
                v = mine.get(s.name)
                if v is None or (s.generation and s.generation < v.generation):
                    continue
                if v.deleting and s.phase == model.Phase.STOPPED:
                    removed.append(v)
                else:
                    # An adopted guest reports no boot time: keep the one we have.
                    boot = s.boot_seconds or v.boot_seconds
                    if (v.phase, v.reason, v.boot_seconds) != (s.phase, s.reason, boot):
                        changed.append(v.with_status(s.phase, s.reason, boot))
            if complete:
                removed += [v for name, v in mine.items() if v.deleting and name not in reported]
            tx.put_vnodes(changed)
            tx.delete_vnodes(removed)
            if removed:
                self._finish_deletions(tx, {v.service for v in removed})
            if any(v.last_move is not None for v in removed):
                self._collect_disk_images(tx)       # only a moved one may boot a carried disk

            def committed() -> None:
                with self._lock:
                    self._record_usage(mine, statuses, complete)
                    for v in removed:
                        self._usage.pop(v.name, None)

                for service in sorted({v.service for v in changed + removed}):
                    self._publish_service(service)
            tx.after_commit(committed)

        self._unit_of_work(work, grouped=True)

    def assignments(self, node: str) -> dict[str, model.VirtualNode]:
        """The desired set of a physical node: what its Agent must run. A
        deleting virtual node a Switch is still draining keeps running, and
        a freezing one stays thawed."""
        vnodes = self.store.list_vnodes(node=node)
        with self._lock:
            now = self.monotonic()
            out = {}
            for v in vnodes:
                if v.deleting or v.frozen:
                    held = self.switches.holds(v.name, now)
                    if v.deleting and not held:
                        continue
                    if held:
                        v = replace(v, deleting=False, frozen=False, moving_to="")
                out[v.name] = v
            return out

    # ---- Switches -------------------------------------------------------
    def report_switch(self, report: model.SwitchReport) -> None:
        """A Switch's periodic report; kept in memory only."""
        with self._lock:
            self.switches.record(report, self.monotonic())
        self._release_drained()

    def _release_drained(self) -> None:
        """Tell the Agents of leaving virtual nodes no Switch holds any more."""
        with self._lock:
            released = set(self.switches.expired(self.monotonic()))
        if not released:
            return
        nodes = {v.node for v in self.store.list_vnodes() if v.name in released and v.node}
        if nodes:
            self.notifier.publish(*(node_topic(n) for n in nodes))

    def check_membership(self) -> list[str]:
        """Mark nodes whose heartbeats stopped LOST and place their virtual
        nodes again; retry virtual nodes that could not be placed; move
        virtual nodes off draining nodes (`_drain`). Returns the nodes
        newly lost."""
        self._release_drained()
        now = self.monotonic()
        # Most passes find nothing to do: tell so from committed state
        # without taking the write lock; the transaction decides again.
        if not self._membership_due(self.store, now):
            self._note_drain(_DrainPass())
            return []

        def work(tx: Transaction) -> list[str]:
            nodes = tx.list_nodes()
            lost = self._newly_lost(nodes, now)
            for node, _ in lost:
                tx.put_node(replace(node, state=LOST))
            # Why each node that is down went down, as the moves it causes record it.
            down = {n.name: f"node {n.name} is {n.state}" for n in nodes if n.state != READY}
            down.update((n.name, f"node {n.name} lost: no heartbeat for {silent:.0f} s") for n, silent in lost)
            stranded = [v for v in tx.list_vnodes() if not v.node or v.node in down]
            touched = self._replace(tx, stranded, down) if stranded else set()
            drain = self._drain(tx, now)
            touched |= drain.touched

            def committed() -> None:
                for node, silent in lost:
                    log.warning("node %s lost: no heartbeat for %.1f s", node.name, silent)
                if lost:
                    self.notifier.publish(NODES_TOPIC)
                for service in sorted(touched):
                    self._publish_service(service, nodes=set())
                self._note_drain(drain)
            tx.after_commit(committed)
            if touched:
                self._collect_disk_images(tx)       # of moves given up or done
            return [n.name for n, _ in lost]

        return self._unit_of_work(work)

    def _newly_lost(self, nodes: Sequence[model.Node], now: float) -> list[tuple[model.Node, float]]:
        """READY nodes silent for longer than node_lost_seconds, with how long."""
        with self._lock:
            silent = {n.name: now - self._last_seen.setdefault(n.name, now) for n in nodes}
        return [(n, silent[n.name]) for n in nodes
                if n.state == READY and silent[n.name] > self.config.node_lost_seconds]

    def _membership_due(self, state: StateReader, now: float) -> bool:
        """Whether a node is to be marked LOST, a virtual node waits for a
        place or a draining node still holds a live virtual node."""
        nodes = state.list_nodes()
        if self._newly_lost(nodes, now):
            return True
        if any(state.list_vnodes(node=name) for name in ["", *(n.name for n in nodes if n.state != READY)]):
            return True
        if state.moving_services():
            return True
        return any(not v.deleting for n in nodes if n.draining and n.state == READY
                   for v in state.list_vnodes(node=n.name))

    def _replace(self, tx: Transaction, stranded: Sequence[model.VirtualNode],
                 down: Mapping[str, str]) -> set[str]:
        """Place stranded virtual nodes again (or record why they wait);
        returns the services changed. `down` says why each node that is
        down is: a virtual node leaving one records it as its move (kept
        while it waits for room, so that where it came from is not lost)."""
        touched = set()
        gone = [v for v in stranded if v.deleting]
        tx.delete_vnodes(gone)
        touched.update(v.service for v in gone)
        draining = {n.name for n in tx.list_nodes() if n.draining}
        for v in stranded:
            if v.deleting:
                continue
            service = tx.get_service(v.service)
            moves, strays = moves_of(service, draining)
            half = next((m for m in moves if v.name in (m.old.name, m.new.name)), None)
            if half is not None or v.name in {u.name for u in strays}:
                # Half of a move: the other half stands in for it. A lost
                # replacement gives the move up (the one it was to replace
                # stays, thawed; a drain starts again); a lost leaver leaves
                # its replacement in its place, which boots the image afresh
                # if the disk had not come.
                tx.delete_vnodes([v])
                touched.add(v.service)
                if half is not None and half.new.name == v.name:
                    self._resume_moved_from(tx, [v])
                elif half is not None:
                    stays = replace(half.new, replaces="",
                                    image_digest=half.new.image_digest or v.image_digest)
                    tx.put_vnodes([stays])
                    tx.after_commit(functools.partial(self.notifier.publish, node_topic(stays.node)))
                tx.after_commit(functools.partial(log.info, "virtual node %s lost mid-move: not placed again",
                                                  v.name))
                continue
            spec = service.spec
            move = (model.VnodeMove(v.node, self.clock(), down.get(v.node, f"node {v.node} is gone"))
                    if v.node else v.last_move)
            counts: dict[str, int] = {}
            for other in tx.list_vnodes(service=v.service):
                counts[other.node] = counts.get(other.node, 0) + 1
            try:
                [moved] = self._place_new(tx, spec, v.image_digest, [v.index], [v.resources], [v.name], counts)
            except (NoCapacity, InvalidSpec) as exc:
                # InvalidSpec: no node left boots a guest that small.
                reason = f"waiting for room: {exc.message}"
                if v.node or v.reason != reason:
                    tx.put_vnodes([replace(v, node="", address="", phase=model.Phase.FAILED, reason=reason,
                                           last_move=move)])
                    touched.add(v.service)
                continue
            tx.put_vnodes([update_of(v, replace(moved, generation=v.generation + 1, last_move=move))])
            touched.add(v.service)
            tx.after_commit(functools.partial(log.info, "virtual node %s placed again on %s", v.name, moved.node))
            tx.after_commit(functools.partial(self.notifier.publish, node_topic(moved.node)))
        self._finish_deletions(tx, touched)
        return touched

    # ---- node drain -----------------------------------------------------
    def _drain(self, tx: Transaction, now: float) -> _DrainPass:
        """One step of every drain: finish the moves whose replacement is
        ready (the old virtual node leaves through the Switch's drain),
        then start one move on each draining node that has none in flight,
        for a service that has none either. A virtual node no other node
        has room for stays where it is, with the reason noted, and is
        tried again at the next pass."""
        out = _DrainPass()
        nodes = {n.name: n for n in tx.list_nodes()}
        draining = {name for name, n in nodes.items() if n.draining}
        moving = tx.moving_services()
        if not draining and not moving:
            return out
        with self._lock:
            stats = self.switches.vnode_stats(now)
            served = self.switches.services(now)
            seen = dict(self._replacements)
        busy: set[str] = set()                  # draining nodes with a move in flight
        moved: set[str] = set()                 # virtual nodes leaving now, replaced
        idle: list[model.Service] = []          # services with a virtual node to move and no move
        visited = [s for s in map(tx.get_service, sorted(moving | {v.service for name in draining
                                                                   for v in tx.list_vnodes(node=name)
                                                                   if not v.deleting}))
                   if not s.deleting]
        for service in visited:
            moves, strays = moves_of(service, draining)
            if strays:
                # Replacements placed on a node that is draining since.
                self._drop(tx, service, strays, list(nodes.values()))
                out.touched.add(service.name)
            for move in moves:
                late = self._disk_late(move)
                if late:
                    self._drop(tx, service, [move.new], list(nodes.values()), late)
                    out.touched.add(service.name)
                    continue
                waiting = self._replacement_waits(service, move, stats, seen, now,
                                                  served=service.name in served)
                if waiting:
                    out.replacements[move.new.name] = seen[move.new.name]
                    busy.add(move.old.node)
                    cause = (f"node {move.old.node} is draining" if move.old.node in draining
                             else "moved by an operator")
                    out.note(move.old, f"{cause}: moving to {move.new.name} on {move.new.node}, {waiting}")
                    out.note(move.new, f"replaces {move.old.name} ({cause})")
                else:
                    self._finish_move(tx, service, move)
                    moved.add(move.old.name)
                    out.touched.add(service.name)
                    out.nodes.update((move.old.node, move.new.node))
            if not moves and not strays:
                idle.append(service)
        started: set[str] = set()
        for name in sorted(draining):
            if name in busy or nodes[name].state != READY:
                continue        # a LOST node's virtual nodes are placed again as stranded ones
            candidates = [(service, v) for service in idle for v in _movable(service, draining)
                          if v.node == name]
            for service, v in candidates:
                if name in busy or service.name in started:
                    out.note(v, f"node {name} is draining: waiting for its turn to move")
                    continue
                receivers = _disk_receivers(nodes.values(), v, draining)
                try:
                    new = self._begin_move(tx, service, v, receivers or None, bool(receivers),
                                           f"replaces {v.name}: node {v.node} is draining")
                except (NoCapacity, InvalidSpec) as exc:
                    out.note(v, f"node {name} is draining: waiting for room elsewhere: {exc.message}")
                    continue
                busy.add(name)
                started.add(service.name)
                out.touched.add(service.name)
                out.nodes.add(new.node)
                out.note(v, f"node {name} is draining: moving to {new.name} on {new.node}, "
                            f"waiting for it to run")
                out.note(new, f"replaces {v.name} (node {name} is draining)")
        for service in visited:
            for v in service.vnodes:
                if not v.deleting and v.node in draining and v.name not in moved \
                        and v.name not in out.notes:
                    out.note(v, f"node {v.node} is draining: waiting for its turn to move")
        for node in out.nodes:
            tx.after_commit(functools.partial(self.notifier.publish, node_topic(node)))
        return out

    def _begin_move(self, tx: Transaction, service: model.Service, old: model.VirtualNode,
                    targets: Iterable[str] | None, carry: bool, why: str,
                    operator: bool = False) -> model.VirtualNode:
        """Place a replacement of `old` (the next index of its service, its
        resources) on one of `targets` (None: any node but its own).
        `carry`: it boots `old`'s disk, which `old`'s Agent sends once the
        Switches have let go of it and it is frozen; else its image."""
        index = max(v.index for v in service.vnodes) + 1
        counts: dict[str, int] = {}
        for v in service.vnodes:
            if not v.deleting:
                counts[v.node] = counts.get(v.node, 0) + 1
        # A carried disk is the hypervisor's guest's: the replacement keeps it.
        spec = replace(service.spec, hypervisor=old.hypervisor) if carry else service.spec
        [new] = self._place_new(tx, spec, "" if carry else old.image_digest, [index], [old.resources],
                                [model.vnode_name(service.name, index)], counts,
                                only=targets, avoid=old.node)
        new = replace(new, replaces=old.name, frozen=old.frozen,
                      last_move=model.VnodeMove(old.node, self.clock(), why))
        tx.put_vnodes([new])
        if carry:
            leaving = replace(old, frozen=True, moving_to=new.node,
                              disk_base=self._chain_of(old.image_digest)[-1].digest)
            self._hold_for_draining([leaving], service.spec.switch.drain_seconds)
        elif operator:
            # Serves on meanwhile; marked, so that the move goes on whatever
            # becomes of drains (a drain's is given up with an undrain).
            leaving = replace(old, moving_to=new.node)
        else:
            leaving = old
        tx.put_vnodes([leaving])
        tx.after_commit(functools.partial(
            log.info, "moving %s off node %s (%s): %s placed on %s, %s", old.name, old.node, why, new.name,
            new.node, "carrying its disk" if carry else "booting its image afresh"))
        for node in {old.node, new.node}:
            tx.after_commit(functools.partial(self.notifier.publish, node_topic(node)))
        return new

    def _disk_late(self, move: Move) -> str:
        """Why a move that carries a disk is given up ("" while it may wait)."""
        if not move.new.awaits_disk or move.new.last_move is None:
            return ""
        waited = self.clock() - move.new.last_move.at
        if waited < DISK_WAIT_SECONDS:
            return ""
        return f"move given up: the disk of {move.old.name} did not arrive within {waited:.0f} s"

    def _finish_move(self, tx: Transaction, service: model.Service, move: Move) -> None:
        """The replacement is ready: the old virtual node leaves, through
        the Switch's drain like any removed one."""
        leaving = replace(move.old, deleting=True)
        tx.put_vnodes([leaving, replace(move.new, replaces="")])
        if not move.old.frozen:
            # One frozen for the move was drained before it froze: held, it
            # would be thawed for nothing.
            self._hold_for_draining([leaving], service.spec.switch.drain_seconds)
        # The spec's per-node resources follow the live virtual nodes in
        # index order (what a resize applies them by): the replacement took
        # a new index, so they may have to be ordered anew.
        staying = sorted((v for v in service.vnodes if not v.deleting and v.name != move.old.name),
                         key=lambda v: v.index)
        resources = tuple(v.resources for v in staying)
        if resources != service.spec.resources and len(resources) == service.spec.nodes:
            tx.put_service(replace(service, spec=replace(service.spec, resources=resources)))
        tx.after_commit(functools.partial(log.info, "%s moved off node %s: %s runs on %s",
                                          move.old.name, move.old.node, move.new.name, move.new.node))

    def _replacement_waits(self, service: model.Service, move: Move,
                           stats: Mapping[str, model.SwitchVnodeStats],
                           seen: dict[str, _Replacement], now: float, served: bool = False) -> str:
        """What the replacement of `move` still waits for ("" when ready):
        RUNNING, and healthy at a Switch when a Switch reports the service.
        A Switch starts a new virtual node healthy and calls it unhealthy
        after `fall` failed checks, so healthy counts once it has stayed so
        for that long and one report more. A Switch that has not reported
        the replacement yet (it hears of it at once and reports every few
        seconds) is waited for up to STALE_SECONDS longer; after that the
        move goes on, unless the Switch finds the replacement unhealthy
        and the old one healthy, which is never a good trade."""
        new, old = move.new, move.old
        if new.frozen:
            # A frozen one (a warm pool's) is ready once booted and frozen;
            # no Switch routes to it, so none is waited for.
            if new.phase == model.Phase.FROZEN:
                return ""
            seen[new.name] = _Replacement()
            return f"waiting for it to boot and freeze ({new.phase.name})"
        if new.phase != model.Phase.RUNNING:
            seen[new.name] = _Replacement()
            return f"waiting for it to run ({new.phase.name})"
        watched = seen.get(new.name) or _Replacement()
        if watched.running_since is None:
            watched = replace(watched, running_since=now)
        # A Switch serves the service when its report lists it, or any of
        # its virtual nodes (a report between the old one let go and the
        # replacement known may list none of them).
        if not served and not any(v.name in stats for v in service.vnodes):
            seen[new.name] = watched
            return ""           # no Switch serves the service
        health = service.spec.switch.health
        settle = 0.0 if health.kind == "none" else \
            health.fall * (health.interval + health.timeout) + SWITCH_REPORT_SECONDS
        mine = stats.get(new.name)
        if mine is not None and mine.routable and mine.healthy:
            if watched.healthy_since is None:
                watched = replace(watched, healthy_since=now)
            seen[new.name] = watched
            if now - watched.healthy_since >= settle:
                return ""
            return "waiting for the Switch's health checks"
        seen[new.name] = replace(watched, healthy_since=None)
        theirs = stats.get(old.name)
        if mine is not None and mine.routable and theirs is not None and theirs.healthy:
            return f"which fails the Switch's health checks ({old.name} passes them)"
        if now - watched.running_since < STALE_SECONDS + settle:
            return "waiting for a Switch to report it healthy"
        return ""

    def _note_drain(self, drain: _DrainPass) -> None:
        """Keep what a committed pass found and tell the watchers of the
        services whose notes changed."""
        with self._lock:
            before, self._drain_notes = self._drain_notes, dict(drain.notes)
            self._replacements = dict(drain.replacements)
        changed = sorted({svc for name, (svc, text) in before.items() if drain.notes.get(name) != (svc, text)}
                         | {svc for name, (svc, text) in drain.notes.items() if before.get(name) != (svc, text)})
        for service in changed:
            self._publish_service(service)

    # ---- images -------------------------------------------------------
    def push_image(self, name: str, size: int, digest: str, init: str,
                   chunks: Iterable[bytes], tenant: str | None = None, public: bool = False,
                   base: str = "") -> model.Image:
        """Receive an image (with `base`, a layer over that image, one the
        caller may use); a tenant's becomes its own, within its image_bytes
        quota (what is stored: a layered image's layer), under a name no
        other tenant holds. Checked before the content arrives, and again as
        it is recorded."""
        if not model.DIGEST_RE.match(digest or ""):
            raise InvalidSpec(f"push must announce the sha256 digest of its content, got {digest!r}")
        return self._receive(name, size, digest, init, chunks, tenant, public, base, "pushed")

    def fetch_image(self, url: str, digest: str = "", name: str = "", init: str = "",
                    tenant: str | None = None, public: bool = False, base: str = "") -> model.Image:
        """Fetch an image (with `base`, a layer) from `url` (soda.master.fetch)
        and receive it as a push of the same content, checked against
        `digest` when given; a tenant only from public addresses."""
        if digest and not model.DIGEST_RE.match(digest):
            raise InvalidSpec(f"--sha256 takes sha256:<64 hex digits>, got {digest!r}")
        download = UrlDownload(url, self.fetch_limits, public_only=tenant is not None)
        try:
            size = download.open()
            image = self._receive(name, size, digest, init, download.chunks(), tenant, public, base,
                                  f"fetched from {url}" + (f" (resumed {download.resumed} time(s))"
                                                           if download.resumed else ""))
        finally:
            download.close()
        return image

    def _receive(self, name: str, size: int, digest: str, init: str, chunks: Iterable[bytes],
                 tenant: str | None, public: bool, base: str, how: str) -> model.Image:
        if public and tenant is not None:
            raise PermissionDenied(f"tenant {tenant} may not make an image public (an operator does)")
        parent = None
        if base:
            parent = self.store.resolve_image(base)
            model.check_image_use(parent, tenant, f"layer an image on image {base!r}")
        announced = model.Image(digest=digest, size=size)
        self._check_image_push(self.store, name, announced, tenant)
        image = self.images.receive(name, size, digest, init, chunks, owner=tenant or model.OPERATORS,
                                    public=public, base=parent,
                                    check=lambda tx, image: self._check_image_push(tx, name, image, tenant))
        log.info("image %s %s (%d bytes%s%s)", image.digest, how, image.size,
                 f", a layer of {image.layer_size} bytes over {image.parent}" if image.layer else "",
                 f", name {name}" if name else "")
        return model.as_seen_by(image, tenant)

    def _check_image_push(self, state: StateReader, name: str, new: model.Image,
                          tenant: str | None) -> None:
        if tenant is None:
            return
        if name:
            holder = state.image_name_owner(name)
            if holder is not None and holder != tenant:
                raise PermissionDenied(f"tenant {tenant} may not push image name {name!r}: another "
                                       f"owner holds it (choose another name)")
        quota = state.quotas().get(tenant)
        if quota is None or quota.image_bytes is None:
            return
        images = state.list_images()
        if any(i.digest == new.digest and tenant in i.owners for i in images):
            return                                  # already counted
        new = replace(new, owners=(tenant,))
        model.check_quota(tenant, quota, model.usage_of(tenant, (), [*images, new]))

    def list_images(self, tenant: str | None = None) -> list[model.Image]:
        return [model.as_seen_by(i, tenant) for i in self.store.list_images() if model.may_use(i, tenant)]

    def get_image(self, ref: str, tenant: str | None = None) -> tuple[model.Image, list[str], list[str], list[str]]:
        """An image the caller may use, the images layered directly on it,
        the services that boot it (a tenant sees its own services) and the
        nodes whose cache holds it."""
        image = self.store.resolve_image(ref)
        model.check_image_use(image, tenant, f"inspect image {ref!r}")
        children = [i.digest for i in self.store.list_images()
                    if i.parent == image.digest and model.may_use(i, tenant)]
        services = [s.name for s in self.store.list_services()
                    if s.image_digest == image.digest and (tenant is None or s.owner == tenant)]
        with self._lock:
            nodes = sorted(n for n, c in self._image_caches.items() if image.digest in c.images)
        return model.as_seen_by(image, tenant), children, services, nodes

    def prime_image(self, ref: str, nodes: Sequence[str] = (), tenant: str | None = None) -> list[str]:
        """Ask `nodes` (every READY node when none) to pull the image into
        their caches ahead of need, with their next heartbeat; the nodes
        asked. Kept in memory until each node's cache reports the image."""
        image = self.store.resolve_image(ref)
        model.check_image_use(image, tenant, f"prime image {ref!r}")
        known = {n.name: n for n in self.store.list_nodes()}
        unknown = sorted(set(nodes) - set(known))
        if unknown:
            raise NotFound(f"no physical node named {', '.join(map(repr, unknown))} (sodactl node list)")
        asked = sorted(nodes) if nodes else sorted(n for n, node in known.items() if node.state == READY)
        with self._lock:
            for name in asked:
                held = self._image_caches.get(name)
                if held is None or image.digest not in held.images:
                    self._primes.setdefault(name, set()).add(image.digest)
        log.info("image %s to be primed on %s", image.digest, ", ".join(asked) or "no node")
        return asked

    def primes_for(self, node: str) -> tuple[str, ...]:
        """The images `node` is asked to pull ahead of need."""
        with self._lock:
            return tuple(sorted(self._primes.get(node, ())))

    def image_for(self, ref: str, tenant: str | None = None, node: str | None = None) -> model.Image:
        """The image `ref` if the caller may read it: a tenant one it may
        use, an Agent (`node`) one that a virtual node placed on it boots
        or that it was asked to prime, or that such an image is layered on."""
        image = self.store.resolve_image(ref)
        model.check_image_use(image, tenant, f"pull image {ref!r}")
        if node is not None:
            booted = {v.image_digest for v in self.store.list_vnodes(node=node)} | set(self.primes_for(node))
            needed = {i.digest for d in booted for i in self._chain_of(d)}
            if image.digest not in needed:
                raise PermissionDenied(f"agent {node} may not pull image {ref!r}: no virtual node on "
                                       f"node {node} uses it")
        return model.as_seen_by(image, tenant)

    def _chain_of(self, digest: str) -> list[model.Image]:
        try:
            return self.images.chain(self.store.resolve_image(digest))
        except NotFound:
            return []

    def delete_image(self, ref: str, tenant: str | None = None) -> model.Image:
        """An operator deletes the image; a tenant gives up its ownership,
        which deletes the image only when nobody else owns it."""
        def work(tx: Transaction) -> model.Image:
            image = tx.resolve_image(ref)
            if tenant is not None:
                if tenant not in image.owners:
                    raise PermissionDenied(f"tenant {tenant} may not delete image {ref!r}: it does not "
                                           f"own it")
                others = tuple(o for o in image.owners if o != tenant)
                if others or image.public:
                    tx.put_image(replace(image, owners=others))
                    return model.as_seen_by(replace(image, owners=others), tenant)
            users = [s.name for s in tx.list_services() if s.image_digest == image.digest]
            return model.as_seen_by(self.images.delete(tx, image, users), tenant)

        return self._unit_of_work(work)

    # ---- tenants ------------------------------------------------------
    def set_quota(self, tenant: str, quota: model.Quota | None) -> model.Tenant:
        model.check_tenant_name(tenant)

        def work(tx: Transaction) -> None:
            tx.put_quota(tenant, quota)
            tx.after_commit(functools.partial(log.info, "tenant %s: quota %s", tenant,
                                              quota.as_dict() if quota else "removed"))
        self._unit_of_work(work)
        return self.list_tenants(only=tenant)[0]

    def list_tenants(self, only: str | None = None) -> list[model.Tenant]:
        """Every tenant that has a quota, a service or an image (or only `only`)."""
        quotas = self.store.quotas()
        specs = self.store.list_service_owners()
        images = self.store.list_images()
        names = set(quotas) | {o for o, _ in specs if o} | {o for i in images for o in i.owners}
        if only is not None:
            names = {only}
        return [model.Tenant(name=name, quota=quotas.get(name, model.Quota()),
                             usage=model.usage_of(name, specs, images),
                             services=sum(1 for o, _ in specs if o == name),
                             images=sum(1 for i in images if name in i.owners))
                for name in sorted(names)]

    # ---- endpoints ----------------------------------------------------
    def endpoint_sets(self, service: str = "") -> list[model.EndpointSet]:
        services = [self.store.get_service(service)] if service else self.store.list_services()
        return [endpoint_set(s) for s in services]

    # ---- notification -------------------------------------------------
    def _publish_service(self, service: str, nodes: Iterable[str] = ()) -> None:
        self.notifier.publish(SERVICES_TOPIC, service_topic(service), ENDPOINTS_TOPIC,
                              *(node_topic(n) for n in nodes if n))


def _can_freeze(tx: StateReader, v: model.VirtualNode) -> bool:
    try:
        _check_can_freeze(tx, v)
    except (WrongState, NotFound):
        return False
    return True


def _thawable(tx: StateReader, frozen: Sequence[model.VirtualNode],
              need: int) -> tuple[list[model.VirtualNode], list[model.VirtualNode]]:
    """Up to `need` of `frozen`, thawed (frozen=False), whose nodes are READY,
    not draining, and have the CPU for them again (a frozen virtual node
    holds its memory, not its CPU); and the others."""
    nodes = {n.name: n for n in tx.list_nodes()}
    spare: dict[str, float] = {}
    thawed, unfit = [], []
    for v in frozen:
        node = nodes.get(v.node)
        if len(thawed) < need and node is not None and node.state == READY and not node.draining:
            free = spare.setdefault(v.node, node.capacity.cpu - node.allocated.cpu)
            if free + 1e-9 >= v.resources.cpu:
                spare[v.node] = free - v.resources.cpu
                thawed.append(replace(v, frozen=False))
                continue
        unfit.append(v)
    return thawed, unfit


def _disk_receivers(nodes: Iterable[model.Node], v: model.VirtualNode, draining: set[str],
                    only: str | None = None) -> list[str]:
    """The nodes (only `only`, if given) that a move of `v` may carry its
    disk to: READY, not draining, not its own, with a driver of its
    hypervisor that can take a guest's disk, when the driver running it can
    send it and it runs, not frozen (a guest that does not run has nothing
    to carry)."""
    nodes = list(nodes)
    source = next((n for n in nodes if n.name == v.node), None)
    sends = source.limit(v.hypervisor) if source is not None else None
    # One frozen already (a warm pool's, or by hand) moves as it is kept:
    # booted on the target and frozen there once it runs; a move given up
    # would otherwise have to know to leave it frozen.
    if sends is None or not sends.migration or v.frozen or v.phase != model.Phase.RUNNING:
        return []
    return sorted(n.name for n in nodes
                  if n.state == READY and n.name not in draining and n.name != v.node
                  and (only is None or n.name == only)
                  and (lim := n.limit(v.hypervisor)) is not None and lim.migration)


def _cannot_carry(nodes: Mapping[str, model.Node], v: model.VirtualNode, to: str) -> str:
    """Why a move of `v` cannot carry its disk, and what to do instead."""
    source = nodes.get(v.node)
    sends = source.limit(v.hypervisor) if source is not None else None
    if sends is None or not sends.migration:
        why = f"the {v.hypervisor} driver of node {v.node} cannot send a guest's disk"
    elif v.frozen:
        why = "it is frozen (thaw it first to carry its disk)"
    elif v.phase != model.Phase.RUNNING:
        why = f"it is {v.phase.name}, so it has no disk to carry"
    elif to:
        why = f"the {v.hypervisor} driver of node {to} cannot take a guest's disk"
    else:
        why = f"no other READY node has a {v.hypervisor} driver that can take a guest's disk"
    return (f"cannot move virtual node {v.name} with its disk: {why}; pass --cold to boot its image "
            f"afresh on the target instead (what the guest wrote is lost)")


def _check_can_freeze(tx: Transaction, v: model.VirtualNode) -> None:
    """WrongState unless the driver that runs `v` where it is placed can freeze."""
    if not v.node:
        raise WrongState(f"virtual node {v.name} is not placed on a node: nothing to freeze")
    node = tx.get_node(v.node)
    caps = {c.hypervisor: c for c in node.limits}
    can = caps.get(v.hypervisor)
    if can is None or not can.freeze:
        able = sorted(c.hypervisor for c in node.limits if c.freeze)
        raise WrongState(f"virtual node {v.name} runs on {v.hypervisor or 'its hypervisor'} on node {v.node}, "
                         f"whose driver cannot freeze guests (drivers there that can: "
                         f"{', '.join(able) or 'none'}); stop it instead (resize the service)")


def _check_limits(node: str, hypervisors: Sequence[str], limits: Sequence[model.DriverCapabilities]) -> None:
    seen = set()
    for limit in limits:
        if limit.hypervisor not in hypervisors or limit.hypervisor in seen:
            raise InvalidSpec(f"node {node}: limits name hypervisor {limit.hypervisor!r} "
                              f"{'twice' if limit.hypervisor in seen else 'which it does not offer'}")
        if limit.min_memory < 0:
            raise InvalidSpec(f"node {node}: minimum memory for {limit.hypervisor} must not be "
                              f"negative, got {limit.min_memory}")
        seen.add(limit.hypervisor)


def _check_address_free(tx: StateReader, node: str, address: str) -> None:
    """AlreadyExists if another READY node holds `address`: other hosts
    reach a node at it, so two that share one are a mistake (two Agents on
    one host left at the same default) that would send one node's traffic
    to the other. A LOST node's address is free: its machine may come back
    under another name."""
    holder = next((name for name, state in sorted(tx.node_states(address).items())
                   if name != node and state == READY), None)
    if holder is not None:
        raise AlreadyExists(f"node {node}: address {address} is already held by node {holder}, "
                            f"which is READY: give each node its own address (soda-agent --address) "
                            f"or stop {holder} first")


def _on_demand(service: model.Service, action: str) -> model.OnDemand:
    if service.spec.on_demand is None:
        raise WrongState(f"cannot {action} service {service.name!r}: it has no on_demand section "
                         "(resize it instead)")
    if service.deleting:
        raise WrongState(f"service {service.name!r} is being deleted")
    return service.spec.on_demand


@dataclasses.dataclass(frozen=True)
class Move:
    """A virtual node leaving a draining node (`old`) and the one placed
    elsewhere to replace it (`new`); both live until `new` is ready."""
    old: model.VirtualNode
    new: model.VirtualNode


def moves_of(service: model.Service,
             draining: set[str]) -> tuple[list[Move], list[model.VirtualNode]]:
    """The moves in flight of `service` (each replacement names the virtual
    node it replaces), and the replacements that no longer replace anything
    (to be dropped): the one they replaced is gone, they were placed on a
    node that is draining since, or they are a drain's whose node was
    undrained (an operator's move, which sets the old one's `moving_to`,
    goes on)."""
    if service.deleting:
        return [], []
    live = {v.name: v for v in service.vnodes if not v.deleting}
    moves, strays = [], []
    for new in sorted(live.values(), key=lambda v: v.index):
        if not new.replaces:
            continue
        old = live.get(new.replaces)
        if old is None or new.node in draining or (not old.moving_to and old.node not in draining):
            strays.append(new)
        else:
            moves.append(Move(old=old, new=new))
    return moves, strays


def _movable(service: model.Service, draining: set[str]) -> list[model.VirtualNode]:
    """The live virtual nodes of `service` on draining nodes that no move
    has begun from, lowest index first."""
    replaced = {v.replaces for v in service.vnodes if v.replaces and not v.deleting}
    return [v for v in sorted(service.vnodes, key=lambda v: v.index)
            if not v.deleting and not v.replaces and v.node in draining and v.name not in replaced]


@dataclasses.dataclass(frozen=True)
class _Replacement:
    """When a replacement was first seen RUNNING, and healthy at a Switch
    (monotonic seconds; None: not yet, or not since it was last seen
    otherwise)."""
    running_since: float | None = None
    healthy_since: float | None = None


@dataclasses.dataclass
class _DrainPass:
    """What one drain pass did and saw."""
    touched: set[str] = dataclasses.field(default_factory=set)          # services changed
    nodes: set[str] = dataclasses.field(default_factory=set)            # nodes whose desired set changed
    notes: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    replacements: dict[str, _Replacement] = dataclasses.field(default_factory=dict)

    def note(self, vnode: model.VirtualNode, text: str) -> None:
        self.notes[vnode.name] = (vnode.service, text)


def _placement_view(nodes: Sequence[model.Node], draining: set[str]) -> list[model.Node]:
    """`nodes` as the scheduler is to see them: a READY node in `draining`
    takes nothing new (shown as DRAINING, so that it still counts as one
    offering its hypervisors)."""
    return [replace(n, state=DRAINING) if n.name in draining and n.state == READY else n for n in nodes]


def _addressed(node: model.Node) -> model.Node:
    """The node with every address IPAM gives it (the uplink is derived)."""
    return replace(node, uplink=ipam.node_addresses(node.subnet).uplink) if node.subnet else node


def _template(spec: model.ServiceSpec) -> model.Resources:
    """Resources of a node added to a service that has none left."""
    if spec.on_demand is not None:
        return spec.on_demand.resources
    return spec.template


def _coming(v: model.VirtualNode) -> bool:
    """Whether `v` will serve again shortly without a new boot: frozen for
    a move, or thawing (the Switch holds new connections for it when
    nothing else serves)."""
    carried = bool(v.moving_to) and bool(v.disk_base)       # a cold move's serves on meanwhile
    return carried or (not v.frozen and v.phase in (model.Phase.FROZEN, model.Phase.THAWING))


def endpoint_set(service: model.Service) -> model.EndpointSet:
    return model.EndpointSet(
        service=service.name, switch=service.spec.switch, on_demand=service.spec.on_demand,
        network=service.spec.network, endpoints=tuple(model.Endpoint(vnode=v.name, address=v.address, port=v.port, weight=v.weight,
                                       ready=v.phase == model.Phase.RUNNING and not v.frozen,
                                       frozen=v.frozen, moving=_coming(v))
                        for v in service.vnodes if not v.deleting and v.address))
