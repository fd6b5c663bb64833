"""The Master over real gRPC (in-process server on 127.0.0.1:0)."""

import os
import threading

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soda import model
from soda.errors import AlreadyExists, DataLoss, InvalidSpec, NoCapacity, NotFound, Unavailable, WrongState
from soda.proto.v1 import master_pb2 as pb
from soda.proto.v1 import master_pb2_grpc as pb_grpc
from soda.rpc.client import CHUNK_SIZE, MasterClient, sha256_file
from tests.support import free_port, make_ext4_image, master_channel, master_client

CAP = model.Resources(2, 4096, 1000, 100_000)


@pytest.fixture
def client(master):
    c = master_client(master[1])
    yield c
    c.close()


@pytest.fixture
def stub(master):
    channel = master_channel(master[1])
    yield pb_grpc.MasterStub(channel)
    channel.close()


@pytest.fixture
def cluster(client, image_file):
    for i in range(3):
        client.register_node(f"n{i}", f"127.0.0.{i + 1}", CAP, ["fake"],
                             [model.DriverCapabilities("fake", live_memory=True)])
    client.push_image(image_file, name="busybox")
    return client


def spec(**kw):
    base = {"name": "web", "image": "busybox", "nodes": 4, "resources": {"cpu": 0.5, "memory": 64}}
    base.update(kw)
    return model.parse_spec(base)


def test_a_service_created_at_zero_nodes_grows_with_the_resources_it_was_given(cluster):
    svc = cluster.create_service(spec(name="z", nodes=0, resources={"cpu": 0.25, "memory": 48}))
    assert svc.vnodes == ()
    with pytest.raises(InvalidSpec):
        cluster.create_service(spec(name="y", nodes=0, resources={"cpu": 0}))
    grown = cluster.resize_service("z", nodes=2)
    assert [v.resources for v in grown.vnodes] == [model.Resources(0.25, 48, 100, 256)] * 2
    shrunk = cluster.resize_service("z", nodes=0)
    again = cluster.resize_service("z", nodes=1)
    assert shrunk.spec.template == model.Resources(0.25, 48, 100, 256)
    assert [v.resources for v in again.vnodes if not v.deleting] == [model.Resources(0.25, 48, 100, 256)]


def test_create_places_spreads_and_addresses(cluster):
    svc = cluster.create_service(spec())
    assert len(svc.vnodes) == 4
    assert sorted(v.name for v in svc.vnodes) == ["web-0", "web-1", "web-2", "web-3"]
    per_node = {}
    for v in svc.vnodes:
        per_node.setdefault(v.node, []).append(v)
        assert v.phase == model.Phase.PENDING and v.hypervisor == "fake" and v.weight == 0.5
    assert sorted(len(x) for x in per_node.values()) == [1, 1, 2]
    nodes = {n.name: n for n in cluster.list_nodes()}
    for name, vs in per_node.items():
        assert nodes[name].allocated.cpu == pytest.approx(0.5 * len(vs))
        prefix = nodes[name].subnet.rsplit(".", 1)[0]
        assert all(v.address.startswith(prefix + ".") and v.gateway == nodes[name].gateway for v in vs)
    assert len({v.address for v in svc.vnodes}) == 4


def test_no_capacity_leaves_nothing(cluster):
    cluster.create_service(spec(name="small", nodes=1))
    before = cluster.list_nodes()
    with pytest.raises(NoCapacity, match="cpu"):
        cluster.create_service(spec(name="huge", nodes=3, resources={"cpu": 2}))
    assert [s.name for s in cluster.list_services()] == ["small"]
    assert cluster.list_nodes() == before or [n.allocated for n in cluster.list_nodes()] == \
        [n.allocated for n in before]


def test_duplicate_and_unknown(cluster):
    cluster.create_service(spec())
    with pytest.raises(AlreadyExists):
        cluster.create_service(spec())
    with pytest.raises(NotFound, match="no image"):
        cluster.create_service(spec(name="other", image="missing"))
    with pytest.raises(NotFound):
        cluster.get_service("nope")
    with pytest.raises(NotFound):
        cluster.delete_service("nope")


