"""How sodactl shows things: machine dicts, tables for people, and formats.

Owns the shape of sodactl's json/yaml output (scripts depend on it: add
keys, never rename or remove them) and the one table formatter every
command uses. Pure functions of soda.model objects; no I/O, no client.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

from soda import model
from soda.cli.rollout import Rollout

OUTPUT_FORMATS = ("table", "json", "yaml")
COLUMN_GAP = "   "
EMPTY_CELL = "-"
SHORT_DIGEST_HEX = 12


# ---- machine output ------------------------------------------------------

def timestamp(seconds: float) -> str | None:
    """RFC 3339 UTC, or None when the Master did not record a time."""
    if not seconds:
        return None
    moment = datetime.fromtimestamp(seconds, timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def usage_to_dict(usage: model.Usage | None) -> dict | None:
    """Measured usage, None when nothing was reported (fake guests, a Master
    that restarted and has not heard a heartbeat yet)."""
    if usage is None:
        return None
    return {field: getattr(usage, field) for field in model.USAGE_FIELDS}


def vnode_to_dict(vnode: model.VirtualNode) -> dict:
    return {
        "name": vnode.name,
        "node": vnode.node,
        "address": vnode.address,
        "phase": vnode.phase.name,
        "resources": vnode.resources.as_dict(),
        "weight": vnode.weight,
        "boot_seconds": vnode.boot_seconds,
        "reason": vnode.reason,
        "hypervisor": vnode.hypervisor,
        "deleting": vnode.deleting,
        "frozen": vnode.frozen,             # asked to be paused in place (service freeze)
        "replaces": vnode.replaces,         # a move in flight: the virtual node it replaces
        "moving_to": vnode.moving_to,       # a move in flight that carries its disk: the target node
        "usage": usage_to_dict(vnode.usage),
        # What the Switch(es) measured: None when no Switch reported it.
        "switch": dataclasses.asdict(vnode.switch_stats) if vnode.switch_stats is not None else None,
        # The last time it was placed again (node lost, drain): None when never.
        "last_move": dataclasses.asdict(vnode.last_move) if vnode.last_move is not None else None,
    }


def service_to_dict(service: model.Service) -> dict:
    spec = service.spec
    return {
        "name": spec.name,
        "image": spec.image,
        "image_digest": service.image_digest,
        "hypervisor": spec.hypervisor,
        "nodes": spec.nodes,
        "port": spec.port,
        "cpu_cap": spec.cpu_cap,
        "boot_timeout": spec.boot_timeout,
        "switch": spec.switch.as_dict(),
        "on_demand": spec.on_demand.as_dict() if spec.on_demand is not None else None,
        "network": spec.network.as_dict(),
        "state": Rollout.of(service).state,
        "deleting": service.deleting,
        "owner": owner_text(service.owner),
        "created_at": timestamp(service.created_at),
        "vnodes": [vnode_to_dict(v) for v in _by_index(service.vnodes)],
    }


def node_state(node: model.Node) -> str:
    """READY or LOST, and for a node an operator drains DRAINING while it
    holds virtual nodes, DRAINED once it holds none: READY,DRAINED."""
    if not node.draining:
        return node.state
    return f"{node.state},{'DRAINING' if node.vnodes else 'DRAINED'}"


def node_to_dict(node: model.Node) -> dict:
    return {
        "name": node.name,
        "address": node.address,
        "state": node.state,
        # Drained by an operator (sodactl node drain): nothing new is placed
        # there; "vnodes" says how many it still holds.
        "draining": node.draining,
        "subnet": node.subnet,
        "gateway": node.gateway,
        "hypervisors": list(node.hypervisors),
        "labels": dict(sorted(node.labels.items())),
        "capacity": node.capacity.as_dict(),
        "allocated": node.allocated.as_dict(),
        # Capacity fields the node could not measure and took a default for.
        "assumed": list(node.assumed),
        "vnodes": node.vnodes,
        "usage": usage_to_dict(node.usage),
        # The smallest guest each hypervisor boots there, and the kernel that says so.
        "min_memory": {lim.hypervisor: {"mib": lim.min_memory, "kernel": lim.kernel}
                       for lim in node.limits},
        # What each driver there declares and found (the Master decides from
        # these); "allocated" counts each guest's memory_overhead.
        "drivers": {c.hypervisor: {"memory_overhead": c.memory_overhead, "live_memory": c.live_memory,
                                   "freeze": c.freeze, "disk_bound": c.disk_bound,
                                   "plumbing": c.plumbing, "migration": c.migration,
                                   "attributes": dict(c.attributes)}
                    for c in node.limits},
        # No last_heartbeat: it changes every few seconds, and scripts compare
        # node lists to see whether anything changed. `state` says LOST. Nor
        # the image cache, which changes with every pull: node get shows it.
    }


def node_detail_to_dict(node: model.Node) -> dict:
    """node_to_dict and what changes by itself: the image cache as the
    node's last heartbeat said (bytes on disk, the bound, 0 = none, and the
    images it holds; None before its first heartbeat)."""
    return {**node_to_dict(node),
            "image_cache": dataclasses.asdict(node.image_cache) if node.image_cache is not None else None}


def image_to_dict(image: model.Image) -> dict:
    return {
        "digest": image.digest,
        "names": list(image.names),
        "size": image.size,
        "stored_size": image.stored_size,
        "parent": image.parent,
        "layer": image.layer,
        "init": image.init,
        "owners": list(image.owners),
        "public": image.public,
        "created_at": timestamp(image.created_at),
    }


def image_detail_to_dict(image: model.Image, chain: Sequence[model.Image], children: Sequence[str],
                         services: Sequence[str], nodes: Sequence[str]) -> dict:
    return {**image_to_dict(image),
            "layers": [{"digest": i.digest, "names": list(i.names), "size": i.size,
                        "stored_size": i.stored_size, "layer": i.layer} for i in chain],
            "images": list(children), "services": list(services), "nodes": list(nodes)}


def image_label(image: model.Image) -> str:
    return ",".join(image.names) or short_digest(image.digest)


def image_detail(image: model.Image, chain: Sequence[model.Image], children: Sequence[str],
                 services: Sequence[str], nodes: Sequence[str]) -> str:
    """One image: what it is made of (top layer first), what uses it."""
    stored = sum(i.stored_size for i in chain)
    summary = format_fields([
        ("Digest", image.digest),
        ("Names", ",".join(image.names) or "-"),
        ("Size", f"{format_bytes(image.size)} ({image.size} bytes)"),
        ("Stored", f"{format_bytes(image.stored_size)}" + (
            f" (a layer over {image_label(chain[1])}; with its parents {format_bytes(stored)})"
            if image.layer and len(chain) > 1 else " (whole)")),
        ("Init", image.init),
        ("Owners", ",".join(image.owners) or "(operators)"),
        ("Public", "yes" if image.public else "no"),
        ("Created", timestamp(image.created_at)),
        ("Images on it", ", ".join(short_digest(c) for c in children) or "none"),
        ("Services", ", ".join(services) or "none"),
        ("Cached on", ", ".join(nodes) or "no node"),
    ])
    layers = format_table(("LAYER", "IMAGE", "NAMES", "STORED", "SIZE"),
                          [(n, short_digest(i.digest), ",".join(i.names), format_bytes(i.stored_size),
                            format_bytes(i.size)) for n, i in enumerate(chain)])
    return summary + "\n\n" + layers


def owner_text(owner: str) -> str:
    """Who owns a service: its tenant, or the operators."""
    return owner or "(operators)"


def tenant_to_dict(tenant: model.Tenant) -> dict:
    return {"name": tenant.name, "quota": tenant.quota.as_dict(), "usage": tenant.usage.as_dict(),
            "services": tenant.services, "images": tenant.images}


def tenants_table(tenants: Iterable[model.Tenant]) -> str:
    """Each quota as USED/LIMIT (no limit: USED/-)."""
    def cell(t: model.Tenant, name: str) -> str:
        used, limit = getattr(t.usage, name), getattr(t.quota, name)
        shown = format_bytes(used) if name == "image_bytes" else f"{used:g}"
        if limit is None:
            return f"{shown}/-"
        return f"{shown}/{format_bytes(limit) if name == 'image_bytes' else f'{limit:g}'}"

    rows = [(t.name, t.services, t.images) + tuple(cell(t, name) for name in model.QUOTA_FIELDS)
            for t in tenants]
    return format_table(("NAME", "SERVICES", "IMAGES")
                        + tuple(name.upper().replace("_", "-") for name in model.QUOTA_FIELDS), rows)


def render(data: Any, output: str, table: Callable[[], str]) -> str:
    """`data` as json or yaml, or what `table` draws for people."""
    if output == "json":
        return json.dumps(data, indent=2)
    if output == "yaml":
        # Imported here: ~15 ms of every sodactl's start-up otherwise.
        import yaml
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip("\n")
    return table()


# ---- text for people -----------------------------------------------------

def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns as wide as their widest cell; empty cells show '-'."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)]
    lines = []
    for row in [list(headers)] + cells:
        lines.append(COLUMN_GAP.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)


def format_fields(fields: Sequence[tuple[str, Any]]) -> str:
    """'Key:   value' lines with the values aligned."""
    width = max(len(key) for key, _ in fields) + 1
    return "\n".join(f"{key + ':':<{width}}  {_cell(value)}" for key, value in fields)


def format_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_size(count: int | None) -> str:
    """A compact size for usage columns: 12.3Mi, 512Ki, 80B."""
    if count is None:
        return ""
    size = float(count)
    for unit in ("B", "Ki", "Mi", "Gi"):
        if size < 1024 or unit == "Gi":
            return f"{count}B" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    raise AssertionError("unreachable")


def usage_cells(usage: model.Usage | None) -> tuple[str, ...]:
    """CPU-S, MEM, MEM-PEAK, IN, OUT, DROPPED (packets the node refused
    it), FORKS-REFUSED (at its pids limit): empty (shown '-') when unknown."""
    if usage is None:
        return ("",) * len(USAGE_HEADERS)
    return (f"{usage.cpu_seconds:.1f}", format_size(usage.memory_bytes),
            format_size(usage.memory_peak_bytes), format_size(usage.bytes_in),
            format_size(usage.bytes_out), str(usage.packets_refused), str(usage.pids_refused))


USAGE_HEADERS = ("CPU-S", "MEM", "MEM-PEAK", "IN", "OUT", "DROPPED", "FORKS-REFUSED")


def short_digest(digest: str) -> str:
    algorithm, _, hex_digits = digest.partition(":")
    return f"{algorithm}:{hex_digits[:SHORT_DIGEST_HEX]}" if hex_digits else digest


def on_demand_text(on_demand: model.OnDemand | None) -> str:
    if on_demand is None:
        return "no"
    r = on_demand.resources
    rest = (f"{on_demand.warm} frozen (warm pool; guests that served are "
            f"{'frozen' if on_demand.idle == 'freeze' else 'stopped'})" if on_demand.warm else "zero")
    return (f"up to {on_demand.max_nodes} node(s) of cpu {r.cpu:g}, {r.memory}Mi, {r.bandwidth}Mbit, "
            f"disk {r.disk}Mi; back to {rest} after {on_demand.idle_seconds:g} s idle")


def network_text(network: model.NetworkSpec) -> str:
    """What the node's policy lets the guests reach beyond the Switch's
    connections and the replies."""
    peers = "peers reach each other" if network.peers else "peers isolated"
    egress = ", ".join(map(str, network.egress)) or "nothing else"
    return f"{peers}; out to {egress}"


def health_text(h: model.HealthCheck) -> str:
    if h.kind == "none":
        return "no health checks"
    what = f"GET {h.path} = {h.expect_status}" if h.kind == "http" else "tcp connect"
    return (f"health {what} every {h.interval:g} s (timeout {h.timeout:g} s, "
            f"rise {h.rise}, fall {h.fall})")


def service_table(service: model.Service) -> str:
    spec = service.spec
    rollout = Rollout.of(service)
    image = spec.image if spec.image == service.image_digest or not service.image_digest \
        else f"{spec.image} ({short_digest(service.image_digest)})"
    switch = f"{spec.switch.listen} {spec.switch.policy}" if spec.switch.listen \
        else f"(no listener) {spec.switch.policy}"
    switch += f", mode {spec.switch.mode}, {health_text(spec.switch.health)}, drain {spec.switch.drain_seconds:g} s"
    summary = format_fields([
        ("Name", spec.name),
        ("Image", image),
        ("Hypervisor", spec.hypervisor or "any"),
        ("Port", spec.port),
        ("Boot timeout", f"{spec.boot_timeout:g} s" if spec.boot_timeout else "the hypervisor's default"),
        ("CPU", "capped at its cores" if spec.cpu_cap else "proportional share"),
        ("Switch", switch),
        ("On demand", on_demand_text(spec.on_demand)),
        ("Network", network_text(spec.network)),
        ("State", f"{rollout.state} ({len(rollout.running)}/{rollout.wanted} running)"),
        ("Created", timestamp(service.created_at)),
    ])
    vnodes = format_table(
        ("NAME", "NODE", "ADDRESS", "PHASE", "CPU", "MEMORY", "BANDWIDTH", "DISK", "WEIGHT", "BOOT")
        + USAGE_HEADERS + ("REASON",),
        [(v.name, v.node, v.address, v.phase.name + (" (deleting)" if v.deleting else ""),
          f"{v.resources.cpu:g}", f"{v.resources.memory}Mi", f"{v.resources.bandwidth}Mbit",
          f"{v.resources.disk}Mi", f"{v.weight:g}", f"{v.boot_seconds:.1f}s" if v.boot_seconds else "")
         + usage_cells(v.usage) + (v.reason,) for v in _by_index(service.vnodes)])
    parts = [summary, vnodes]
    moved = [v for v in _by_index(service.vnodes) if v.last_move is not None]
    if moved:
        parts.append("Moved:\n" + format_table(
            ("NAME", "NOW ON", "FROM", "AT", "WHY"),
            [(v.name, v.node or "(unplaced)", m.from_node, timestamp(m.at) or "", m.why)
             for v in moved for m in (v.last_move,)]))
    switched = [v for v in _by_index(service.vnodes) if v.switch_stats is not None]
    if switched:
        parts.append(f"Through the Switch:\n{switch_table(switched)}")
    return "\n\n".join(parts)


def switch_table(vnodes: Sequence[model.VirtualNode]) -> str:
    """Per virtual node what the Switch measured (IN: towards the node)."""
    def state(s: model.SwitchVnodeStats) -> str:
        return ("healthy" if s.healthy else "unhealthy") if s.routable else ("draining" if s.open else "out")

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.1f}ms" if seconds else ""
    return format_table(
        ("NAME", "STATE", "OPEN", "CONNS", "IN", "OUT", "FAILED", "TTFB-P50", "TTFB-MEAN", "TTFB-LAST"),
        [(v.name, state(s), s.open, s.total, format_size(s.bytes_in), format_size(s.bytes_out),
          s.connect_failures, ms(s.ttfb_p50), ms(s.ttfb_mean), ms(s.ttfb_last))
         for v in vnodes for s in (v.switch_stats,)])


def services_table(services: Iterable[model.Service]) -> str:
    rows = []
    for service in services:
        rollout = Rollout.of(service)
        rows.append((service.name, f"{len(rollout.running)}/{rollout.wanted}", service.spec.image,
                     rollout.state, owner_text(service.owner)))
    return format_table(("NAME", "NODES", "IMAGE", "STATE", "OWNER"), rows)


def nodes_table(nodes: Iterable[model.Node]) -> str:
    def used(node: model.Node, resource: str, unit: str = "") -> str:
        cell = f"{getattr(node.allocated, resource):g}/{getattr(node.capacity, resource):g}{unit}"
        # A capacity the node could not measure: it took a default.
        return cell + " (assumed)" if resource in node.assumed else cell

    rows = [(n.name, n.address, node_state(n), n.subnet,
             used(n, "cpu"), used(n, "memory", "Mi"), used(n, "bandwidth", "Mbit"),
             used(n, "disk", "Mi"),
             n.vnodes, ",".join(n.hypervisors), model.format_labels(n.labels)) + usage_cells(n.usage)
            for n in nodes]
    return format_table(("NAME", "ADDRESS", "STATE", "SUBNET", "CPU", "MEMORY", "BANDWIDTH", "DISK",
                         "VNODES", "HYPERVISORS", "LABELS") + USAGE_HEADERS, rows)


def image_cache_text(node: model.Node) -> str:
    cache = node.image_cache
    if cache is None:
        return "- (no heartbeat yet)"
    images = f", {len(cache.images)} image(s)"
    if not cache.limit:
        return f"{format_bytes(cache.bytes)} (no bound){images}"
    return (f"{format_bytes(cache.bytes)} of {format_bytes(cache.limit)} "
            f"({100 * cache.bytes / cache.limit:.0f} %){images}")


def node_detail(node: model.Node) -> str:
    """One node: where it is, what it holds and has room for, what it runs."""
    def used(resource: str, unit: str = "") -> str:
        cell = f"{getattr(node.allocated, resource):g} of {getattr(node.capacity, resource):g}{unit}"
        return cell + " (assumed)" if resource in node.assumed else cell

    return format_fields([
        ("Name", node.name),
        ("Address", node.address),
        ("State", node_state(node)),
        ("Subnet", f"{node.subnet or '-'} (gateway {node.gateway or '-'}, uplink {node.uplink or '-'})"),
        ("Labels", model.format_labels(node.labels) or "-"),
        ("Hypervisors", ", ".join(node.hypervisors) or "-"),
        ("CPU", used("cpu")),
        ("Memory", used("memory", " MiB")),
        ("Bandwidth", used("bandwidth", " Mbit/s")),
        ("Disk", used("disk", " MiB")),
        ("Virtual nodes", node.vnodes),
        ("Image cache", image_cache_text(node)),
        ("Last heartbeat", timestamp(node.last_heartbeat) if node.last_heartbeat else "-"),
    ])


def images_table(images: Iterable[model.Image]) -> str:
    rows = [(short_digest(i.digest), ",".join(i.names), format_bytes(i.size), format_bytes(i.stored_size),
             short_digest(i.parent) if i.parent else "-", timestamp(i.created_at),
             ",".join(i.owners) or "(operators)", "yes" if i.public else "no")
            for i in images]
    return format_table(("DIGEST", "NAMES", "SIZE", "STORED", "PARENT", "CREATED", "OWNERS", "PUBLIC"), rows)


def listing_order(item: model.Service | model.Node | model.Image | model.Tenant) -> tuple:
    """The order lists are shown in, the same for tables and json/yaml."""
    if isinstance(item, model.Image):
        return (item.names[:1], item.digest)
    return (item.name,)


def _cell(value: Any) -> str:
    if value is None or value == "":
        return EMPTY_CELL
    return str(value)


def _by_index(vnodes: Iterable[model.VirtualNode]) -> list[model.VirtualNode]:
    return sorted(vnodes, key=lambda v: (v.index, v.name))
