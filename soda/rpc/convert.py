"""Protobuf <-> soda.model conversion, both directions, in one place.

Nothing else builds or reads protobuf messages field by field.
"""

from __future__ import annotations

import dataclasses

from soda import model
from soda.proto.v1 import daemon_pb2
from soda.proto.v1 import master_pb2 as pb


def resources_to_pb(r: model.Resources) -> pb.Resources:
    return pb.Resources(cpu=r.cpu, memory_mib=r.memory, bandwidth_mbit=r.bandwidth, disk_mib=r.disk)


def resources_from_pb(m: pb.Resources) -> model.Resources:
    return model.Resources(cpu=m.cpu, memory=m.memory_mib, bandwidth=m.bandwidth_mbit, disk=m.disk_mib)


def health_to_pb(h: model.HealthCheck) -> pb.HealthCheck:
    return pb.HealthCheck(kind=h.kind, path=h.path, expect_status=h.expect_status,
                          interval=h.interval, timeout=h.timeout, rise=h.rise, fall=h.fall)


def health_from_pb(m: pb.HealthCheck) -> model.HealthCheck:
    """Zero fields (an old or minimal client) take the defaults."""
    d = model.HealthCheck()
    return model.HealthCheck(kind=m.kind or d.kind, path=m.path,
                             expect_status=m.expect_status or d.expect_status,
                             interval=m.interval or d.interval, timeout=m.timeout or d.timeout,
                             rise=m.rise or d.rise, fall=m.fall or d.fall)


def switch_to_pb(s: model.SwitchSpec) -> pb.SwitchSpec:
    return pb.SwitchSpec(listen=s.listen, policy=s.policy, mode=s.mode,
                         health=health_to_pb(s.health), drain_seconds=s.drain_seconds)


def switch_from_pb(m: pb.SwitchSpec) -> model.SwitchSpec:
    return model.SwitchSpec(
        listen=m.listen, policy=m.policy or model.DEFAULT_POLICY,
        mode=m.mode or model.DEFAULT_SWITCH_MODE,
        health=health_from_pb(m.health) if m.HasField("health") else model.HealthCheck(),
        # 0 is a legal drain time: only an unset field means "the default".
        drain_seconds=(m.drain_seconds if m.HasField("drain_seconds")
                       else model.SwitchSpec.drain_seconds))


def on_demand_to_pb(o: model.OnDemand | None) -> pb.OnDemand | None:
    if o is None:
        return None
    return pb.OnDemand(max_nodes=o.max_nodes, idle_seconds=o.idle_seconds,
                       resources=resources_to_pb(o.resources), warm=o.warm, idle=o.idle)


def on_demand_from_pb(m, field: str = "on_demand") -> model.OnDemand | None:
    if not m.HasField(field):
        return None
    o = getattr(m, field)
    return model.OnDemand(max_nodes=o.max_nodes, idle_seconds=o.idle_seconds,
                          resources=resources_from_pb(o.resources), warm=o.warm,
                          idle=o.idle or "freeze")


def network_to_pb(n: model.NetworkSpec) -> pb.NetworkSpec:
    return pb.NetworkSpec(peers=n.peers, egress=[str(rule) for rule in n.egress])


def network_from_pb(m) -> model.NetworkSpec:
    """The network spec held in `m.network` (unset: the defaults). Entries
    are parsed again: they are text on the wire."""
    if not m.HasField("network"):
        return model.NetworkSpec()
    return model.parse_network({"peers": m.network.peers, "egress": list(m.network.egress)})


def spec_to_pb(s: model.ServiceSpec) -> pb.ServiceSpec:
    return pb.ServiceSpec(
        name=s.name, image=s.image, hypervisor=s.hypervisor, nodes=s.nodes, port=s.port,
        cpu_cap=s.cpu_cap, resources=[resources_to_pb(r) for r in s.resources],
        switch=switch_to_pb(s.switch), on_demand=on_demand_to_pb(s.on_demand),
        template=resources_to_pb(s.template), network=network_to_pb(s.network),
        boot_timeout=s.boot_timeout)


