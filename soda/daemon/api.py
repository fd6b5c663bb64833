"""The Daemon's gRPC servicer: decode, call the LimitManager, encode.

No checks, values or kernel work here; SodaErrors become gRPC status codes
through soda.rpc.errors.handle_errors.
"""

from __future__ import annotations

from soda.daemon.limits import LimitManager
from soda.errors import InvalidSpec
from soda.proto.v1 import daemon_pb2 as pb
from soda.proto.v1 import daemon_pb2_grpc as pb_grpc
from soda.rpc import convert
from soda.rpc.errors import handle_errors


class DaemonServicer(pb_grpc.DaemonServicer):
    def __init__(self, manager: LimitManager):
        self.manager = manager

    @handle_errors
    def ApplyLimits(self, request, context):
        if not request.HasField("memory_overhead_mib"):
            raise InvalidSpec("memory_overhead_mib is required: the MiB the hypervisor process "
                              "needs above the guest's memory, as its driver declares it")
        fence = self.manager.apply(request.name, convert.resources_from_pb(request.resources),
                                   request.hypervisor, request.memory_overhead_mib,
                                   request.tap, request.cpu_cap)
        return convert.fence_to_pb(fence)

    @handle_errors
    def ReleaseLimits(self, request, context):
        done = self.manager.release(request.name)
        return pb.ReleaseLimitsResponse(name=done.name, existed=done.existed, killed=done.killed)

    @handle_errors
    def GetUsage(self, request, context):
        return convert.vnode_usage_to_pb(self.manager.usage(request.name))

    @handle_errors
    def FreezeVnode(self, request, context):
        return convert.fence_to_pb(self.manager.freeze(request.name, request.frozen))

    @handle_errors
    def ListVnodes(self, request, context):
        return pb.ListVnodesResponse(vnodes=[convert.fence_to_pb(f) for f in self.manager.list()])
