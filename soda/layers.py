"""Image layers: an image kept as the blocks in which it differs from the
image it was made from (its parent), as Dynasoar ships a service as a
shared base plus a small difference.

Owns the layer format, block hashes, building a layer, and composing one
with its parent, as a stream (the Master: to verify a pushed layer and to
serve the whole image) or in place in a copy of the parent (the Agent).

A layer (version 1) is a header, then records in increasing block order,
then an end record; all integers little-endian:

    header  "SODALYR1", block size u32, image size u64,
            parent sha256 (32 bytes), image sha256 (32 bytes)
    record  kind u8, first block u64, block count u32
            DATA: followed by the blocks' bytes (the image's last block
                  may be short: the bytes up to the image's size)
            ZERO: the blocks are zeros (they were not in the parent)
    end     kind 0, 0, 0

Blocks are BLOCK_SIZE bytes at fixed offsets, the block size of ext4
images, so a file changed inside a filesystem changes whole blocks. A
block the same as the parent's at that offset is not in the layer, nor is
a zero block where the parent has a hole or ends: composing copies the
parent, cut or extended (with zeros) to the image's size, and lays the
records over it. Whether a block is the same is decided by its hash
(block_hash: 128-bit BLAKE2b), so a pusher needs only the parent's hashes,
not its bytes; the composed image's sha256, in the header, is checked
after composing, so a colliding hash yields a refused image, never a
wrong one.

Nothing here trusts a layer: every record must lie inside the image, in
increasing order, and the file must end at its end record; a layer that
does not is InvalidLayer (an InvalidSpec). It knows nothing of gRPC.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

from soda.errors import DataLoss, InvalidSpec
from soda.files import CHUNK_SIZE, ChunkReader, data_extents

MAGIC = b"SODALYR1"
BLOCK_SIZE = 4096
HASH_BYTES = 16
MAX_RUN = 256                    # blocks in one record: 1 MiB, what a reader holds at once
ZERO_BLOCK = bytes(BLOCK_SIZE)

_HEADER = struct.Struct("<8sIQ32s32s")
_RECORD = struct.Struct("<BQI")
END, DATA, ZERO = 0, 1, 2


class InvalidLayer(InvalidSpec):
    """A layer that is not well formed, or not for the parent it is laid on."""


def block_hash(block: bytes | memoryview) -> bytes:
    return hashlib.blake2b(block, digest_size=HASH_BYTES).digest()


ZERO_HASH = block_hash(ZERO_BLOCK)


@dataclass(frozen=True)
class Header:
    block_size: int
    size: int                    # of the composed image
    parent: str                  # sha256:<hex>
    digest: str                  # of the composed image, sha256:<hex>

    def pack(self) -> bytes:
        return _HEADER.pack(MAGIC, self.block_size, self.size, _raw(self.parent), _raw(self.digest))


def _raw(digest: str) -> bytes:
    return bytes.fromhex(digest.removeprefix("sha256:"))


def blocks(chunks: Iterable[bytes]) -> Iterator[memoryview]:
    """The BLOCK_SIZE blocks of a stream (the last may be short)."""
    carry = b""
    for chunk in chunks:
        data = memoryview(carry + chunk if carry else chunk)
        whole = len(data) - len(data) % BLOCK_SIZE
        for start in range(0, whole, BLOCK_SIZE):
            yield data[start:start + BLOCK_SIZE]
        carry = bytes(data[whole:])
    if carry:
        yield memoryview(carry)


def block_hashes(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """HASH_BYTES per block of the stream, in pieces of up to 64 Ki hashes."""
    out = []
    for block in blocks(chunks):
        out.append(_hash(block, block == ZERO_BLOCK))
        if len(out) == 65536:
            yield b"".join(out)
            out = []
    if out:
        yield b"".join(out)


def _hash(block: memoryview, zero: bool) -> bytes:
    # Zero blocks are most of a sparse image: their hash is known.
    return ZERO_HASH if zero and len(block) == BLOCK_SIZE else block_hash(block)


def _zero(block: memoryview) -> bool:
    return block == ZERO_BLOCK[:len(block)]


def differing_runs(path: str, parent_hashes: bytes) -> Iterator[tuple[int, int, int]]:
    """(kind, first block, count) of the blocks of the file at `path` that
    differ from the parent whose hashes are given, runs of at most MAX_RUN.
    The file's holes are zeros, known without reading them (a guest's disk
    is mostly holes)."""
    if len(parent_hashes) % HASH_BYTES:
        raise InvalidLayer(f"parent block hashes of {len(parent_hashes)} bytes are not whole "
                           f"{HASH_BYTES}-byte hashes")
    parent_blocks = len(parent_hashes) // HASH_BYTES

    def theirs(index: int) -> bytes:
        return parent_hashes[index * HASH_BYTES:(index + 1) * HASH_BYTES]

    def kinds() -> Iterator[tuple[int, int]]:
        with open(path, "rb") as f:
            for first, end, data in _block_ranges(f.fileno(), os.fstat(f.fileno()).st_size):
                if not data:
                    # Zeros: the same as the parent where its block is zero
                    # or where it has ended (composing extends it with zeros).
                    for index in range(first, min(end, parent_blocks)):
                        if theirs(index) != ZERO_HASH:
                            yield index, ZERO
                    continue
                f.seek(first * BLOCK_SIZE)
                for index, block in enumerate(blocks(_read(f, (end - first) * BLOCK_SIZE)), first):
                    zero = _zero(block)
                    if index < parent_blocks:
                        same = _hash(block, zero) == theirs(index) or (zero and theirs(index) == ZERO_HASH)
                    else:
                        same = zero
                    if not same:
                        yield index, ZERO if zero else DATA

    run_kind, run_first, run_count = END, 0, 0
    for index, kind in kinds():
        if kind == run_kind and run_first + run_count == index and run_count < MAX_RUN:
            run_count += 1
            continue
        if run_kind != END:
            yield run_kind, run_first, run_count
        run_kind, run_first, run_count = kind, index, 1
    if run_kind != END:
        yield run_kind, run_first, run_count


def _block_ranges(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """(first block, end block, holds data) covering the file's blocks in
    order: the data extents (soda.files.data_extents) widened to whole
    blocks, and the holes between. The last block, when short, is read."""
    count = -(-size // BLOCK_SIZE)
    ranges: list[list[int]] = []
    extents = [(start // BLOCK_SIZE, -(-stop // BLOCK_SIZE)) for start, stop in data_extents(fd, size)]
    if size % BLOCK_SIZE:
        extents.append((count - 1, count))
    for first, end in extents:
        if ranges and first <= ranges[-1][1]:
            ranges[-1][1] = max(ranges[-1][1], end)
        else:
            ranges.append([first, end])
    at = 0
    for first, end in ranges:
        if first > at:
            yield at, first, False
        yield first, end, True
        at = end
    if at < count:
        yield at, count, False


def _read(f, length: int) -> Iterator[bytes]:
    while length > 0:
        chunk = f.read(min(length, CHUNK_SIZE))
        if not chunk:
            return
        length -= len(chunk)
        yield chunk


def build(path: str, header: Header, runs: Iterable[tuple[int, int, int]]) -> Iterator[bytes]:
    """The layer of the file at `path` over its parent: `runs` are what
    differing_runs found (a list, to build the same layer twice)."""
    yield header.pack()
    with open(path, "rb") as f:
        for kind, first, count in runs:
            yield _RECORD.pack(kind, first, count)
            if kind == DATA:
                f.seek(first * BLOCK_SIZE)
                yield f.read(_data_length(header, first, count))
    yield _RECORD.pack(END, 0, 0)


def _data_length(header: Header, first: int, count: int) -> int:
    return min(count * header.block_size, header.size - first * header.block_size)


def _exact(reader: ChunkReader, n: int, what: str) -> bytes:
    data = reader.read(n)
    if len(data) != n:
        raise InvalidLayer(f"layer ends inside {what}")
    return data


def read_header(stream: Iterable[bytes]) -> tuple[Header, ChunkReader]:
    reader = ChunkReader(stream)
    magic, block_size, size, parent, digest = _HEADER.unpack(_exact(reader, _HEADER.size, "its header"))
    if magic != MAGIC:
        raise InvalidLayer("not a SODA layer (no SODALYR1 header); a layer is made by "
                           "sodactl image push --base")
    if block_size != BLOCK_SIZE:
        raise InvalidLayer(f"layer block size {block_size} is not {BLOCK_SIZE}")
    if size <= 0:
        raise InvalidLayer("layer's image size is 0")
    return Header(block_size, size, "sha256:" + parent.hex(), "sha256:" + digest.hex()), reader


def records(header: Header, reader: ChunkReader) -> Iterator[tuple[int, int, bytes | None]]:
    """(byte offset, length, data or None for zeros) of each record, checked;
    then the layer must end."""
    blocks_in_image = -(-header.size // header.block_size)
    next_free = 0
    while True:
        kind, first, count = _RECORD.unpack(_exact(reader, _RECORD.size, "a record"))
        if kind == END:
            if first or count or reader.read(1):
                raise InvalidLayer("layer has bytes after its end record")
            return
        if kind not in (DATA, ZERO) or not 0 < count <= MAX_RUN:
            raise InvalidLayer(f"layer record of kind {kind} with {count} blocks is not valid")
        if first < next_free or first + count > blocks_in_image:
            raise InvalidLayer(f"layer record for blocks {first}..{first + count - 1} is out of order "
                               f"or outside the image of {blocks_in_image} blocks")
        next_free = first + count
        length = _data_length(header, first, count)
        data = _exact(reader, length, f"the data of blocks {first}..{first + count - 1}") \
            if kind == DATA else None
        yield first * header.block_size, length, data


def open_layer(layer: Iterable[bytes], parent_digest: str) -> tuple[Header, ChunkReader]:
    """A layer's header, checked to be over `parent_digest`, and a reader
    positioned at its first record, for compose or apply."""
    header, reader = read_header(layer)
    if header.parent != parent_digest:
        raise InvalidLayer(f"the layer is over image {header.parent[:19]}, not {parent_digest[:19]}")
    return header, reader


def compose(parent: Iterable[bytes], header: Header, reader: ChunkReader) -> Iterator[bytes]:
    """The composed image's bytes: the parent's stream with the layer laid
    over it, checked against the header's sha256 (DataLoss when it differs,
    after the last byte)."""
    base = ChunkReader(parent)
    h = hashlib.sha256()
    position = 0

    def from_parent(upto: int) -> Iterator[bytes]:
        nonlocal position
        while position < upto:
            n = min(CHUNK_SIZE, upto - position)
            data = base.read(n)
            data += bytes(n - len(data))           # the parent ended: zeros
            position += n
            h.update(data)
            yield data

    for offset, length, data in records(header, reader):
        yield from from_parent(offset)
        base.read(length)                          # the parent's bytes it replaces
        data = data if data is not None else bytes(length)
        position += length
        h.update(data)
        yield data
    yield from from_parent(header.size)
    check_digest("sha256:" + h.hexdigest(), header)


def check_digest(got: str, header: Header) -> None:
    if got != header.digest:
        raise DataLoss(f"the layer composed with its parent gives an image with digest {got}, "
                       f"not the {header.digest} it names")


def apply(path: str, header: Header, reader: ChunkReader) -> None:
    """Lay an opened layer over the file at `path`, a copy of its parent:
    cut or extend it to the image's size and write the records (zeros as
    holes). The caller checks the result against check_digest."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, header.size)
        for offset, length, data in records(header, reader):
            if data is None:
                _zero_range(fd, offset, length)
            else:
                os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


@functools.lru_cache(maxsize=1)
def _fallocate():
    try:
        return ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None


def _zero_range(fd: int, offset: int, length: int) -> None:
    fallocate = _fallocate()
    if fallocate is not None and fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                                           ctypes.c_long(offset), ctypes.c_long(length)) == 0:
        return
    os.pwrite(fd, bytes(length), offset)       # a filesystem without holes