def spec_from_pb(m: pb.ServiceSpec) -> model.ServiceSpec:
    """Structural decoding only; the Master validates with model.validate_spec."""
    return model.ServiceSpec(
        name=m.name, image=m.image, hypervisor=m.hypervisor, nodes=m.nodes, port=m.port,
        cpu_cap=m.cpu_cap, resources=tuple(resources_from_pb(r) for r in m.resources),
        switch=switch_from_pb(m.switch), on_demand=on_demand_from_pb(m), network=network_from_pb(m),
        boot_timeout=m.boot_timeout,
        **({"template": resources_from_pb(m.template)} if m.HasField("template") else {}))


def usage_to_pb(u: model.Usage | None) -> pb.VnodeUsage | None:
    if u is None:
        return None
    return pb.VnodeUsage(**{f: getattr(u, f) for f in model.USAGE_FIELDS})


def usage_from_pb(m, field: str = "usage") -> model.Usage | None:
    """The usage held in `m.<field>`, None when that field is unset."""
    if not m.HasField(field):
        return None
    u = getattr(m, field)
    return model.Usage(**{f: getattr(u, f) for f in model.USAGE_FIELDS})


def vnode_to_pb(v: model.VirtualNode) -> pb.VirtualNode:
    return pb.VirtualNode(
        name=v.name, service=v.service, index=v.index, node=v.node, address=v.address,
        prefix_length=v.prefix_length, gateway=v.gateway, resources=resources_to_pb(v.resources),
        weight=v.weight, image_digest=v.image_digest, hypervisor=v.hypervisor, port=v.port,
        phase=int(v.phase), reason=v.reason, boot_seconds=v.boot_seconds,
        deleting=v.deleting, generation=v.generation, cpu_cap=v.cpu_cap,
        boot_timeout=v.boot_timeout, frozen=v.frozen, replaces=v.replaces, moving_to=v.moving_to,
        disk_base=v.disk_base, usage=usage_to_pb(v.usage),
        switch_stats=switch_vnode_stats_to_pb(v.switch_stats),
        last_move=pb.VnodeMove(from_node=m.from_node, at=m.at, why=m.why) if (m := v.last_move) else None)


def vnode_from_pb(m: pb.VirtualNode) -> model.VirtualNode:
    return model.VirtualNode(
        name=m.name, service=m.service, index=m.index, node=m.node, address=m.address,
        prefix_length=m.prefix_length, gateway=m.gateway, resources=resources_from_pb(m.resources),
        weight=m.weight, image_digest=m.image_digest, hypervisor=m.hypervisor, port=m.port,
        phase=model.Phase(m.phase), reason=m.reason, boot_seconds=m.boot_seconds,
        deleting=m.deleting, generation=m.generation, cpu_cap=m.cpu_cap,
        boot_timeout=m.boot_timeout, frozen=m.frozen, replaces=m.replaces, moving_to=m.moving_to,
        disk_base=m.disk_base, usage=usage_from_pb(m),
        switch_stats=switch_vnode_stats_from_pb(m.switch_stats) if m.HasField("switch_stats") else None,
        last_move=(model.VnodeMove(m.last_move.from_node, m.last_move.at, m.last_move.why)
                   if m.HasField("last_move") else None))


def service_to_pb(s: model.Service) -> pb.Service:
    return pb.Service(spec=spec_to_pb(s.spec), image_digest=s.image_digest,
                      vnodes=[vnode_to_pb(v) for v in s.vnodes], deleting=s.deleting,
                      created_at=s.created_at, owner=s.owner)


def service_from_pb(m: pb.Service) -> model.Service:
    return model.Service(spec=spec_from_pb(m.spec), image_digest=m.image_digest,
                         vnodes=tuple(vnode_from_pb(v) for v in m.vnodes),
                         deleting=m.deleting, created_at=m.created_at, owner=m.owner)


def limits_to_pb(limits) -> list[pb.DriverCapabilities]:
    return [pb.DriverCapabilities(
        hypervisor=c.hypervisor, min_memory_mib=c.min_memory, kernel=c.kernel,
        memory_overhead_mib=c.memory_overhead, live_memory=c.live_memory, freeze=c.freeze,
        disk_bound=c.disk_bound, plumbing=c.plumbing, migration=c.migration,
        attributes=dict(c.attributes)) for c in limits]


def limits_from_pb(limits) -> tuple[model.DriverCapabilities, ...]:
    return tuple(model.DriverCapabilities(
        hypervisor=c.hypervisor, min_memory=c.min_memory_mib, kernel=c.kernel,
        memory_overhead=c.memory_overhead_mib, live_memory=c.live_memory, freeze=c.freeze,
        disk_bound=c.disk_bound, plumbing=c.plumbing, migration=c.migration,
        attributes=dict(c.attributes)) for c in limits)


