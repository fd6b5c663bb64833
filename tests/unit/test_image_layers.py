"""Layered images and compressed transfers through a real in-process Master:
a push with a base sends and stores only the layer, every reader gets the
image's exact bytes (an Agent's cache composes it, an old client gets it
composed by the Master), zstd is used when both sides take it and raw bytes
when one does not, and every fault leaves no file and no record behind."""

from __future__ import annotations

import hashlib
import os

import grpc
import pytest

from soda import layers
from soda.agent.images import ImageCache
from soda.errors import DataLoss, InvalidSpec, NotFound, WrongState
from soda.proto.v1 import master_pb2 as pb
from soda.rpc import encoding
from soda.rpc.client import sha256_file
from tests.support import make_ext4_image, master_channel, master_client, start_master

MIB = 1 << 20


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def master(tmp_path):
    server, target = start_master(str(tmp_path / "master"))
    try:
        yield target, str(tmp_path / "master" / "images")
    finally:
        server.stop()


@pytest.fixture
def base(tmp_path) -> str:
    """A 16 MiB 'filesystem' with 4 MiB of content and holes elsewhere."""
    return make_ext4_image(str(tmp_path / "base.img"), 16 * MIB, data=os.urandom(4 * MIB))


def _app_of(base: str, path: str, changed: int = 64 * 1024) -> str:
    """`base` with `changed` bytes rewritten and a small file's worth added."""
    data = bytearray(_read(base))
    data[2 * MIB:2 * MIB + changed] = os.urandom(changed)
    data[9 * MIB:9 * MIB + 8192] = os.urandom(8192)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _stored_files(images_dir: str) -> set[str]:
    return {n for n in os.listdir(images_dir) if n.startswith("sha256-") and not n.endswith(".blocks")}


def test_a_push_over_a_base_sends_and_stores_only_its_layer(master, base, tmp_path):
    target, images_dir = master
    client = master_client(target)
    pushed_base = client.push_image(base, name="base")
    app = _app_of(base, str(tmp_path / "app.img"))
    sent = []
    pushed = client.push_image(app, name="app", base="base", compress=False,
                               progress=lambda done, total, wire: sent.append(wire))
    assert pushed.digest == sha256_file(app) and pushed.size == os.path.getsize(app)
    assert pushed.parent == pushed_base.digest and pushed.layer
    # What changed (72 KiB) and the records' headers; far below the 16 MiB image.
    assert 72 * 1024 < pushed.layer_size < 80 * 1024
    assert sent[-1] == pushed.layer_size
    assert _stored_files(images_dir) == {pushed_base.digest.replace(":", "-"), pushed.layer.replace(":", "-")}
    assert os.path.getsize(os.path.join(images_dir, pushed.layer.replace(":", "-"))) == pushed.layer_size
    listed = {i.names[0]: i for i in client.list_images()}
    assert listed["app"].parent == pushed_base.digest and listed["app"].stored_size == pushed.layer_size
    image, children, services, nodes = client.inspect_image("base")
    assert children == [pushed.digest] and services == [] and nodes == []


def test_an_agent_pulls_the_layer_and_composes_the_image_once(master, base, tmp_path):
    target, _ = master
    client = master_client(target)
    client.push_image(base, name="base")
    app = _app_of(base, str(tmp_path / "app.img"))
    pushed = client.push_image(app, name="app", base="base")

    pulls = []

    class Recording:
        def pull_image(self, digest, out, layer=False):
            meta = client.pull_image(digest, out, layer=layer)
            pulls.append((digest, meta.layer_size if meta.layer else meta.size, out.tell()))
            return meta

    cache = ImageCache(str(tmp_path / "agent-images"), Recording())
    path = cache.ensure(pushed.digest)
    assert _read(path) == _read(app)
    assert os.stat(path).st_mode & 0o777 == 0o444
    # The app's layer, then its base whole: each once, and only the layer for the app.
    assert [(d, n) for d, n, _ in pulls] == [(pushed.digest, pushed.layer_size),
                                            (pushed.parent, os.path.getsize(base))]
    assert pulls[0][2] == pushed.layer_size
    assert cache.ensure(pushed.digest) == path and len(pulls) == 2
    # A second app over the same base pulls its layer alone.
    other = client.push_image(_app_of(base, str(tmp_path / "other.img"), changed=4096), base="base")
    assert _read(cache.ensure(other.digest)) == _read(str(tmp_path / "other.img"))
    assert [d for d, _, _ in pulls[2:]] == [other.digest]
    assert not [n for n in os.listdir(tmp_path / "agent-images") if n.startswith(".pull-")]


def test_compression_is_used_both_ways_when_both_sides_take_it(master, base):
    target, _ = master
    client = master_client(target)
    sent = []
    pushed = client.push_image(base, name="base", progress=lambda done, total, wire: sent.append((done, wire)))
    assert sent[-1][0] == os.path.getsize(base)
    # 4 MiB of random bytes do not compress; 12 MiB of zeros nearly vanish.
    assert 4 * MIB < sent[-1][1] < 4.2 * MIB
    received = []
    out = open(os.devnull, "wb")
    meta = client.pull_image("base", out, progress=lambda done, total, wire: received.append((done, wire)))
    assert meta.digest == pushed.digest and received[-1][0] == 16 * MIB and received[-1][1] < 4.2 * MIB


