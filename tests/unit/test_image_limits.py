"""Image push limits: the configured maximum size and the free space of the
Master's image directory, checked before any content is read and again as
it arrives. A refused push stops the client early and leaves no file; the
room it was promised goes back."""

import os
import threading
import time

import pytest

from soda.errors import InvalidSpec, NoCapacity
from soda.master.images import ImageStore
from soda.master.store import open_store
from soda.rpc.client import CHUNK_SIZE
from tests.support import make_ext4_image, master_client, start_master
from tests.unit.test_master_api import _store_is_empty

MIB = 1 << 20
RESERVE = 4 * MIB
# A refused 64 MiB push must stop long before its end: gRPC's flow control
# lets the client run ahead of the server by a few MiB at most.
EARLY = 16 * MIB


class FakeDisk:
    """Free bytes of a filesystem as the test sets them; after `fill_after`
    more measurements, `free` drops to `then` (another writer filled it)."""

    def __init__(self, free: int):
        self.free = free
        self.fill_after: int | None = None
        self.then = 0

    def __call__(self, path: str) -> int:
        if self.fill_after is not None:
            self.fill_after -= 1
            if self.fill_after < 0:
                self.free = self.then
        return self.free


@pytest.fixture
def served(tmp_path):
    """(server, target, client, disk): an in-process Master whose image
    store measures `disk` (a FakeDisk) and measures it again every MiB."""
    server, target = start_master(str(tmp_path / "master"))
    disk = FakeDisk(free=1 << 40)
    server.controller.images = ImageStore(server.images.directory, server.store, reserve_bytes=RESERVE,
                                          free_bytes=disk, recheck_bytes=MIB)
    client = master_client(target)
    yield server, target, client, disk
    client.close()
    server.stop(grace=0)


def push_counting(client, path: str, sent: list[int]) -> None:
    """Push `path` with the real client; `sent[0]`: the bytes its request
    generator had handed to gRPC when the push ended, give or take the
    chunk in flight."""
    def progress(done, size, wire):
        sent[0] = wire + CHUNK_SIZE
    sent[0] = 0
    client.push_image(path, name="big", progress=progress, compress=False)


def test_a_push_larger_than_image_max_bytes_is_refused_early_and_leaves_nothing(tmp_path):
    server, target = start_master(str(tmp_path / "master"), image_max_bytes=8 * MIB)
    try:
        with master_client(target) as client:
            path = make_ext4_image(str(tmp_path / "big.img"), size=64 * MIB)
            sent = [0]
            with pytest.raises(NoCapacity, match=r"larger than the Master accepts \(8388608 bytes, its "
                                                 r"image_max_bytes\)"):
                push_counting(client, path, sent)
            assert sent[0] < EARLY
            assert _store_is_empty((server, target), client)
            small = make_ext4_image(str(tmp_path / "small.img"), size=8 * MIB)
            assert client.push_image(small).size == 8 * MIB
    finally:
        server.stop(grace=0)


def test_a_push_larger_than_the_free_space_is_refused_early_and_leaves_nothing(served, tmp_path):
    server, target, client, disk = served
    path = make_ext4_image(str(tmp_path / "big.img"), size=64 * MIB)
    disk.free = RESERVE + 64 * MIB - 1          # one byte short, counting the reserve
    sent = [0]
    with pytest.raises(NoCapacity, match=f"no room for an image of {64 * MIB} bytes.* has {disk.free} "
                                         f"bytes free.*keeps {RESERVE} \\(image_reserve_bytes\\)"):
        push_counting(client, path, sent)
    assert sent[0] < EARLY
    assert _store_is_empty((server, target), client)
    disk.free += 1
    assert client.push_image(path).size == 64 * MIB


def test_a_disk_filled_during_the_push_stops_it_and_its_room_goes_back(served, tmp_path):
    server, target, client, disk = served
    path = make_ext4_image(str(tmp_path / "big.img"), size=64 * MIB)
    disk.free = RESERVE + 64 * MIB
    disk.fill_after, disk.then = 4, RESERVE      # the admission and 3 re-checks pass, then it is full
    sent = [0]
    with pytest.raises(NoCapacity, match=f"no room left for the image of {64 * MIB} bytes after {4 * MIB} "
                                         "were received"):
        push_counting(client, path, sent)
    assert sent[0] < EARLY
    assert _store_is_empty((server, target), client)
    # Exactly enough room again: refused if the failed push still held its share.
    disk.fill_after, disk.free = None, RESERVE + 64 * MIB
    assert client.push_image(path, name="again").names == ("again",)


@pytest.fixture
def state(tmp_path):
    store = open_store(str(tmp_path / "state"))
    yield store
    store.close()


def test_reservations_never_promise_the_same_free_space_twice(state, tmp_path):
    used = [0]
    images = ImageStore(str(tmp_path / "images"), state, reserve_bytes=RESERVE,
                        free_bytes=lambda path: RESERVE + 10 * MIB - used[0])
    with images.reserve(6 * MIB) as first:
        with pytest.raises(NoCapacity, match=f"pushes in flight hold {6 * MIB}"):
            with images.reserve(5 * MIB):
                pass
        used[0] = 4 * MIB                        # what `first` wrote left the free space...
        images.recheck(first, 4 * MIB)          # ...and its promise shrank by as much
        with images.reserve(4 * MIB):           # 10 - 4 written - 2 still promised
            with pytest.raises(NoCapacity):
                with images.reserve(1):
                    pass
    used[0] = 6 * MIB
    with images.reserve(4 * MIB):                # every promise returned
        pass


def test_concurrent_reservations_cannot_both_pass_on_the_same_space(state, tmp_path):
    def slow_free(path):
        time.sleep(0.1)                          # both would measure before either records, unlocked
        return RESERVE + 10 * MIB

    images = ImageStore(str(tmp_path / "images"), state, reserve_bytes=RESERVE, free_bytes=slow_free)
    together, release = threading.Barrier(2), threading.Event()
    outcomes = []

    def push():
        together.wait(5)
        try:
            with images.reserve(6 * MIB):
                outcomes.append("promised")
                release.wait(5)
        except NoCapacity:
            outcomes.append("refused")
    threads = [threading.Thread(target=push) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(outcomes) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    release.set()
    for t in threads:
        t.join(5)
    assert sorted(outcomes) == ["promised", "refused"]


def test_the_announced_size_is_checked_before_anything_is_written(state, tmp_path):
    images = ImageStore(str(tmp_path / "images"), state, max_bytes=MIB, free_bytes=lambda path: 1 << 40)
    digest = "sha256:" + "0" * 64
    with pytest.raises(InvalidSpec, match="out of range"):
        images.receive("x", 0, digest, "", iter(()))
    with pytest.raises(NoCapacity, match="image_max_bytes"):
        images.receive("x", MIB + 1, digest, "", iter(()))
    assert os.listdir(os.path.join(images.directory, "tmp")) == []