@pytest.mark.parametrize("mutate, code", [
    (lambda s: setattr(s, "name", "Bad_Name"), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: setattr(s, "nodes", -3), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.resources[0].__setattr__("cpu", 0.0), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.resources[0].__setattr__("memory_mib", -64), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.resources[0].__setattr__("cpu", 1e12), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: s.resources.pop(), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: setattr(s, "hypervisor", "vmware"), grpc.StatusCode.INVALID_ARGUMENT),
    (lambda s: setattr(s, "image", "nothere"), grpc.StatusCode.NOT_FOUND),
    (lambda s: s.resources[0].__setattr__("cpu", 500.0), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_bad_input_gets_the_right_status_code(cluster, stub, mutate, code):
    message = pb.ServiceSpec(name="web", image="busybox", nodes=1,
                             resources=[pb.Resources(cpu=0.5, memory_mib=64, bandwidth_mbit=10, disk_mib=64)])
    mutate(message)
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateService(pb.CreateServiceRequest(spec=message))
    assert info.value.code() == code
    assert info.value.details() and "\n" not in info.value.details()
    assert "Traceback" not in info.value.details()
    assert cluster.list_services() == []


def test_dead_master_is_unavailable():
    with MasterClient(f"127.0.0.1:{free_port()}", timeout=2) as c:
        with pytest.raises(Unavailable, match="cannot reach the SODA Master"):
            c.list_services()


_names = st.one_of(st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9]", fullmatch=True), st.text(max_size=12))
_num = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**7).map(float))
_int = st.integers(-2**40, 2**40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=_names, nodes=st.integers(-5, 12), image=st.sampled_from(["busybox", "nope", "", "sha256:" + "a" * 64]),
       hypervisor=st.sampled_from(["", "fake", "uml", "qemu", "xen"]), port=st.integers(-1, 70000),
       res=st.lists(st.tuples(_num, _int, _int, _int), max_size=14),
       listen=st.sampled_from(["", "127.0.0.1:8080", "bad", ":1", "h:99999"]),
       policy=st.sampled_from(["", "weighted-round-robin", "weighted-least-connections", "x"]))
def test_random_specs_never_break_the_master(cluster, stub, name, nodes, image, hypervisor, port, res, listen, policy):
    message = pb.ServiceSpec(name=name, image=image, nodes=nodes, hypervisor=hypervisor, port=port,
                             resources=[pb.Resources(cpu=c, memory_mib=m, bandwidth_mbit=b, disk_mib=d)
                                        for c, m, b, d in res],
                             switch=pb.SwitchSpec(listen=listen, policy=policy))
    before = {s.name for s in cluster.list_services()}
    try:
        reply = stub.CreateService(pb.CreateServiceRequest(spec=message))
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED), exc.details()
        assert {s.name for s in cluster.list_services()} == before, "a refused create left something behind"
        return
    svc = cluster.get_service(reply.spec.name)
    assert len(svc.vnodes) == svc.spec.nodes and all(v.node for v in svc.vnodes)
    cluster.delete_service(svc.name)
    # No Agent runs in this test: the Master cannot finish the delete, so
    # clean the store through the controller's own path for the next example.
    for v in svc.vnodes:
        cluster.report_status(v.node, [model.VirtualNodeStatus(v.name, model.Phase.STOPPED, generation=v.generation)])
    with pytest.raises(NotFound):
        cluster.get_service(svc.name)


# ---- images ----------------------------------------------------------

def test_push_is_chunked_verified_and_pullable(client, tmp_path):
    path = make_ext4_image(str(tmp_path / "a.img"), size=5 * CHUNK_SIZE + 123, data=b"hello")
    image = client.push_image(path, name="a")
    assert image.digest == sha256_file(path) and image.names == ("a",) and image.size == os.path.getsize(path)
    with open(tmp_path / "out", "wb") as out:
        got = client.pull_image("a", out)
    assert got.digest == image.digest
    assert sha256_file(str(tmp_path / "out")) == image.digest
    assert [i.digest for i in client.list_images()] == [image.digest]


def _upload(client, path, digest=None, stop_after=None, size=None):
    data = open(path, "rb").read()
    digest = digest or sha256_file(path)

    def requests():
        yield pb.PushImageRequest(header=pb.ImageHeader(name="x", size=size or len(data), digest=digest))
        for i in range(0, len(data), CHUNK_SIZE):
            if stop_after is not None and i >= stop_after:
                raise RuntimeError("client went away")
            yield pb.PushImageRequest(chunk=data[i:i + CHUNK_SIZE])
    return client.push_image_stream(requests())


def _store_is_empty(master, client):
    images_dir = os.path.join(master[0].cfg.state_dir, "images")
    leftovers = [n for n in os.listdir(images_dir) if n != "tmp"] + os.listdir(os.path.join(images_dir, "tmp"))
    return client.list_images() == [] and leftovers == []


