"""The Master's gRPC servicer: decode, call the Controller, encode.

No validation, placement or policy lives here; errors become gRPC status
codes through soda.rpc.errors.handle_errors. Watch streams wait on the
Controller's notifier and end when the client goes away or the Master stops.
"""

from __future__ import annotations

import logging
from typing import Iterator

from soda import model
from soda.errors import InvalidSpec, NotFound
from soda.master.controller import (ENDPOINTS_TOPIC, NODES_TOPIC, SERVICES_TOPIC, Controller,
                                    node_topic, service_topic)
from soda.proto.v1 import master_pb2 as pb
from soda.proto.v1 import master_pb2_grpc as pb_grpc
from soda.rpc import convert
from soda.rpc.errors import handle_errors

log = logging.getLogger(__name__)

# How often an idle watch wakes to notice a client that went away.
WATCH_POLL_SECONDS = 1.0


class MasterServicer(pb_grpc.MasterServicer):
    def __init__(self, controller: Controller, heartbeat_seconds: int):
        self.controller = controller
        self.notifier = controller.notifier
        self.heartbeat_seconds = heartbeat_seconds

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
        return convert.service_to_pb(self.controller.create_service(convert.spec_from_pb(request.spec)))

    @handle_errors
    def GetService(self, request, context):
        return convert.service_to_pb(self.controller.get_service(request.name))

    @handle_errors
    def ListServices(self, request, context):
        return pb.ListServicesResponse(services=[convert.service_to_pb(s)
                                                 for s in self.controller.list_services()])

    @handle_errors
    def DeleteService(self, request, context):
        return convert.service_to_pb(self.controller.delete_service(request.name))

    @handle_errors
    def ResizeService(self, request, context):
        nodes = None if request.nodes < 0 else request.nodes
        resources = [convert.resources_from_pb(r) for r in request.resources]
        return convert.service_to_pb(self.controller.resize_service(request.name, nodes, resources))

    @handle_errors
    def EnsureNodes(self, request, context):
        return convert.service_to_pb(self.controller.ensure_nodes(request.name, request.at_least or 1))

    @handle_errors
    def ReleaseNodes(self, request, context):
        return convert.service_to_pb(self.controller.release_nodes(request.name))

    @handle_errors
    def WatchServices(self, request, context):
        if request.name:
            self.controller.get_service(request.name)     # NOT_FOUND before streaming
        topic = service_topic(request.name) if request.name else SERVICES_TOPIC
        last: dict[str, pb.Service] = {}
        for _ in self._watch(topic, context):
            services = ([self._maybe_service(request.name)] if request.name
                        else self.controller.list_services())
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

    def _maybe_service(self, name: str) -> model.Service | None:
        try:
            return self.controller.get_service(name)
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
        self.controller.report_status(request.node, [convert.status_from_pb(s) for s in request.vnodes],
                                      complete=True)
        return pb.HeartbeatResponse(heartbeat_seconds=self.heartbeat_seconds)

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
        sent: dict[str, pb.VirtualNode] | None = None
        for _ in self._watch(node_topic(request.node), context):
            current = {name: convert.vnode_to_pb(v)
                       for name, v in self.controller.assignments(request.node).items()}
            if sent is None:
                yield pb.AssignmentEvent(kind=pb.AssignmentEvent.SNAPSHOT, vnodes=list(current.values()))
            else:
                upserts = [m for name, m in current.items() if sent.get(name) != m]
                removed = [pb.VirtualNode(name=name) for name in sent.keys() - current.keys()]
                if upserts:
                    yield pb.AssignmentEvent(kind=pb.AssignmentEvent.UPSERT, vnodes=upserts)
                if removed:
                    yield pb.AssignmentEvent(kind=pb.AssignmentEvent.REMOVE, vnodes=removed)
            sent = current

    # ---- images -------------------------------------------------------
    @handle_errors
    def PushImage(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise InvalidSpec("an image push must start with a header (name, size, digest)")
        header = first.header

        def chunks():
            for part in request_iterator:
                if part.HasField("header"):
                    raise InvalidSpec("an image push carries one header, first")
                yield part.chunk
        image = self.controller.push_image(header.name, header.size, header.digest, header.init, chunks())
        return convert.image_to_pb(image)

    @handle_errors
    def ListImages(self, request, context):
        return pb.ListImagesResponse(images=[convert.image_to_pb(i) for i in self.controller.list_images()])

    @handle_errors
    def DeleteImage(self, request, context):
        return convert.image_to_pb(self.controller.delete_image(request.image))

    @handle_errors
    def PullImage(self, request, context):
        for part in self.controller.images.read(request.image):
            if isinstance(part, model.Image):
                yield pb.PullImageResponse(image=convert.image_to_pb(part))
            else:
                yield pb.PullImageResponse(chunk=part)

    # ---- endpoints ----------------------------------------------------
    @handle_errors
    def ReportSwitchStats(self, request, context):
        self.controller.report_switch(convert.switch_report_from_pb(request))
        return pb.Empty()

    @handle_errors
    def WatchEndpoints(self, request, context):
        if request.service:
            self.controller.get_service(request.service)
        last: dict[str, pb.EndpointSet] = {}
        for _ in self._watch(ENDPOINTS_TOPIC, context):
            try:
                sets = self.controller.endpoint_sets(request.service)
            except NotFound:
                sets = []
            current = {s.service: convert.endpoints_to_pb(s) for s in sets}
            for name, message in current.items():
                if last.get(name) != message:
                    yield message
            for name in last.keys() - current.keys():
                yield pb.EndpointSet(service=name, deleted=True)
            last = current
            if request.service and not current:
                return
