"""The virtual node's disk: the Agent's image cache lays the image on a
root disk of exactly that size (an ext4 image grown with resize2fs, any
other content padded), and the Master refuses a disk smaller than the image
at admission, leaving nothing behind."""

import os
import shutil
import subprocess

import pytest

from soda import model
from soda.agent.images import ImageCache
from soda.errors import InvalidSpec
from tests.fakes import FakeClock
from tests.unit.test_controller import CAP, make_controller

MiB = 1 << 20
DIGEST = "sha256:" + "c" * 64
MKFS = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")


def cached(tmp_path, content_path):
    """An image cache holding `content_path` as image DIGEST (no Master)."""
    cache = ImageCache(str(tmp_path / "images"), client=None)
    shutil.copy(content_path, cache.path(DIGEST))
    os.chmod(cache.path(DIGEST), 0o444)
    return cache


def ext4(tmp_path, mib=16):
    path = str(tmp_path / "rootfs.img")
    subprocess.run([MKFS, "-q", "-F", "-O", "^has_journal", path, f"{mib}M"], check=True,
                   capture_output=True)
    return path


def fs_bytes(path):
    out = subprocess.run([shutil.which("dumpe2fs") or "/sbin/dumpe2fs", "-h", path],
                         capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["Block count"]) * int(fields["Block size"])


@pytest.mark.skipif(MKFS is None, reason="needs e2fsprogs")
def test_an_ext4_image_is_grown_to_the_disk_size_once_and_read_only(tmp_path):
    cache = cached(tmp_path, ext4(tmp_path))
    path = cache.ensure(DIGEST, 64)
    assert path == cache.path(DIGEST) + ".disk-64M"
    assert os.stat(path).st_size == 64 * MiB and fs_bytes(path) == 64 * MiB
    assert os.stat(path).st_mode & 0o222 == 0
    assert os.stat(path).st_blocks * 512 < 16 * MiB          # sparse: costs what the image does
    mtime = os.stat(path).st_mtime_ns                        # a UML COW header records it
    assert cache.ensure(DIGEST, 64) == path and os.stat(path).st_mtime_ns == mtime
    assert fs_bytes(cache.path(DIGEST)) == 16 * MiB          # the image itself is untouched
    assert cache.ensure(DIGEST, 16) == cache.path(DIGEST)    # a disk of the image's size is the image
    assert cache.ensure(DIGEST) == cache.path(DIGEST)
    assert not [e for e in os.listdir(tmp_path / "images") if e.startswith(".")]


def test_a_disk_smaller_than_the_image_is_refused_and_nothing_is_made(tmp_path):
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"x" * (3 * MiB + 1))
    cache = cached(tmp_path, str(raw))
    with pytest.raises(InvalidSpec, match=r"disk 3 MiB cannot hold image .* give at least 4 MiB"):
        cache.ensure(DIGEST, 3)
    assert os.listdir(tmp_path / "images") == [os.path.basename(cache.path(DIGEST))]


def test_other_content_gets_a_bigger_device_only(tmp_path):
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"not a filesystem" * 1024)
    cache = cached(tmp_path, str(raw))
    path = cache.ensure(DIGEST, 8)
    assert os.stat(path).st_size == 8 * MiB
    with open(path, "rb") as f:
        assert f.read(len(raw.read_bytes())) == raw.read_bytes()


def test_a_failed_grow_leaves_nothing(tmp_path):
    # Passes the ext4 magic check but is no filesystem: e2fsck fails.
    from tests.support import make_ext4_image
    cache = cached(tmp_path, make_ext4_image(str(tmp_path / "fake.img")))
    with pytest.raises(Exception, match="e2fsck"):
        cache.ensure(DIGEST, 16)
    assert os.listdir(tmp_path / "images") == [os.path.basename(cache.path(DIGEST))]


def test_master_refuses_a_disk_smaller_than_the_image(tmp_path):
    from soda.rpc.client import sha256_file
    from tests.support import make_ext4_image
    ctl = make_controller(str(tmp_path / "m"), FakeClock())
    path = make_ext4_image(str(tmp_path / "img"), size=20 * MiB)
    with open(path, "rb") as f:
        ctl.push_image("big", 20 * MiB, sha256_file(path), "", iter(lambda: f.read(MiB), b""))
    ctl.register_node("a", "127.0.0.1", CAP, ["fake"])
    with pytest.raises(InvalidSpec, match=r"disk 19 MiB cannot hold image .* at least 20 MiB"):
        ctl.create_service(model.parse_spec({"name": "web", "image": "big", "resources": {"disk": 19}}))
    assert ctl.store.list_services() == []
    ctl.create_service(model.parse_spec({"name": "web", "image": "big", "resources": {"disk": 20}}))
    with pytest.raises(InvalidSpec, match="disk 19 MiB cannot hold image"):
        ctl.resize_service("web", None, [model.Resources(cpu=1, memory=64, bandwidth=100, disk=19)])
    assert ctl.store.get_service("web").vnodes[0].resources.disk == 20