def node_to_pb(n: model.Node) -> pb.Node:
    return pb.Node(name=n.name, address=n.address, capacity=resources_to_pb(n.capacity),
                   allocated=resources_to_pb(n.allocated), hypervisors=list(n.hypervisors),
                   subnet=n.subnet, gateway=n.gateway, uplink=n.uplink, state=n.state, vnodes=n.vnodes,
                   last_heartbeat=n.last_heartbeat, usage=usage_to_pb(n.usage),
                   limits=limits_to_pb(n.limits), assumed=list(n.assumed), labels=dict(n.labels),
                   draining=n.draining, image_cache=image_cache_to_pb(n.image_cache))


def node_from_pb(m: pb.Node) -> model.Node:
    return model.Node(name=m.name, address=m.address, capacity=resources_from_pb(m.capacity),
                      allocated=resources_from_pb(m.allocated), hypervisors=tuple(m.hypervisors),
                      subnet=m.subnet, gateway=m.gateway, uplink=m.uplink, state=m.state, vnodes=m.vnodes,
                      last_heartbeat=m.last_heartbeat, usage=usage_from_pb(m),
                      limits=limits_from_pb(m.limits), assumed=tuple(m.assumed),
                      labels=dict(sorted(m.labels.items())), draining=m.draining,
                      image_cache=image_cache_from_pb(m.image_cache) if m.HasField("image_cache") else None)


def image_cache_to_pb(c: model.ImageCacheState | None) -> pb.ImageCache | None:
    if c is None:
        return None
    return pb.ImageCache(bytes=c.bytes, limit=c.limit, images=list(c.images))


def image_cache_from_pb(m: pb.ImageCache) -> model.ImageCacheState:
    return model.ImageCacheState(bytes=m.bytes, limit=m.limit, images=tuple(m.images))


def image_to_pb(i: model.Image) -> pb.Image:
    return pb.Image(digest=i.digest, names=list(i.names), size=i.size, created_at=i.created_at,
                    init=i.init, owners=list(i.owners), public=i.public, parent=i.parent, layer=i.layer,
                    layer_size=i.layer_size)


def image_from_pb(m: pb.Image) -> model.Image:
    return model.Image(digest=m.digest, size=m.size, names=tuple(m.names), created_at=m.created_at,
                       init=m.init or "/sbin/init", owners=tuple(m.owners), public=m.public,
                       parent=m.parent, layer=m.layer, layer_size=m.layer_size)


# Quota fields in the model -> in the message (the message names units).
_QUOTA_PB = {"cpu": "cpu", "memory": "memory_mib", "bandwidth": "bandwidth_mbit", "disk": "disk_mib",
             "vnodes": "vnodes", "image_bytes": "image_bytes"}


def quota_to_pb(q: model.Quota) -> pb.Quota:
    return pb.Quota(**{_QUOTA_PB[k]: v for k, v in q.as_dict().items() if v is not None})


def quota_from_pb(m: pb.Quota) -> model.Quota:
    return model.Quota(**{k: getattr(m, f) for k, f in _QUOTA_PB.items() if m.HasField(f)})


def tenant_to_pb(t: model.Tenant) -> pb.Tenant:
    usage = pb.TenantUsage(**{_QUOTA_PB[k]: v for k, v in t.usage.as_dict().items()})
    return pb.Tenant(name=t.name, quota=quota_to_pb(t.quota), usage=usage, services=t.services,
                     images=t.images)


def tenant_from_pb(m: pb.Tenant) -> model.Tenant:
    usage = model.TenantUsage(**{k: getattr(m.usage, f) for k, f in _QUOTA_PB.items()})
    return model.Tenant(name=m.name, quota=quota_from_pb(m.quota), usage=usage, services=m.services,
                        images=m.images)


def status_to_pb(s: model.VirtualNodeStatus) -> pb.VirtualNodeStatus:
    return pb.VirtualNodeStatus(name=s.name, phase=int(s.phase), reason=s.reason,
                                boot_seconds=s.boot_seconds, generation=s.generation,
                                usage=usage_to_pb(s.usage))


