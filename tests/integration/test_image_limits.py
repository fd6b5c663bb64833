"""Image push limits on a real, small filesystem: a 32 MiB tmpfs mounted as
the Master's image directory. Too large a push is refused before it is all
sent; a disk another writer fills during a push stops it with the kernel's
ENOSPC turned into NoCapacity. Either way no file is left, as `os.listdir`
and the filesystem's own free space (statvfs) show."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from soda.errors import NoCapacity
from soda.rpc.client import CHUNK_SIZE
from tests.integration.conftest import run
from tests.support import make_ext4_image, master_client, start_master

pytestmark = pytest.mark.root

MIB = 1 << 20
DISK = 32 * MIB


def free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.fixture
def small_disk():
    """(server, target, images dir) of a Master whose image directory is a
    32 MiB tmpfs and which keeps 1 MiB of it free; unmounted and removed
    after the test, whatever happened."""
    root = tempfile.mkdtemp(prefix="soda-images-")
    images = os.path.join(root, "master", "images")
    os.makedirs(images)
    server = None
    try:
        run(["mount", "-t", "tmpfs", "-o", f"size={DISK // MIB}m,mode=0700", "soda-test", images])
        server, target = start_master(os.path.join(root, "master"), image_reserve_bytes=MIB)
        yield server, target, images
    finally:
        if server is not None:
            server.stop(grace=0)
        if os.path.ismount(images):
            run(["umount", images], check=False)
        if os.path.ismount(images):
            run(["umount", "-l", images], check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_a_push_larger_than_the_disk_is_refused_early_and_leaves_nothing(small_disk, tmp_path):
    server, target, images = small_disk
    big = make_ext4_image(str(tmp_path / "big.img"), size=48 * MIB)
    sent = [0]
    with master_client(target) as client:
        with pytest.raises(NoCapacity, match="no room for an image of 50331648 bytes"):
            client.push_image(big, progress=lambda done, size, wire: sent.__setitem__(0, wire + CHUNK_SIZE),
                              compress=False)
        assert sent[0] < 16 * MIB
        assert os.listdir(images) == ["tmp"] and os.listdir(os.path.join(images, "tmp")) == []
        assert free(images) == DISK
        small = make_ext4_image(str(tmp_path / "small.img"), size=16 * MIB)
        assert client.push_image(small).size == 16 * MIB
        assert free(images) == DISK - 16 * MIB


def test_a_disk_filled_by_another_writer_during_a_push_is_no_capacity_and_leaves_nothing(small_disk, tmp_path):
    server, target, images = small_disk
    image = make_ext4_image(str(tmp_path / "img"), size=24 * MIB)
    filler = os.path.join(images, "filler")

    def fill(done, size, wire):
        # 4 MiB in, another writer takes 20 MiB: the push's 24 no longer fit.
        if done >= 4 * MIB and not os.path.exists(filler):
            with open(filler, "wb") as f:
                f.write(b"\1" * (20 * MIB))

    with master_client(target) as client:
        with pytest.raises(NoCapacity, match="filled up while receiving the image of 25165824 bytes"):
            client.push_image(image, progress=fill, compress=False)   # raw: progress as sent
        assert sorted(os.listdir(images)) == ["filler", "tmp"] and os.listdir(os.path.join(images, "tmp")) == []
        assert client.list_images() == []
        os.unlink(filler)
        assert free(images) == DISK
        assert client.push_image(image).size == 24 * MIB


# ---- a node's image cache on a full disk ------------------------------------------

def test_a_node_disk_that_fills_during_a_pull_is_a_clear_error_and_keeps_what_was_cached(tmp_path):
    """An Agent's image cache on a 12 MiB tmpfs: a 4 MiB image is pulled and
    kept; a 16 MiB one cannot fit, and its pull fails naming the full disk,
    leaving no partial file and the first image as it was."""
    import hashlib

    from soda.agent.images import ImageCache
    from soda.errors import SodaError
    from soda.model import Image

    images = {name: os.urandom(size) for name, size in (("small", 4 * MIB), ("big", 16 * MIB))}
    digests = {name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in images.items()}

    class Master:
        def pull_image(self, digest, out, layer=False):
            [name] = [n for n, d in digests.items() if d == digest]
            for start in range(0, len(images[name]), MIB):
                out.write(images[name][start:start + MIB])
            return Image(digest=digest, size=len(images[name]))

    cache_dir = str(tmp_path / "cache")
    os.makedirs(cache_dir)
    run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=0700", "soda-test-cache", cache_dir])
    try:
        cache = ImageCache(cache_dir, Master())
        small = cache.ensure(digests["small"])
        with pytest.raises(SodaError, match="cannot write image .* to the image cache .*No space left"):
            cache.ensure(digests["big"])
        assert os.listdir(cache_dir) == [os.path.basename(small)]
        with open(small, "rb") as f:
            assert f.read() == images["small"]
    finally:
        run(["umount", cache_dir], check=False)
