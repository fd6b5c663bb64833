"""The Daemon's gRPC servicer: decode, call the LimitManager, encode.

No checks, values or kernel work here; SodaErrors become gRPC status codes
through soda.rpc.errors.handle_errors.
"""

from __future__ import annotations

from soda.daemon.limits import LimitManager
from soda.model.fence import Fence
from soda.proto.v1 import daemon_pb2 as pb
from soda.proto.v1 import daemon_pb2_grpc as pb_grpc
from soda.rpc import convert
from soda.rpc.errors import handle_errors


def fence_to_pb(f: Fence) -> pb.Fence:
    lim = f.limits
    return pb.Fence(
        name=f.name, cgroups=list(f.cgroups), cgroup_version=f.cgroup_version, tap=f.tap,
        ifb=f.ifb,
        limits=pb.Limits(cpu_shares=lim.cpu_shares, cpu_quota_us=lim.cpu_quota_us,
                         cpu_period_us=lim.cpu_period_us, memory_bytes=lim.memory_bytes,
                         pids_max=lim.pids_max, rate_bit=lim.rate_bit,
                         burst_bytes=lim.burst_bytes))


class DaemonServicer(pb_grpc.DaemonServicer):
    def __init__(self, manager: LimitManager):
        self.manager = manager

    @handle_errors
    def ApplyLimits(self, request, context):
        overhead = (request.memory_overhead_mib if request.HasField("memory_overhead_mib")
                    else None)
        fence = self.manager.apply(request.name, convert.resources_from_pb(request.resources),
                                   request.hypervisor, request.tap, request.cpu_cap, overhead)
        return fence_to_pb(fence)

    @handle_errors
    def ReleaseLimits(self, request, context):
        done = self.manager.release(request.name)
        return pb.ReleaseLimitsResponse(name=done.name, existed=done.existed, killed=done.killed)

    @handle_errors
    def GetUsage(self, request, context):
        return convert.vnode_usage_to_pb(self.manager.usage(request.name))

    @handle_errors
    def ListVnodes(self, request, context):
        return pb.ListVnodesResponse(vnodes=[fence_to_pb(f) for f in self.manager.list()])
