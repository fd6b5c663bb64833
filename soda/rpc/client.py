"""MasterClient: the one way sodactl, Agents and Switches talk to the Master.

It speaks soda.model objects, not protobuf, and raises SodaError subclasses,
not grpc.RpcError, so code above it never imports grpc.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from typing import BinaryIO, Callable, Iterable, Iterator, Mapping

import grpc

from soda import errors, layers, model
from soda.files import file_chunks, sha256_file
from soda.config import TlsConfig
from soda.proto.v1 import master_pb2 as pb
from soda.proto.v1 import master_pb2_grpc as pb_grpc
from soda.rpc import convert, encoding
from soda.rpc import tls as soda_tls
from soda.rpc.errors import from_rpc_error, status_code

DEFAULT_MASTER = "127.0.0.1:7070"
CHUNK_SIZE = 1 << 20          # 1 MiB: well under gRPC's 4 MiB message cap
UNARY_TIMEOUT = 30.0

# Keepalive so that a long-lived watch notices a dead Master within seconds,
# not when the kernel's TCP timeout expires.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
]

ProgressFn = Callable[..., None]      # (bytes done, bytes total[, bytes on the wire])


class LayerOrImage:
    """What a push sends: `size` bytes with sha256 `digest`, made by
    `chunks()` (each call anew), a layer when `base` names its parent."""

    def __init__(self, size: int, digest: str, base: str, chunks: Callable[[], Iterable[bytes]]):
        self.size, self.digest, self.base, self.chunks = size, digest, base, chunks


class _Counted:
    """Chunks passed through, counting their bytes."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = chunks
        self.done = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.done += len(chunk)
            yield chunk


class StubClient:
    """A channel, a stub, and unary calls that raise SodaError: what every
    SODA client shares. `peer` and `where` name the server in errors;
    `tls` (this party's files) makes the channel mutual TLS."""

    peer = "SODA Master"

    def __init__(self, target: str, stub_class, timeout: float = UNARY_TIMEOUT, where: str = "",
                 tls: TlsConfig | None = None):
        self.target = target
        self.timeout = timeout
        self.where = where or target
        files = soda_tls.read(tls or TlsConfig())
        self.secure = files is not None
        self._channel = soda_tls.channel(target, files, CHANNEL_OPTIONS)
        self._stub = stub_class(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request, timeout: float | None = None):
        try:
            return getattr(self._stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: grpc.RpcError) -> errors.SodaError:
        return from_rpc_error(exc, self.where, peer=self.peer, secure=self.secure)


