"""DaemonClient: how an Agent talks to the SODA Daemon on its own node.

Over a Unix socket. It speaks soda.model.Resources and the small frozen
dataclasses below, not protobuf, and raises SodaError subclasses, not
grpc.RpcError, so the Agent never imports grpc or the Daemon's package.
"""

from __future__ import annotations

import os

import grpc

from soda import errors, model
from soda.proto.v1 import daemon_pb2 as pb
from soda.proto.v1 import daemon_pb2_grpc as pb_grpc
from soda.rpc import convert
from soda.rpc.client import StubClient
from soda.model.fence import Fence, Released
from soda.model.usage import VnodeUsage

DEFAULT_SOCKET = "/run/soda/daemon.sock"
UNARY_TIMEOUT = 30.0          # a release may spend seconds killing a guest's processes


class DaemonClient(StubClient):
    peer = "SODA Daemon"

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = UNARY_TIMEOUT):
        path = socket_path[len("unix:"):] if socket_path.startswith("unix:") else socket_path
        self.socket_path = os.path.abspath(path)
        super().__init__(f"unix:{self.socket_path}", pb_grpc.DaemonStub, timeout, where=self.socket_path)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the Daemon accepts calls (e.g. right after it was started)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise errors.Unavailable(f"the SODA Daemon at {self.socket_path} is not serving "
                                     f"after {timeout:g}s") from None

    def apply_limits(self, name: str, resources: model.Resources, hypervisor: str,
                     memory_overhead: int, tap: str = "", cpu_cap: bool = False) -> Fence:
        """Fence (or re-fence, live) one virtual node; returns the cgroup
        directories its guest must join. `tap` empty = no traffic shaping;
        `memory_overhead`: MiB the hypervisor process needs above the guest's
        memory (its driver declares it)."""
        req = pb.ApplyLimitsRequest(name=name, resources=convert.resources_to_pb(resources),
                                    hypervisor=hypervisor, tap=tap, cpu_cap=cpu_cap,
                                    memory_overhead_mib=memory_overhead)
        return convert.fence_from_pb(self._call("ApplyLimits", req))

    def release_limits(self, name: str) -> Released:
        """Kill what is left in its cgroups, remove them, its qdiscs and IFB
        (not the TAP). Succeeds for an unknown virtual node."""
        reply = self._call("ReleaseLimits", pb.ReleaseLimitsRequest(name=name))
        return Released(name=reply.name, existed=reply.existed, killed=reply.killed)

    def freeze(self, name: str, frozen: bool) -> Fence:
        """Freeze (or thaw) every process in the virtual node's cgroups."""
        return convert.fence_from_pb(self._call("FreezeVnode", pb.FreezeVnodeRequest(name=name, frozen=frozen)))

    def usage(self, name: str) -> VnodeUsage:
        return convert.vnode_usage_from_pb(self._call("GetUsage", pb.GetUsageRequest(name=name)))

    def list(self) -> list[Fence]:
        return [convert.fence_from_pb(f) for f in self._call("ListVnodes", pb.ListVnodesRequest()).vnodes]