def test_corrupt_upload_leaves_nothing(master, client, tmp_path):
    path = make_ext4_image(str(tmp_path / "a.img"), size=3 * CHUNK_SIZE)
    with pytest.raises(DataLoss, match="corrupt"):
        _upload(client, path, digest="sha256:" + "0" * 64)
    assert _store_is_empty(master, client)


def test_interrupted_upload_leaves_nothing(master, client, tmp_path):
    path = make_ext4_image(str(tmp_path / "a.img"), size=3 * CHUNK_SIZE)
    with pytest.raises(Exception):
        _upload(client, path, stop_after=CHUNK_SIZE)
    # The server notices the cancelled stream asynchronously.
    for _ in range(50):
        if _store_is_empty(master, client):
            break
        threading.Event().wait(0.1)
    assert _store_is_empty(master, client)


def test_short_upload_is_refused(master, client, tmp_path):
    path = make_ext4_image(str(tmp_path / "a.img"), size=2 * CHUNK_SIZE)
    with pytest.raises(DataLoss, match="ended after"):
        _upload(client, path, size=3 * CHUNK_SIZE)
    assert _store_is_empty(master, client)


def test_truncated_and_foreign_images_are_refused(master, client, tmp_path):
    full = make_ext4_image(str(tmp_path / "full.img"), size=4 << 20)
    with open(full, "rb") as f:
        head = f.read(2 << 20)
    cut = tmp_path / "cut.img"
    cut.write_bytes(head)
    with pytest.raises(InvalidSpec, match="truncated"):
        client.push_image(str(cut))
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(8192))
    with pytest.raises(InvalidSpec, match="not an ext4"):
        client.push_image(str(junk))
    assert _store_is_empty(master, client)


def test_image_in_use_cannot_be_deleted(cluster):
    cluster.create_service(spec(nodes=1))
    with pytest.raises(WrongState, match="used by service"):
        cluster.delete_image("busybox")
    with pytest.raises(NotFound):
        cluster.delete_image("nothing")


def test_bad_image_name(client, image_file):
    with pytest.raises(InvalidSpec, match="invalid image name"):
        client.push_image(image_file, name="Has Space")


# ---- agents' side ----------------------------------------------------

def test_assignments_snapshot_then_changes(cluster):
    stream = cluster.watch_assignments("n0")
    kind, vnodes = next(stream)
    assert (kind, vnodes) == ("SNAPSHOT", [])
    cluster.create_service(spec(nodes=3))
    kind, vnodes = next(stream)
    assert kind == "UPSERT" and [v.node for v in vnodes] == ["n0"]
    cluster.delete_service("web")
    assert next(stream) == ("REMOVE", [vnodes[0].name])
    stream.close()


def test_heartbeat_completes_a_delete(cluster):
    svc = cluster.create_service(spec(nodes=3))
    cluster.delete_service("web")
    for node in {v.node for v in svc.vnodes}:
        cluster.heartbeat(node, [])
    with pytest.raises(NotFound):
        cluster.get_service("web")
    assert all(n.allocated == model.Resources() for n in cluster.list_nodes())


def test_status_reports_update_phases_and_endpoints(cluster):
    svc = cluster.create_service(spec(nodes=2))
    v = svc.vnodes[0]
    endpoints = cluster.watch_endpoints("web")
    first = next(endpoints)
    assert [e.ready for e in first.endpoints] == [False, False]
    cluster.report_status(v.node, [model.VirtualNodeStatus(v.name, model.Phase.RUNNING, boot_seconds=0.25,
                                                           generation=v.generation)])
    got = cluster.get_service("web").vnodes[0]
    assert got.phase == model.Phase.RUNNING and got.boot_seconds == 0.25
    second = next(endpoints)
    assert [e.ready for e in second.endpoints] == [True, False]
    endpoints.close()


def test_heartbeat_from_unknown_node_is_not_found(client):
    with pytest.raises(NotFound):
        client.heartbeat("ghost", [])


def test_register_keeps_subnet_and_validates(client):
    first = client.register_node("n0", "127.0.0.1", CAP, ["fake"])
    again = client.register_node("n0", "127.0.0.2", CAP, ["fake"])
    assert first.subnet == again.subnet and again.address == "127.0.0.2"
    other = client.register_node("n1", "127.0.0.1", CAP, ["fake"])    # n0 left it
    assert other.subnet != first.subnet
    with pytest.raises(InvalidSpec):
        client.register_node("N_0", "127.0.0.1", CAP, ["fake"])
    with pytest.raises(InvalidSpec):
        client.register_node("n2", "127.0.0.1", model.Resources(0, 1, 1, 1), ["fake"])
    with pytest.raises(InvalidSpec):
        client.register_node("n2", "127.0.0.1", CAP, ["Not A Name"])