def test_an_old_client_pulls_a_layered_image_whole_and_raw(master, base, tmp_path):
    target, _ = master
    client = master_client(target)
    client.push_image(base, name="base")
    app = _app_of(base, str(tmp_path / "app.img"))
    client.push_image(app, name="app", base="base")
    stub = pb_grpc_stub(target)
    parts = list(stub.PullImage(pb.PullImageRequest(image="app")))     # no layer, no encodings
    assert parts[0].HasField("image") and parts[0].encoding == ""
    assert b"".join(p.chunk for p in parts[1:]) == _read(app)


def pb_grpc_stub(target: str):
    from soda.proto.v1 import master_pb2_grpc as pb_grpc
    return pb_grpc.MasterStub(master_channel(target))


def test_an_image_with_layers_on_it_is_not_deleted_until_they_are(master, base, tmp_path):
    target, images_dir = master
    client = master_client(target)
    client.push_image(base, name="base")
    app = client.push_image(_app_of(base, str(tmp_path / "app.img")), name="app", base="base")
    client.image_block_hashes("base")                 # leaves its cache beside the file
    with pytest.raises(WrongState, match="image\\(s\\) app layered on it"):
        client.delete_image("base")
    client.delete_image("app")
    assert not os.path.exists(os.path.join(images_dir, app.layer.replace(":", "-")))
    client.delete_image("base")
    assert os.listdir(images_dir) == ["tmp"]


# ---- faults: a clear error, and nothing left -----------------------------------

def _assert_nothing_left(images_dir: str, client, names: set[str]) -> None:
    assert {n for i in client.list_images() for n in i.names} == names
    assert os.listdir(os.path.join(images_dir, "tmp")) == []
    assert len(_stored_files(images_dir)) == len(names)


def test_a_base_that_does_not_exist_is_refused_before_anything_is_sent(master, base, tmp_path):
    target, images_dir = master
    client = master_client(target)
    with pytest.raises(NotFound, match="no image 'nosuch'"):
        client.push_image(base, name="app", base="nosuch")
    _assert_nothing_left(images_dir, client, set())


def _push_raw(target: str, header: pb.ImageHeader, chunks) -> None:
    stub = pb_grpc_stub(target)

    def requests():
        yield pb.PushImageRequest(header=header)
        for c in chunks:
            yield pb.PushImageRequest(chunk=c)
    try:
        stub.PushImage(requests())
    except grpc.RpcError as exc:
        raise AssertionError(exc.details()) from None


@pytest.mark.parametrize("fault", ["other-parent", "wrong-digest", "does-not-apply", "corrupt-zstd",
                                   "truncated-zstd", "not-a-layer"])
def test_a_bad_layer_or_stream_is_refused_and_leaves_nothing(master, base, tmp_path, fault):
    target, images_dir = master
    client = master_client(target)
    pushed_base = client.push_image(base, name="base")
    other = client.push_image(make_ext4_image(str(tmp_path / "other.img"), data=b"x"), name="other")
    app = _app_of(base, str(tmp_path / "app.img"))
    hashes = client.image_block_hashes("base")
    runs = list(layers.differing_runs(app, hashes))
    app_digest = sha256_file(app)
    parent = other.digest if fault == "other-parent" else pushed_base.digest
    named = _digest(b"not it") if fault == "wrong-digest" else app_digest
    header = layers.Header(layers.BLOCK_SIZE, os.path.getsize(app), parent, named)
    layer = b"".join(layers.build(app, header, runs))
    if fault == "does-not-apply":
        layer = layer[:-13] + layers._RECORD.pack(layers.DATA, 10**9, 1)[:13]
    if fault == "not-a-layer":
        layer = _read(app)[:100000]
    enc = encoding.ZSTD if "zstd" in fault else encoding.RAW
    wire = b"".join(encoding.encode([layer], enc))
    if fault == "corrupt-zstd":
        wire = wire[:len(wire) // 2] + bytes([wire[len(wire) // 2] ^ 0xFF]) + wire[len(wire) // 2 + 1:]
    if fault == "truncated-zstd":
        wire = wire[:len(wire) // 2]
    expected = {"other-parent": "is over image", "wrong-digest": "composed with its parent gives",
                "does-not-apply": "outside the image", "corrupt-zstd": "corrupt", "truncated-zstd": "upload ended after",
                "not-a-layer": "not a SODA layer"}[fault]
    with pytest.raises(AssertionError, match=expected):
        _push_raw(target, pb.ImageHeader(name="app", size=len(layer), digest=_digest(layer), base="base",
                                         encoding=enc), [wire])
    _assert_nothing_left(images_dir, client, {"base", "other"})


def test_an_unknown_encoding_is_refused(master, base):
    target, images_dir = master
    with pytest.raises(AssertionError, match="unknown content encoding 'lz4'"):
        _push_raw(target, pb.ImageHeader(name="x", size=10, digest=_digest(b"0123456789"), encoding="lz4"),
                  [b"0123456789"])


def test_layer_errors_are_typed():
    assert issubclass(layers.InvalidLayer, InvalidSpec)
    with pytest.raises(DataLoss):
        layers.check_digest(_digest(b"a"), layers.Header(4096, 1, _digest(b"p"), _digest(b"b")))
