"""soda.layers: a layer built from a file and its parent's block hashes
composes (as a stream and in place) back to exactly that file's bytes, holds
only the blocks that differ, and a damaged layer is refused."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from soda import layers
from soda.errors import DataLoss

BS = layers.BLOCK_SIZE


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _write(tmp_path, name: str, data: bytes) -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _layer(tmp_path, parent: bytes, child: bytes) -> tuple[bytes, list]:
    path = _write(tmp_path, "child.img", child)
    hashes = b"".join(layers.block_hashes([parent]))
    runs = list(layers.differing_runs(path, hashes))
    header = layers.Header(BS, len(child), _digest(parent), _digest(child))
    return b"".join(layers.build(path, header, runs)), runs


def _composed(parent: bytes, layer: bytes) -> bytes:
    header, reader = layers.open_layer([layer], _digest(parent))
    # The parent arrives in odd-sized pieces, as a stream does.
    pieces = [parent[i:i + 7777] for i in range(0, len(parent), 7777)]
    return b"".join(layers.compose(pieces, header, reader))


def _applied(tmp_path, parent: bytes, layer: bytes) -> bytes:
    path = _write(tmp_path, "parent.img", parent)
    out = str(tmp_path / "applied.img")
    shutil.copyfile(path, out)
    header, reader = layers.open_layer([layer[:100], layer[100:]], _digest(parent))
    layers.apply(out, header, reader)
    with open(out, "rb") as f:
        return f.read()


@pytest.fixture
def parent() -> bytes:
    data = bytearray(os.urandom(64 * BS))
    data[10 * BS:20 * BS] = bytes(10 * BS)          # a hole in the parent
    return bytes(data)


def test_a_few_changed_blocks_make_a_small_layer_that_composes_back(tmp_path, parent):
    child = bytearray(parent)
    child[3 * BS + 5] ^= 0xFF                         # one byte in block 3
    child[30 * BS:32 * BS] = os.urandom(2 * BS)      # blocks 30, 31
    child[40 * BS:41 * BS] = bytes(BS)               # block 40 now zeros
    child = bytes(child)
    layer, runs = _layer(tmp_path, parent, child)
    assert runs == [(layers.DATA, 3, 1), (layers.DATA, 30, 2), (layers.ZERO, 40, 1)]
    assert len(layer) < 4 * BS
    assert _composed(parent, layer) == child
    assert _applied(tmp_path, parent, layer) == child


@pytest.mark.parametrize("size", [80 * BS, 80 * BS + 100, 50 * BS, 50 * BS + 1])
def test_a_child_longer_or_shorter_than_its_parent(tmp_path, parent, size):
    child = bytearray(parent[:size].ljust(size, b"\0"))
    if size > len(parent):
        child[70 * BS:70 * BS + 10] = b"x" * 10       # data past the parent's end; the rest zeros
    child[size - 1] = 7                              # and the last (maybe short) block differs
    child = bytes(child)
    layer, runs = _layer(tmp_path, parent, child)
    assert all(first * BS < size for _, first, _ in runs)
    assert _composed(parent, layer) == child
    assert _applied(tmp_path, parent, layer) == child


def test_zero_blocks_over_a_hole_or_past_the_parent_are_not_sent(tmp_path, parent):
    child = parent + bytes(100 * BS)
    layer, runs = _layer(tmp_path, parent, child)
    assert runs == []
    assert _composed(parent, layer) == child


def test_long_runs_are_cut_into_records_a_reader_can_hold(tmp_path):
    parent = bytes(600 * BS)
    child = os.urandom(600 * BS)
    layer, runs = _layer(tmp_path, parent, child)
    assert [count for _, _, count in runs] == [layers.MAX_RUN, layers.MAX_RUN, 600 - 2 * layers.MAX_RUN]
    assert _composed(parent, layer) == child


def test_the_wrong_parent_is_refused(tmp_path, parent):
    layer, _ = _layer(tmp_path, parent, parent[::-1])
    with pytest.raises(layers.InvalidLayer, match="over image"):
        layers.open_layer([layer], _digest(b"another"))


def test_a_layer_over_a_changed_parent_fails_its_digest(tmp_path, parent):
    child = parent[:-BS] + os.urandom(BS)
    layer, _ = _layer(tmp_path, parent, child)
    header, reader = layers.open_layer([layer], _digest(parent))
    other = bytes([parent[0] ^ 1]) + parent[1:]     # same digest claimed, other bytes
    with pytest.raises(DataLoss, match="composed with its parent"):
        b"".join(layers.compose([other], header, reader))


@pytest.mark.parametrize("damage", ["truncated", "trailing", "out_of_order", "outside", "magic", "kind"])
def test_a_malformed_layer_is_refused(tmp_path, parent, damage):
    child = bytearray(parent)
    child[5 * BS] ^= 1
    child[9 * BS] ^= 1
    layer, _ = _layer(tmp_path, parent, bytes(child))
    head = layers._HEADER.size
    record = layers._RECORD
    if damage == "truncated":
        layer = layer[:-20]
    elif damage == "trailing":
        layer += b"x"
    elif damage == "out_of_order":
        # Swap the block numbers of the two records.
        second = head + record.size + BS
        layer = (layer[:head] + record.pack(layers.DATA, 9, 1) + layer[head + record.size:second]
                 + record.pack(layers.DATA, 5, 1) + layer[second + record.size:])
    elif damage == "outside":
        layer = layer[:head] + record.pack(layers.DATA, 64, 1) + layer[head + record.size:]
    elif damage == "magic":
        layer = b"NOTLAYER" + layer[8:]
    elif damage == "kind":
        layer = layer[:head] + record.pack(9, 5, 1) + layer[head + record.size:]
    with pytest.raises(layers.InvalidLayer):
        header, reader = layers.open_layer([layer], _digest(parent))
        b"".join(layers.compose([parent], header, reader))


def _dense_runs(path: str, parent_hashes: bytes) -> list[tuple[int, int, int]]:
    """What differing_runs must find, read the plain way: every block of
    the file, holes included, hashed and compared."""
    known = len(parent_hashes) // layers.HASH_BYTES
    out: list[list[int]] = []
    with open(path, "rb") as f:
        data = f.read()
    for index in range(-(-len(data) // layers.BLOCK_SIZE)):
        block = data[index * layers.BLOCK_SIZE:(index + 1) * layers.BLOCK_SIZE]
        zero = block == bytes(len(block))
        theirs = parent_hashes[index * layers.HASH_BYTES:(index + 1) * layers.HASH_BYTES]
        if index < known:
            ours = layers.ZERO_HASH if zero and len(block) == layers.BLOCK_SIZE else layers.block_hash(block)
            same = ours == theirs or (zero and theirs == layers.ZERO_HASH)
        else:
            same = zero
        if same:
            continue
        kind = layers.ZERO if zero else layers.DATA
        if out and out[-1][0] == kind and out[-1][1] + out[-1][2] == index and out[-1][2] < layers.MAX_RUN:
            out[-1][2] += 1
        else:
            out.append([kind, index, 1])
    return [tuple(r) for r in out]


@pytest.mark.parametrize("seed", range(12))
def test_holes_are_zeros_read_or_not(tmp_path, seed):
    # A guest's disk is mostly holes: they are known to be zeros without
    # being read, and what is found is what reading every block finds.
    import random
    rng = random.Random(seed)
    size = rng.choice([100, 5000, 3 * 4096 + 7, 300 * 4096 + 123, 2000 * 4096])
    parent = bytearray(rng.choice([0, size // 2, size, 5 * 4096]))
    for _ in range(4):
        if parent:
            at = rng.randrange(len(parent))
            n = min(rng.randrange(1, 9000), len(parent) - at)
            parent[at:at + n] = rng.randbytes(n)
    hashes = b"".join(layers.block_hashes([bytes(parent)])) if parent else b""
    path = str(tmp_path / "disk")
    with open(path, "wb") as f:
        f.truncate(size)                        # all hole
        for _ in range(rng.randrange(6)):
            at, n = rng.randrange(size), rng.randrange(1, 20000)
            f.seek(at)
            f.write(rng.choice([rng.randbytes(n), bytes(n), bytes(parent[at:at + n]) or b"x"]))
    assert list(layers.differing_runs(path, hashes)) == _dense_runs(path, hashes)
    from soda.files import sha256_file
    with open(path, "rb") as f:
        assert sha256_file(path) == "sha256:" + hashlib.sha256(f.read()).hexdigest()