def test_labels_go_through_registration_and_come_back_in_the_node_list(client):
    node = client.register_node("n0", "192.0.2.10", CAP, ["fake"], labels={"zone": "a", "rack": "r1"})
    assert node.labels == {"rack": "r1", "zone": "a"}
    client.register_node("n1", "192.0.2.11", CAP, ["fake"])
    assert {n.name: n.labels for n in client.list_nodes()} == {"n0": {"rack": "r1", "zone": "a"}, "n1": {}}
    with pytest.raises(InvalidSpec, match="node n2: invalid label value 'A' of label 'zone'"):
        client.register_node("n2", "192.0.2.12", CAP, ["fake"], labels={"zone": "A"})


def test_a_taken_address_is_already_exists_on_the_wire(client, stub):
    client.register_node("n0", "192.0.2.10", CAP, ["fake"])
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterNode(pb.RegisterNodeRequest(name="n1", address="192.0.2.10", hypervisors=["fake"],
                                                 capacity=pb.Resources(cpu=2, memory_mib=4096,
                                                                       bandwidth_mbit=1000, disk_mib=100_000)))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "address 192.0.2.10 is already held by node n0" in info.value.details()
    with pytest.raises(AlreadyExists):
        client.register_node("n1", "192.0.2.10", CAP, ["fake"])


def test_capacity_a_node_assumed_is_kept_and_shown(client):
    from soda.cli.output import nodes_table
    node = client.register_node("n0", "127.0.0.1", CAP, ["fake"], assumed=["bandwidth"])
    assert node.assumed == ("bandwidth",)
    [listed] = client.list_nodes()
    assert listed.assumed == ("bandwidth",)
    assert f"0/{CAP.bandwidth:g}Mbit (assumed)" in nodes_table([listed])
    assert client.register_node("n0", "127.0.0.1", CAP, ["fake"]).assumed == ()   # measured now
    with pytest.raises(InvalidSpec, match="unknown resources: speed"):
        client.register_node("n1", "127.0.0.2", CAP, ["fake"], assumed=["speed"])


def test_resize_grows_shrinks_and_changes_resources(cluster):
    cluster.create_service(spec(nodes=2))
    svc = cluster.resize_service("web", nodes=3)
    assert sorted(v.name for v in svc.vnodes if not v.deleting) == ["web-0", "web-1", "web-2"]
    svc = cluster.resize_service("web", nodes=1)
    assert [v.name for v in svc.vnodes if not v.deleting] == ["web-0"]
    svc = cluster.resize_service("web", resources=[model.Resources(1.0, 64, 100, 256)])
    live = [v for v in svc.vnodes if not v.deleting]
    # CPU changes live: same generation, no new boot.
    assert live[0].resources.cpu == 1.0 and live[0].weight == 1.0 and live[0].generation == 1
    svc = cluster.resize_service("web", resources=[model.Resources(1.0, 128, 100, 256)])
    live = [v for v in svc.vnodes if not v.deleting]
    # Memory changes live on a hypervisor whose nodes say it can (live_memory).
    assert live[0].resources.memory == 128 and live[0].generation == 1
    svc = cluster.resize_service("web", resources=[model.Resources(1.0, 128, 100, 512)])
    live = [v for v in svc.vnodes if not v.deleting]
    # The disk is fixed at boot: a new generation, booted again.
    assert live[0].generation == 2 and live[0].phase == model.Phase.PENDING
    with pytest.raises(NoCapacity):
        cluster.resize_service("web", resources=[model.Resources(100.0, 64, 100, 256)])


def test_health_and_reflection(master):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    channel = master_channel(master[1])
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="soda.proto.v1.Master"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(responses).list_services_response.service}
        assert "soda.proto.v1.Master" in names and "grpc.health.v1.Health" in names
    finally:
        channel.close()


def test_cpu_cap_reaches_the_virtual_nodes(cluster):
    svc = cluster.create_service(model.parse_spec({"name": "capped", "image": "busybox", "nodes": 2,
                                                   "cpu_cap": True, "resources": {"cpu": 0.25}}))
    assert svc.spec.cpu_cap and all(v.cpu_cap for v in svc.vnodes)
    stream = cluster.watch_assignments(svc.vnodes[0].node)
    kind, vnodes = next(stream)
    assert all(v.cpu_cap for v in vnodes)
    stream.close()


