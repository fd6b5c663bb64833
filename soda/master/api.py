"""The Master's gRPC servicer: decode, call the Controller, encode.

No validation, placement or policy lives here; errors become gRPC status
codes through soda.rpc.errors.handle_errors. Who may call what was decided
by soda.master.access before a method runs; a method only passes the
caller on (`_tenant`, `access.caller`) to the Controller, which applies
what a tenant owns. Watch streams wait on the
Controller's notifier and end when the client goes away or the Master stops.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Iterator

import grpc

from soda import layers, model
from soda.errors import InvalidSpec, NotFound, PermissionDenied, Unauthenticated, Unavailable
from soda.pki import Identity
from soda.master import access
from soda.master.logs import LogBroker
from soda.master.store import revision_of
from soda.master.controller import (ENDPOINTS_TOPIC, NODES_TOPIC, SERVICE_TOPIC_PREFIX, SERVICES_TOPIC,
                                    Controller, node_topic, service_topic)
from soda.proto.v1 import master_pb2 as pb
from soda.proto.v1 import master_pb2_grpc as pb_grpc
from soda.rpc import convert, encoding
from soda.rpc.errors import from_code_name, handle_errors, status_code
from soda.rpc.streams import HANDLER_KINDS

log = logging.getLogger(__name__)

# How often an idle watch wakes to notice a client that went away.
WATCH_POLL_SECONDS = 1.0


class AccessInterceptor(grpc.ServerInterceptor):
    """Runs before every handler: authenticate, authorize, audit."""

    def __init__(self, authenticator: access.Authenticator):
        self.authenticator = authenticator

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        action = method.rsplit("/", 1)[-1]
        mutating = method.startswith(access.MASTER_SERVICE) and action in access.MUTATING
        attribute, make = HANDLER_KINDS[handler.request_streaming, handler.response_streaming]
        inner = getattr(handler, attribute)
        if handler.response_streaming:
            # Watches and pulls: admitted or not; none changes state.
            def behaviour(request, context):
                self._admit(context, method, None if handler.request_streaming else request)
                yield from inner(request, context)
        elif handler.request_streaming:
            # A push: what it acts on is in its first message.
            def behaviour(requests, context):
                identity = self._admit(context, method, None)
                first: list = []

                def peeked():
                    for request in requests:
                        if not first:
                            first.append(request)
                        yield request
                return self._run(lambda: inner(peeked(), context), context, identity, action,
                                 lambda: _header_object(first), mutating)
        else:
            def behaviour(request, context):
                identity = self._admit(context, method, request)
                return self._run(lambda: inner(request, context), context, identity, action,
                                 lambda: access.object_of(request), mutating)
        return make(behaviour, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    def _admit(self, context, method: str, request: Any) -> Identity:
        """The caller, allowed to make this call; aborts the call if not."""
        action = method.rsplit("/", 1)[-1]
        try:
            identity = self.authenticator.identify(context)
        except Unauthenticated as exc:
            access.record(None, action, access.object_of(request), "UNAUTHENTICATED", exc.message)
            context.abort(status_code(exc), exc.message)
        try:
            access.authorize(identity, method, request)
        except PermissionDenied as exc:
            access.record(identity, action, access.object_of(request), "PERMISSION_DENIED", exc.message)
            context.abort(status_code(exc), exc.message)
        context.soda_identity = identity           # for the servicer: see caller()
        return identity

    @staticmethod
    def _run(call: Callable[[], Any], context, identity: Identity, action: str,
             obj: Callable[[], str], mutating: bool):
        try:
            reply = call()
        except BaseException:
            code = context.code() if hasattr(context, "code") else None
            outcome = getattr(code, "name", None) or "ERROR"
            if mutating or outcome == "PERMISSION_DENIED":
                access.record(identity, action, obj(), outcome, _details(context))
            raise
        if mutating:
            access.record(identity, action, obj(), "OK")
        return reply


def _header_object(first: list) -> str:
    if not first or not first[0].HasField("header"):
        return ""
    return first[0].header.name or first[0].header.digest


def _pushed(request_iterator) -> tuple[Any, Iterator[bytes]]:
    """The header of an image push and its content, decoded."""
    first = next(request_iterator, None)
    if first is None or not first.HasField("header"):
        raise InvalidSpec("an image push must start with a header (name, size, digest)")
    header = first.header
    encoding.check(header.encoding)

    def chunks():
        for part in request_iterator:
            if part.HasField("header"):
                raise InvalidSpec("an image push carries one header, first")
            yield part.chunk
    return header, encoding.decode(chunks(), header.encoding)


def _details(context) -> str:
    details = context.details() if hasattr(context, "details") else ""
    return details.decode() if isinstance(details, bytes) else (details or "")


class MasterServicer(pb_grpc.MasterServicer):
    def __init__(self, controller: Controller, heartbeat_seconds: int):
        self.controller = controller
        self.notifier = controller.notifier
        self.heartbeat_seconds = heartbeat_seconds
        self.logs = LogBroker()

    @staticmethod
    def _tenant(context) -> str | None:
        return access.tenant_of(access.caller(context))

    def _watch(self, topic: str, context) -> Iterator[None]:
        """Yield once now, then once per change of `topic`, while the client listens."""
        seen = self.notifier.revision(topic)
        yield
        while context.is_active() and not self.notifier.closed:
            revision = self.notifier.wait(topic, seen, WATCH_POLL_SECONDS)
            if revision > seen:
                seen = revision
                yield

    # ---- services -----------------------------------------------------
    @handle_errors
    def CreateService(self, request, context):
        return convert.service_to_pb(self.controller.create_service(convert.spec_from_pb(request.spec),
                                                                    self._tenant(context)))

    @handle_errors
    def GetService(self, request, context):
        return convert.service_to_pb(self.controller.get_service(request.name, self._tenant(context)))

    @handle_errors
    def ListServices(self, request, context):
        return pb.ListServicesResponse(services=[convert.service_to_pb(s) for s in
                                                 self.controller.list_services(self._tenant(context))])

    @handle_errors
    def DeleteService(self, request, context):
        return convert.service_to_pb(self.controller.delete_service(request.name, self._tenant(context)))

    @handle_errors
    def ResizeService(self, request, context):
        nodes = None if request.nodes < 0 else request.nodes
        resources = [convert.resources_from_pb(r) for r in request.resources]
        return convert.service_to_pb(self.controller.resize_service(request.name, nodes, resources,
                                                                    self._tenant(context)))

    @handle_errors
    def EnsureNodes(self, request, context):
        return convert.service_to_pb(self.controller.ensure_nodes(request.name, request.at_least or 1))

    @handle_errors
    def ReleaseNodes(self, request, context):
        return convert.service_to_pb(self.controller.release_nodes(request.name))

    @handle_errors
    def WatchServices(self, request, context):
        tenant = self._tenant(context)
        if request.name:
            self.controller.get_service(request.name, tenant)     # NOT_FOUND before streaming
        topic = service_topic(request.name) if request.name else SERVICES_TOPIC
        last: dict[str, pb.Service] = {}
        for _ in self._watch(topic, context):
            services = ([self._maybe_service(request.name, tenant)] if request.name
                        else self.controller.list_services(tenant))
            current = {s.name: convert.service_to_pb(s) for s in services if s is not None}
            for name, message in current.items():
                if last.get(name) != message:
                    yield pb.ServiceEvent(kind=pb.ServiceEvent.UPSERT, service=message)
            for name in last.keys() - current.keys():
                yield pb.ServiceEvent(kind=pb.ServiceEvent.DELETED,
                                      service=pb.Service(spec=pb.ServiceSpec(name=name)))
            last = current
            if request.name and not current:
                return

    def _maybe_service(self, name: str, tenant: str | None) -> model.Service | None:
        try:
            return self.controller.get_service(name, tenant)
        except NotFound:
            return None

    # ---- nodes --------------------------------------------------------
    @handle_errors
    def RegisterNode(self, request, context):
        node = self.controller.register_node(request.name, request.address,
                                             convert.resources_from_pb(request.capacity),
                                             list(request.hypervisors),
                                             convert.limits_from_pb(request.limits),
                                             tuple(request.assumed), dict(request.labels))
        return convert.node_to_pb(node)

    @handle_errors
    def Heartbeat(self, request, context):
        cache = convert.image_cache_from_pb(request.image_cache) if request.HasField("image_cache") else None
        self.controller.report_status(request.node, [convert.status_from_pb(s) for s in request.vnodes],
                                      complete=True, image_cache=cache)
        return pb.HeartbeatResponse(heartbeat_seconds=self.heartbeat_seconds,
                                    prime=self.controller.primes_for(request.node))

    @handle_errors
    def ReportStatus(self, request, context):
        self.controller.report_status(request.node, [convert.status_from_pb(s) for s in request.vnodes],
                                      complete=request.complete)
        return pb.Empty()

    @handle_errors
    def ListNodes(self, request, context):
        return pb.ListNodesResponse(nodes=[convert.node_to_pb(n) for n in self.controller.list_nodes()])

    @handle_errors
    def WatchNodes(self, request, context):
        last = None
        for _ in self._watch(NODES_TOPIC, context):
            current = pb.NodeSet(nodes=[convert.node_to_pb(n) for n in self.controller.membership()])
            if current != last:
                yield current
            last = current

    @handle_errors
    def DrainNode(self, request, context):
        return convert.node_to_pb(self.controller.drain_node(request.name))

    @handle_errors
    def UndrainNode(self, request, context):
        return convert.node_to_pb(self.controller.undrain_node(request.name))

    @handle_errors
    def RemoveNode(self, request, context):
        return convert.node_to_pb(self.controller.remove_node(request.name))

    @handle_errors
    def WatchAssignments(self, request, context):
        self.controller.store.get_node(request.node)        # NOT_FOUND: register first
        # name -> (the record's revision, its message): a record not written
        # since it was sent is not encoded again (every service created or
        # deleted wakes the watch of each node it touches).
        sent: dict[str, tuple[tuple[int, bool], pb.VirtualNode]] | None = None
        for _ in self._watch(node_topic(request.node), context):
            current = {}
            for name, v in self.controller.assignments(request.node).items():
                # A freezing virtual node is sent thawed while a Switch drains
                # it, then frozen, at one revision: the flag is part of the key.
                revision = (revision_of(v), v.frozen)
                before = sent.get(name) if sent else None
                current[name] = (revision, before[1] if before and revision[0] and before[0] == revision
                                 else convert.vnode_to_pb(v))
            if sent is None:
                yield pb.AssignmentEvent(kind=pb.AssignmentEvent.SNAPSHOT,
                                         vnodes=[m for _, m in current.values()])
            else:
                upserts = [m for name, (_, m) in current.items()
                           if name not in sent or (sent[name][1] is not m and sent[name][1] != m)]
                removed = [pb.VirtualNode(name=name) for name in sent.keys() - current.keys()]
                if upserts:
                    yield pb.AssignmentEvent(kind=pb.AssignmentEvent.UPSERT, vnodes=upserts)
                if removed:
                    yield pb.AssignmentEvent(kind=pb.AssignmentEvent.REMOVE, vnodes=removed)
            sent = current

    # ---- guest consoles -----------------------------------------------
    @handle_errors
    def ServiceLogs(self, request, context):
        vnode = self.controller.vnode_of(request.service, request.vnode, self._tenant(context))
        relay = self.logs.open(vnode.node, vnode.name, request.follow, request.tail)
        try:
            first = True
            for data in relay.chunks(context.is_active):
                yield pb.LogChunk(data=data, vnode=vnode.name if first else "")
                first = False
            if first:
                yield pb.LogChunk(vnode=vnode.name)
        finally:
            self.logs.close(relay)

    @handle_errors
    def WatchLogOrders(self, request, context):
        self.controller.store.get_node(request.node)        # NOT_FOUND: register first
        for order in self.logs.orders(request.node, context.is_active):
            yield pb.LogOrder(id=order.id, vnode=order.vnode, follow=order.follow, tail=order.tail)

    @handle_errors
    def SendLogs(self, request_iterator, context):
        identity = access.caller(context)
        first = next(request_iterator, None)
        if first is None or not first.id:
            raise InvalidSpec("a log stream starts with the id of the order it answers")
        relay = self.logs.relay_for(first.id, identity.name if identity.role == access.AGENT else None)
        try:
            for part in itertools.chain((first,), request_iterator):
                if part.error:
                    relay.finish(from_code_name(part.code or "NOT_FOUND", part.error))
                    return pb.Empty()
                if relay.closed.is_set() or (part.data and not relay.put(part.data)):
                    return pb.Empty()           # the caller has gone: end the Agent's stream
            relay.finish()
        except grpc.RpcError:
            # The Agent went away mid-stream (stopped, lost its link).
            relay.finish(Unavailable(f"the Agent of node {relay.order.node} stopped sending"))
        finally:
            relay.closed.set()
        return pb.Empty()

    # ---- images -------------------------------------------------------
    @handle_errors
    def FreezeService(self, request, context):
        service = self.controller.freeze_service(request.name, list(request.vnodes), request.frozen,
                                                 self._tenant(context))
        return convert.service_to_pb(service)

    @handle_errors
    def MoveVnode(self, request, context):
        return convert.service_to_pb(self.controller.move_vnode(request.service, request.vnode, request.to,
                                                                request.cold, self._tenant(context)))

    @handle_errors
    def PushImage(self, request_iterator, context):
        header, chunks = _pushed(request_iterator)
        image = self.controller.push_image(header.name, header.size, header.digest, header.init, chunks,
                                           self._tenant(context), public=header.public, base=header.base)
        return convert.image_to_pb(image)

    @handle_errors
    def PushVnodeDisk(self, request_iterator, context):
        header, chunks = _pushed(request_iterator)
        who = access.caller(context)
        image = self.controller.receive_vnode_disk(who.name if who.role == access.AGENT else None,
                                                   header.name, header.size, header.digest, header.base,
                                                   chunks)
        return convert.image_to_pb(image)

    @handle_errors
    def FetchImage(self, request, context):
        image = self.controller.fetch_image(request.url, request.digest, request.name, request.init,
                                            self._tenant(context), public=request.public, base=request.base)
        return convert.image_to_pb(image)

    @handle_errors
    def ListImages(self, request, context):
        return pb.ListImagesResponse(images=[convert.image_to_pb(i) for i in
                                             self.controller.list_images(self._tenant(context))])

    @handle_errors
    def GetImage(self, request, context):
        image, children, services, nodes = self.controller.get_image(request.image, self._tenant(context))
        reply = convert.image_to_pb(image)
        reply.images.extend(children)
        reply.services.extend(services)
        reply.nodes.extend(nodes)
        return reply

    @handle_errors
    def PrimeImage(self, request, context):
        return pb.PrimeImageResponse(nodes=self.controller.prime_image(request.image, list(request.nodes),
                                                                       self._tenant(context)))

    @handle_errors
    def DeleteImage(self, request, context):
        return convert.image_to_pb(self.controller.delete_image(request.image, self._tenant(context)))

    @handle_errors
    def GetImageTransfer(self, request, context):
        return pb.ImageTransfer(encodings=list(encoding.ENCODINGS), block_size=layers.BLOCK_SIZE)

    @handle_errors
    def ImageBlockHashes(self, request, context):
        who = access.caller(context)
        image = self.controller.image_for(request.image, access.tenant_of(who),
                                          node=who.name if who.role == access.AGENT else None)
        hashes = self.controller.images.block_hashes(image)
        yield pb.ImageBlocks(size=image.size, block_size=layers.BLOCK_SIZE)
        step = (1 << 20) // layers.HASH_BYTES * layers.HASH_BYTES
        for start in range(0, len(hashes), step):
            yield pb.ImageBlocks(hashes=hashes[start:start + step])

    @handle_errors
    def PullImage(self, request, context):
        who = access.caller(context)
        image = self.controller.image_for(request.image, access.tenant_of(who),
                                          node=who.name if who.role == access.AGENT else None)
        chosen = encoding.choose(request.encodings)
        content = self.controller.images.read(image, layer=request.layer)
        yield pb.PullImageResponse(image=convert.image_to_pb(image), encoding=chosen)
        for chunk in encoding.encode(content, chosen):
            yield pb.PullImageResponse(chunk=chunk)

    # ---- tenants ------------------------------------------------------
    @handle_errors
    def SetQuota(self, request, context):
        quota = convert.quota_from_pb(request.quota) if request.HasField("quota") else None
        return convert.tenant_to_pb(self.controller.set_quota(request.tenant, quota))

    @handle_errors
    def ListTenants(self, request, context):
        tenant = self._tenant(context)
        return pb.ListTenantsResponse(tenants=[convert.tenant_to_pb(t)
                                               for t in self.controller.list_tenants(only=tenant)])

    # ---- endpoints ----------------------------------------------------
    @handle_errors
    def ReportSwitchStats(self, request, context):
        self.controller.report_switch(convert.switch_report_from_pb(request))
        return pb.Empty()

    @handle_errors
    def WatchEndpoints(self, request, context):
        """Every service's endpoint set (or one's), then each one that
        changes. A change reads again only the services it published (their
        service topics), not all of them: with 200 services and every Agent
        and Switch watching, reading all on every change was most of the
        Master's work and of a resize's way to the Switch."""
        if request.service:
            self.controller.get_service(request.service)
        last: dict[str, pb.EndpointSet] = {}
        names: list[str] | None = None          # None: all of them (this stream's first read)
        seen = self.notifier.revision(ENDPOINTS_TOPIC)
        while True:
            if request.service:
                names = [request.service]
            current: dict[str, pb.EndpointSet] = {}
            gone: set[str] = set()
            if names is None:
                current = {s.service: convert.endpoints_to_pb(s) for s in self.controller.endpoint_sets()}
                gone = last.keys() - current.keys()
            else:
                for name in names:
                    try:
                        [es] = self.controller.endpoint_sets(name)
                    except NotFound:
                        gone.add(name)
                        continue
                    current[name] = convert.endpoints_to_pb(es)
            for name, message in current.items():
                if last.get(name) != message:
                    last[name] = message
                    yield message
            for name in sorted(gone & last.keys()):
                del last[name]
                yield pb.EndpointSet(service=name, deleted=True)
            if request.service and not last:
                return
            while context.is_active() and not self.notifier.closed:
                revision = self.notifier.wait(ENDPOINTS_TOPIC, seen, WATCH_POLL_SECONDS)
                if revision > seen:
                    names = [topic[len(SERVICE_TOPIC_PREFIX):]
                             for topic in self.notifier.changed(SERVICE_TOPIC_PREFIX, seen)]
                    seen = revision
                    break
            else:
                return