def status_from_pb(m: pb.VirtualNodeStatus) -> model.VirtualNodeStatus:
    return model.VirtualNodeStatus(name=m.name, phase=model.Phase(m.phase), reason=m.reason,
                                   boot_seconds=m.boot_seconds, generation=m.generation,
                                   usage=usage_from_pb(m))


def endpoints_to_pb(e: model.EndpointSet) -> pb.EndpointSet:
    return pb.EndpointSet(service=e.service, switch=switch_to_pb(e.switch), deleted=e.deleted,
                          on_demand=on_demand_to_pb(e.on_demand), network=network_to_pb(e.network),
                          endpoints=[pb.Endpoint(vnode=x.vnode, address=x.address, port=x.port,
                                                 weight=x.weight, ready=x.ready, frozen=x.frozen,
                                                 moving=x.moving)
                                     for x in e.endpoints])


def endpoints_from_pb(m: pb.EndpointSet) -> model.EndpointSet:
    return model.EndpointSet(service=m.service, switch=switch_from_pb(m.switch), deleted=m.deleted,
                             on_demand=on_demand_from_pb(m), network=network_from_pb(m),
                             endpoints=tuple(model.Endpoint(x.vnode, x.address, x.port, x.weight, x.ready, x.frozen,
                                                            x.moving)
                                             for x in m.endpoints))


# ---- Switch reports (soda.switch.metrics -> Master) ---------------------
_SWITCH_VNODE_FIELDS = tuple(f.name for f in dataclasses.fields(model.SwitchVnodeStats))


def switch_vnode_stats_to_pb(v: model.SwitchVnodeStats | None) -> pb.SwitchVnodeStats | None:
    return None if v is None else pb.SwitchVnodeStats(**{f: getattr(v, f) for f in _SWITCH_VNODE_FIELDS})


def switch_vnode_stats_from_pb(m: pb.SwitchVnodeStats) -> model.SwitchVnodeStats:
    return model.SwitchVnodeStats(**{f: getattr(m, f) for f in _SWITCH_VNODE_FIELDS})


def switch_report_to_pb(r: model.SwitchReport) -> pb.SwitchReport:
    return pb.SwitchReport(switch=r.switch, listen_hosts=list(r.listen_hosts), busy=list(r.busy), services=[
        pb.SwitchServiceStats(service=s.service, listen=s.listen, listening=s.listening, bind_error=s.bind_error,
                              vnodes=[switch_vnode_stats_to_pb(v) for v in s.vnodes])
        for s in r.services])


def switch_report_from_pb(m: pb.SwitchReport) -> model.SwitchReport:
    return model.SwitchReport(switch=m.switch, listen_hosts=tuple(m.listen_hosts), busy=tuple(m.busy), services=tuple(
        model.SwitchServiceStats(service=s.service, listen=s.listen, listening=s.listening,
                                 bind_error=s.bind_error,
                                 vnodes=tuple(switch_vnode_stats_from_pb(v) for v in s.vnodes))
        for s in m.services))


VNODE_USAGE_FIELDS = tuple(f.name for f in dataclasses.fields(model.VnodeUsage))


def vnode_usage_to_pb(u: model.VnodeUsage) -> daemon_pb2.Usage:
    return daemon_pb2.Usage(**{f: getattr(u, f) for f in VNODE_USAGE_FIELDS})


def vnode_usage_from_pb(m: daemon_pb2.Usage) -> model.VnodeUsage:
    return model.VnodeUsage(**{f: getattr(m, f) for f in VNODE_USAGE_FIELDS})


def fence_to_pb(f: model.Fence) -> daemon_pb2.Fence:
    return daemon_pb2.Fence(name=f.name, cgroups=list(f.cgroups), cgroup_version=f.cgroup_version,
                            tap=f.tap, ifb=f.ifb, frozen=f.frozen,
                            limits=daemon_pb2.Limits(**dataclasses.asdict(f.limits)))


def fence_from_pb(m: daemon_pb2.Fence) -> model.Fence:
    return model.Fence(name=m.name, cgroups=tuple(m.cgroups), cgroup_version=m.cgroup_version,
                       tap=m.tap, ifb=m.ifb, frozen=m.frozen,
                       limits=model.Limits(**{f.name: getattr(m.limits, f.name)
                                              for f in dataclasses.fields(model.Limits)}))