def test_heartbeat_usage_reaches_get_service_and_node_list(cluster):
    svc = cluster.create_service(spec(nodes=1))
    v = svc.vnodes[0]
    usage = model.Usage(cpu_seconds=4.5, memory_bytes=21 << 20, memory_peak_bytes=25 << 20,
                        bytes_in=123, bytes_out=456, throttled_seconds=1.0, oom_kills=1)
    cluster.heartbeat(v.node, [model.VirtualNodeStatus(v.name, model.Phase.RUNNING,
                                                       generation=v.generation, usage=usage)])
    assert cluster.get_service("web").vnodes[0].usage == usage
    assert cluster.list_services()[0].vnodes[0].usage == usage
    nodes = {n.name: n for n in cluster.list_nodes()}
    assert nodes[v.node].usage == usage
    assert all(n.usage is None for name, n in nodes.items() if name != v.node)


def test_the_node_set_is_streamed_on_membership_changes_only(client):
    import threading
    sets = []
    got = threading.Condition()

    def follow():
        for nodes in client.watch_nodes():
            with got:
                sets.append(nodes)
                got.notify_all()
            if len(sets) == 3:
                return
    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()

    def wait_sets(n):
        with got:
            assert got.wait_for(lambda: len(sets) >= n, timeout=10), sets
    wait_sets(1)
    assert sets[0] == []
    client.register_node("n1", "10.9.0.1", model.Resources(2, 4096, 1000, 100000), ["fake"])
    wait_sets(2)
    assert [(n.name, n.address, n.state) for n in sets[1]] == [("n1", "10.9.0.1", "READY")]
    assert sets[1][0].subnet and sets[1][0].uplink
    # A heartbeat changes nothing a router needs: no new set.
    client.heartbeat("n1", [])
    client.register_node("n1", "10.9.0.7", model.Resources(2, 4096, 1000, 100000), ["fake"])
    wait_sets(3)
    assert [(n.name, n.address) for n in sets[2]] == [("n1", "10.9.0.7")]
    watcher.join(timeout=10)


def test_drain_undrain_and_their_errors_on_the_wire(cluster):
    svc = cluster.create_service(spec(nodes=3, resources={"cpu": 1.5}))      # one on each node
    with pytest.raises(NoCapacity, match="cannot drain node n0: not enough cpu"):
        cluster.drain_node("n0")
    with pytest.raises(NotFound, match="no physical node named 'nope'"):
        cluster.drain_node("nope")
    with pytest.raises(NotFound):
        cluster.undrain_node("nope")
    cluster.delete_service(svc.name)
    for name in ("n0", "n1", "n2"):
        cluster.heartbeat(name, [])         # their Agents stopped the service's guests
    drained = cluster.drain_node("n0")
    assert drained.draining and drained.vnodes == 0 and drained.subnet
    assert {n.name: n.draining for n in cluster.list_nodes()} == {"n0": True, "n1": False, "n2": False}
    placed = cluster.create_service(spec(name="api", nodes=2))
    assert "n0" not in {v.node for v in placed.vnodes}
    assert cluster.undrain_node("n0").draining is False
    # A draining node that holds nothing may be removed while its Agent still runs.
    cluster.drain_node("n0")
    assert cluster.remove_node("n0").name == "n0"
    assert [n.name for n in cluster.list_nodes()] == ["n1", "n2"]


def test_a_watch_of_every_service_reads_again_only_the_services_that_changed(master, cluster, monkeypatch):
    server, _ = master
    for name in ("web", "api", "db"):
        cluster.create_service(spec(name=name, nodes=1))
    read: list[str] = []
    real = server.controller.endpoint_sets

    def counted(service=""):
        read.append(service or "*")
        return real(service)
    monkeypatch.setattr(server.controller, "endpoint_sets", counted)
    stream = cluster.watch_endpoints()
    assert sorted(next(stream).service for _ in range(3)) == ["api", "db", "web"]
    assert read == ["*"]
    api = cluster.get_service("api").vnodes[0]
    cluster.report_status(api.node, [model.VirtualNodeStatus(api.name, model.Phase.RUNNING,
                                                             generation=api.generation)])
    changed = next(stream)
    assert changed.service == "api" and [e.ready for e in changed.endpoints] == [True]
    assert read == ["*", "api"]
    db = cluster.get_service("db").vnodes[0]
    cluster.delete_service("db")
    leaving = next(stream)
    assert (leaving.service, leaving.deleted, list(leaving.endpoints)) == ("db", False, [])
    cluster.heartbeat(db.node, [])          # its Agent stopped it: the service is gone
    gone = next(stream)
    assert (gone.service, gone.deleted) == ("db", True)
    assert read == ["*", "api", "db", "db"]
    stream.close()
