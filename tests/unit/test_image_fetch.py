"""sodactl image push --url: the Master fetches an image over HTTP from a
local server, resumes a download cut or stalled halfway, refuses content
with another digest, a 404, a server that does not say the size or sends
more than it said, and a tenant's URL on a private address; nothing is left
behind by any failure."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import time

import pytest

from soda import layers
from soda.errors import DataLoss, InvalidSpec, NotFound, PermissionDenied, Unavailable
from soda.rpc.client import sha256_file
from tests.support import make_ext4_image, master_client, start_master

MIB = 1 << 20


class Server:
    """A local HTTP server of one file, misbehaving as a path says."""

    def __init__(self, content: bytes):
        self.content = content
        self.requests: list[tuple[str, str]] = []      # (path, Range header)
        self.cut_done: set[str] = set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range", "")))
                server.answer(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def answer(self, h) -> None:
        data, path = self.content, h.path
        if path == "/missing":
            h.send_error(404)
            return
        start = 0
        ranged = h.headers.get("Range", "")
        if ranged and "norange" not in path:
            start = int(ranged.removeprefix("bytes=").rstrip("-"))
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        body = data[start:]
        if path == "/more":
            body = data + b"x" * 4096              # more than it announces
        if path != "/nolength":
            h.send_header("Content-Length", str(len(data) - start))
        else:
            h.send_header("Connection", "close")
        h.end_headers()
        half = len(body) // 2
        first = path not in self.cut_done
        if path in ("/cut", "/norange-cut") and first:
            self.cut_done.add(path)
            h.wfile.write(body[:half])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        if path == "/stall-always" or (path == "/stall-once" and first):
            self.cut_done.add(path)
            h.wfile.write(body[:half])
            h.wfile.flush()
            time.sleep(2)
            h.close_connection = True
            return
        h.wfile.write(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def image(tmp_path) -> str:
    return make_ext4_image(str(tmp_path / "img"), 8 * MIB, data=os.urandom(2 * MIB))


@pytest.fixture
def served(image):
    with open(image, "rb") as f:
        server = Server(f.read())
    yield server
    server.close()


@pytest.fixture
def master(tmp_path):
    server, target = start_master(str(tmp_path / "master"), image_fetch_stall_seconds=0.5)
    yield target, str(tmp_path / "master" / "images")
    server.stop()


def _nothing_left(images_dir: str) -> bool:
    return sorted(os.listdir(images_dir)) == ["tmp"] and os.listdir(os.path.join(images_dir, "tmp")) == []


@pytest.mark.parametrize("path", ["/good", "/cut", "/norange-cut", "/stall-once"])
def test_a_fetch_gets_the_image_resuming_where_it_was_cut(master, served, image, path):
    target, _ = master
    client = master_client(target)
    digest = sha256_file(image)
    fetched = client.fetch_image(served.base + path, digest=digest, name="fetched")
    assert fetched.digest == digest and fetched.names == ("fetched",)
    out = bytearray()

    class Sink:
        def write(self, b):
            out.extend(b)
    client.pull_image("fetched", Sink())
    assert hashlib.sha256(out).hexdigest() == digest.split(":")[1]
    ranges = [r for p, r in served.requests if p == path]
    if path in ("/cut", "/stall-once"):
        # The second request asked for the rest only.
        assert len(ranges) == 2 and ranges[0] == "" and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    elif path == "/norange-cut":
        assert len(ranges) == 2          # asked for the rest, got the whole again and skipped what it had
    else:
        assert ranges == [""]


@pytest.mark.parametrize("path, digest, error, message", [
    ("/good", "sha256:" + "0" * 64, DataLoss, "content has digest"),
    ("/missing", "", NotFound, "404 Not Found"),
    ("/nolength", "", InvalidSpec, "does not announce its size"),
    ("/stall-always", "", Unavailable, "stalled"),
])
def test_a_bad_fetch_is_a_clear_error_and_leaves_nothing(master, served, path, digest, error, message):
    target, images_dir = master
    client = master_client(target)
    with pytest.raises(error, match=message):
        client.fetch_image(served.base + path, digest=digest, name="bad")
    assert client.list_images() == [] and _nothing_left(images_dir)


def test_bytes_past_the_announced_size_are_never_taken(master, served, image):
    target, _ = master
    client = master_client(target)
    fetched = client.fetch_image(served.base + "/more")
    assert fetched.digest == sha256_file(image) and fetched.size == os.path.getsize(image)


def test_a_tenant_may_not_fetch_from_a_private_address(master, served):
    target, images_dir = master
    tenant = master_client(target, "tenant", "acme")
    with pytest.raises(PermissionDenied, match="must be on a public address"):
        tenant.fetch_image(served.base + "/good")
    with pytest.raises(InvalidSpec, match="must be http"):
        tenant.fetch_image("file:///etc/passwd")
    assert _nothing_left(images_dir)


def test_a_layer_is_fetched_over_its_base(master, image, tmp_path):
    target, _ = master
    client = master_client(target)
    base = client.push_image(image, name="base")
    data = bytearray(open(image, "rb").read())
    data[5 * MIB:5 * MIB + 8192] = os.urandom(8192)
    app = str(tmp_path / "app.img")
    with open(app, "wb") as f:
        f.write(data)
    runs = list(layers.differing_runs(app, client.image_block_hashes("base")))
    header = layers.Header(layers.BLOCK_SIZE, len(data), base.digest, sha256_file(app))
    server = Server(b"".join(layers.build(app, header, runs)))
    try:
        fetched = client.fetch_image(server.base + "/cut", name="app", base="base")
    finally:
        server.close()
    assert fetched.digest == header.digest and fetched.parent == base.digest
    assert fetched.layer_size < 3 * layers.BLOCK_SIZE