class MasterClient(StubClient):
    def __init__(self, target: str = DEFAULT_MASTER, timeout: float = UNARY_TIMEOUT,
                 tls: TlsConfig | None = None):
        super().__init__(target, pb_grpc.MasterStub, timeout, tls=tls)

    # ---- plumbing -----------------------------------------------------

    def _stream(self, method: str, request) -> Iterator:
        call = getattr(self._stub, method)(request)
        try:
            yield from call
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise self._error(exc) from None
        finally:
            call.cancel()

    # ---- services -----------------------------------------------------
    def create_service(self, spec: model.ServiceSpec) -> model.Service:
        reply = self._call("CreateService", pb.CreateServiceRequest(spec=convert.spec_to_pb(spec)))
        return convert.service_from_pb(reply)

    def get_service(self, name: str) -> model.Service:
        return convert.service_from_pb(self._call("GetService", pb.GetServiceRequest(name=name)))

    def list_services(self) -> list[model.Service]:
        reply = self._call("ListServices", pb.ListServicesRequest())
        return [convert.service_from_pb(s) for s in reply.services]

    def freeze_service(self, name: str, vnodes: Iterable[str] = (), frozen: bool = True) -> model.Service:
        """Freeze (frozen=False: thaw) the service's virtual nodes, all or
        those named (by name or index)."""
        request = pb.FreezeServiceRequest(name=name, vnodes=list(vnodes), frozen=frozen)
        return convert.service_from_pb(self._call("FreezeService", request))

    def move_vnode(self, service: str, vnode: str, to: str = "", cold: bool = False) -> model.Service:
        """Move a virtual node of `service` (name or index) to node `to` ("":
        where there is room); `cold`: boot its image afresh there where its
        disk cannot be carried."""
        request = pb.MoveVnodeRequest(service=service, vnode=vnode, to=to, cold=cold)
        return convert.service_from_pb(self._call("MoveVnode", request))

    def delete_service(self, name: str) -> model.Service:
        return convert.service_from_pb(self._call("DeleteService", pb.DeleteServiceRequest(name=name)))

    def resize_service(self, name: str, nodes: int | None = None,
                       resources: Iterable[model.Resources] = ()) -> model.Service:
        req = pb.ResizeServiceRequest(name=name, nodes=-1 if nodes is None else nodes,
                                      resources=[convert.resources_to_pb(r) for r in resources])
        return convert.service_from_pb(self._call("ResizeService", req))

    def ensure_nodes(self, name: str, at_least: int = 1) -> model.Service:
        """Deploy on first request: at least `at_least` virtual nodes (on_demand services)."""
        return convert.service_from_pb(self._call("EnsureNodes",
                                                  pb.EnsureNodesRequest(name=name, at_least=at_least)))

    def release_nodes(self, name: str) -> model.Service:
        """An idle on_demand service back to zero virtual nodes."""
        return convert.service_from_pb(self._call("ReleaseNodes", pb.ReleaseNodesRequest(name=name)))

    def watch_services(self, name: str = "") -> Iterator[tuple[str, model.Service | str]]:
        """Yields ("UPSERT", Service) and ("DELETED", name); first the current state."""
        for ev in self._stream("WatchServices", pb.WatchServicesRequest(name=name)):
            if ev.kind == pb.ServiceEvent.DELETED:
                yield "DELETED", ev.service.spec.name
            else:
                yield "UPSERT", convert.service_from_pb(ev.service)

    # ---- nodes --------------------------------------------------------
    def register_node(self, name: str, address: str, capacity: model.Resources,
                      hypervisors: Iterable[str],
                      limits: Iterable[model.DriverCapabilities] = (),
                      assumed: Iterable[str] = (),
                      labels: Mapping[str, str] | None = None) -> model.Node:
        req = pb.RegisterNodeRequest(name=name, address=address,
                                     capacity=convert.resources_to_pb(capacity),
                                     hypervisors=list(hypervisors),
                                     limits=convert.limits_to_pb(limits), assumed=list(assumed),
                                     labels=dict(labels or {}))
        return convert.node_from_pb(self._call("RegisterNode", req))

    def heartbeat(self, node: str, statuses: Iterable[model.VirtualNodeStatus],
                  image_cache: model.ImageCacheState | None = None) -> model.HeartbeatAnswer:
        req = pb.NodeStatus(node=node, complete=True,
                            vnodes=[convert.status_to_pb(s) for s in statuses],
                            image_cache=convert.image_cache_to_pb(image_cache))
        reply = self._call("Heartbeat", req)
        return model.HeartbeatAnswer(heartbeat_seconds=reply.heartbeat_seconds, prime=tuple(reply.prime))

    def report_status(self, node: str, statuses: Iterable[model.VirtualNodeStatus]) -> None:
        req = pb.NodeStatus(node=node, complete=False,
                            vnodes=[convert.status_to_pb(s) for s in statuses])
        self._call("ReportStatus", req)

    def list_nodes(self) -> list[model.Node]:
        return [convert.node_from_pb(n) for n in self._call("ListNodes", pb.ListNodesRequest()).nodes]

    def watch_nodes(self) -> Iterator[list[model.Node]]:
        """The whole node set now, then again on every membership change."""
        for node_set in self._stream("WatchNodes", pb.WatchNodesRequest()):
            yield [convert.node_from_pb(n) for n in node_set.nodes]

    def drain_node(self, name: str) -> model.Node:
        """No new placements on node `name`; its virtual nodes move elsewhere."""
        return convert.node_from_pb(self._call("DrainNode", pb.NodeRequest(name=name)))

    def undrain_node(self, name: str) -> model.Node:
        return convert.node_from_pb(self._call("UndrainNode", pb.NodeRequest(name=name)))

    def remove_node(self, name: str) -> model.Node:
        return convert.node_from_pb(self._call("RemoveNode", pb.NodeRequest(name=name)))

    def watch_assignments(self, node: str) -> Iterator[tuple[str, list]]:
        """Yields ("SNAPSHOT", [VirtualNode]) first, then ("UPSERT", [VirtualNode])
        and ("REMOVE", [name]) as this node's desired set changes."""
        for ev in self._stream("WatchAssignments", pb.WatchAssignmentsRequest(node=node)):
            kind = pb.AssignmentEvent.Kind.Name(ev.kind)
            if ev.kind == pb.AssignmentEvent.REMOVE:
                yield kind, [v.name for v in ev.vnodes]
            else:
                yield kind, [convert.vnode_from_pb(v) for v in ev.vnodes]

    # ---- images -------------------------------------------------------
    def image_transfer(self) -> pb.ImageTransfer:
        """What the Master's image transfers support; an older Master that
        cannot say supports raw whole images only."""
        try:
            return self._stub.GetImageTransfer(pb.Empty(), timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return pb.ImageTransfer()
            raise self._error(exc) from None

    def push_image(self, path: str, name: str = "", init: str = "",
                   progress: ProgressFn | None = None, digest: str | None = None,
                   public: bool = False, base: str = "", compress: bool = True,
                   method: str = "PushImage") -> model.Image:
        """Stream a file to the Master in chunks; the Master checks `digest`
        (computed here first unless given) before it keeps anything.
        `public` (operators only): every tenant may use it. With `base` (an
        image's name or digest) only the layer of what differs from it is
        sent (soda.layers). Compressed when the Master decodes it and
        `compress`; `progress(raw done, raw total, bytes sent)`."""
        size = os.path.getsize(path)
        digest = digest or sha256_file(path)
        transfer = self.image_transfer()
        chosen = encoding.choose(transfer.encodings) if compress else encoding.RAW
        if base:
            content = self.layer_of(path, digest, base, transfer)
        else:
            content = LayerOrImage(size, digest, "", lambda: file_chunks(path))

        def requests():
            yield pb.PushImageRequest(header=pb.ImageHeader(name=name, size=content.size, digest=content.digest,
                                                            init=init, public=public, base=content.base,
                                                            encoding=chosen))
            counted = _Counted(content.chunks())
            sent = 0
            for chunk in encoding.encode(counted, chosen, threads=-1):
                sent += len(chunk)
                yield pb.PushImageRequest(chunk=chunk)
                if progress:
                    progress(counted.done, content.size, sent)
        return self.push_image_stream(requests(), method)

    def push_vnode_disk(self, path: str, vnode: str, base: str) -> model.Image:
        """An Agent sends the disk of virtual node `vnode` that it moves
        (the raw disk at `path`), as a layer over image `base` (a digest)."""
        return self.push_image(path, name=vnode, base=base, method="PushVnodeDisk")

    def layer_of(self, path: str, digest: str, base: str, transfer: pb.ImageTransfer) -> "LayerOrImage":
        """The layer of the image file at `path` (sha256 `digest`) over the
        Master's image `base`: the Master's block hashes of the base tell
        which blocks differ, so the base's bytes are never fetched."""
        if transfer.block_size != layers.BLOCK_SIZE:
            raise errors.WrongState(f"the Master at {self.where} does not take layered images (it is older "
                                    f"than this sodactl): push {path} without --base")
        # A digest needs no lookup (an Agent may not look images up).
        parent = self.get_image(base) if not model.DIGEST_RE.match(base) else model.Image(base, 0)
        hashes = self.image_block_hashes(parent.digest)
        runs = list(layers.differing_runs(path, hashes))
        header = layers.Header(layers.BLOCK_SIZE, os.path.getsize(path), parent.digest, digest)
        h = hashlib.sha256()
        size = 0
        for piece in layers.build(path, header, runs):
            h.update(piece)
            size += len(piece)
        return LayerOrImage(size, "sha256:" + h.hexdigest(), parent.digest,
                            lambda: layers.build(path, header, runs))

    def fetch_image(self, url: str, digest: str = "", name: str = "", init: str = "", public: bool = False,
                    base: str = "", timeout: float = 3600.0) -> model.Image:
        """The Master fetches the image (with `base`, a layer over that
        image) from `url` itself, checked against `digest` when given."""
        request = pb.FetchImageRequest(url=url, digest=digest, name=name, init=init, public=public, base=base)
        return convert.image_from_pb(self._call("FetchImage", request, timeout=timeout))

    def push_image_stream(self, requests: Iterable[pb.PushImageRequest],
                          method: str = "PushImage") -> model.Image:
        try:
            return convert.image_from_pb(getattr(self._stub, method)(iter(requests)))
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def list_images(self) -> list[model.Image]:
        return [convert.image_from_pb(i) for i in self._call("ListImages", pb.ListImagesRequest()).images]

    def get_image(self, image: str) -> model.Image:
        return self.inspect_image(image)[0]

    def inspect_image(self, image: str) -> tuple[model.Image, list[str], list[str], list[str]]:
        """The image, the digests of images layered directly on it, the
        services that boot it and the nodes whose cache holds it."""
        reply = self._call("GetImage", pb.GetImageRequest(image=image))
        return convert.image_from_pb(reply), list(reply.images), list(reply.services), list(reply.nodes)

    def prime_image(self, image: str, nodes: Iterable[str] = ()) -> list[str]:
        """Ask `nodes` (every READY node when none) to pull the image ahead
        of need; the nodes asked."""
        return list(self._call("PrimeImage", pb.PrimeImageRequest(image=image, nodes=list(nodes))).nodes)

    def image_block_hashes(self, image: str) -> bytes:
        """soda.layers block hashes of a whole image (what a layer over it is made from)."""
        parts = [m.hashes for m in self._stream("ImageBlockHashes", pb.ImageBlocksRequest(image=image))]
        return b"".join(parts)

    def delete_image(self, image: str) -> model.Image:
        return convert.image_from_pb(self._call("DeleteImage", pb.DeleteImageRequest(image=image)))

    def pull_image(self, image: str, out: BinaryIO, progress: ProgressFn | None = None,
                   layer: bool = False, compress: bool = True) -> model.Image:
        """Write the image's bytes to `out`, or with `layer` a layered
        image's layer (the returned image's .layer says whether that is what
        came); verify size and digest on the way. Compressed on the wire
        when the Master can and `compress`. `progress(raw done, raw total,
        bytes received)`."""
        meta = None
        h = hashlib.sha256()
        done = received = 0
        chosen = encoding.RAW

        def chunks():
            nonlocal meta, chosen, received
            request = pb.PullImageRequest(image=image, layer=layer,
                                          encodings=list(encoding.ENCODINGS) if compress else [])
            for part in self._stream("PullImage", request):
                if part.HasField("image"):
                    meta, chosen = convert.image_from_pb(part.image), part.encoding
                    encoding.check(chosen)
                    continue
                received += len(part.chunk)
                yield part.chunk

        raw = chunks()
        first = next(raw, None)
        if meta is None:
            raise errors.DataLoss(f"pull of image {image} ended before its header")
        want_digest, want_size = (meta.layer, meta.layer_size) if layer and meta.layer else (meta.digest, meta.size)
        for piece in encoding.decode(itertools.chain([first] if first is not None else [], raw), chosen):
            done += len(piece)
            if done > want_size:
                raise errors.DataLoss(f"image {meta.digest} arrived with more than its {want_size} bytes")
            out.write(piece)
            h.update(piece)
            if progress:
                progress(done, want_size, received)
        got = "sha256:" + h.hexdigest()
        if done != want_size or got != want_digest:
            raise errors.DataLoss(f"image {meta.digest} arrived damaged: {done} of {want_size} "
                                  f"bytes, digest {got}")
        return meta

    # ---- guest consoles -------------------------------------------------
    def service_logs(self, service: str, vnode: str = "", follow: bool = False,
                     tail: int = 0) -> Iterator[tuple[str, bytes]]:
        """(virtual node, bytes of whole console lines) as the Master relays them."""
        request = pb.ServiceLogsRequest(service=service, vnode=vnode, follow=follow, tail=tail)
        for chunk in self._stream("ServiceLogs", request):
            yield chunk.vnode, chunk.data

    def watch_log_orders(self, node: str) -> Iterator[pb.LogOrder]:
        """The Master's orders for `node`'s consoles (id, vnode, follow, tail)."""
        yield from self._stream("WatchLogOrders", pb.WatchLogOrdersRequest(node=node))

    def send_logs(self, order_id: str, chunks: Iterator[bytes], error: errors.SodaError | None = None) -> None:
        """Answer log order `order_id` with `chunks`, or with `error` alone
        (relayed to the caller as the same kind of error). Returns when the
        chunks end or the Master ends the stream (its caller went away)."""
        def parts():
            if error is not None:
                yield pb.LogPart(id=order_id, error=error.message, code=status_code(error).name)
                return
            yield pb.LogPart(id=order_id)
            for data in chunks:
                yield pb.LogPart(data=data)
        try:
            self._stub.SendLogs(parts())
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    # ---- tenants ------------------------------------------------------
    def set_quota(self, tenant: str, quota: model.Quota | None) -> model.Tenant:
        """Set a tenant's quota whole; None removes it (not limited)."""
        req = pb.SetQuotaRequest(tenant=tenant)
        if quota is not None:
            req.quota.CopyFrom(convert.quota_to_pb(quota))
        return convert.tenant_from_pb(self._call("SetQuota", req))

    def list_tenants(self) -> list[model.Tenant]:
        return [convert.tenant_from_pb(t) for t in self._call("ListTenants", pb.ListTenantsRequest()).tenants]

    # ---- endpoints ----------------------------------------------------
    def watch_endpoints(self, service: str = "") -> Iterator[model.EndpointSet]:
        for ev in self._stream("WatchEndpoints", pb.WatchEndpointsRequest(service=service)):
            yield convert.endpoints_from_pb(ev)

    def report_switch_stats(self, report: model.SwitchReport) -> None:
        self._call("ReportSwitchStats", convert.switch_report_to_pb(report))
