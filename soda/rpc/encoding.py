"""Content encodings of image transfers: how a push's or a pull's chunks
carry the bytes of an image or a layer.

"" is the chunks themselves; "zstd" is one zstd stream cut into chunks
(the `zstandard` package). Each side names what it can decode and the
sender picks (ImageTransfer, PullImageRequest.encodings), so an old peer
that names nothing gets raw chunks and still works.

Decoding trusts nothing it is sent: output comes in pieces of at most
CHUNK_SIZE however small the compressed input (a few bytes of zstd can
stand for gigabytes of zeros), the decoder's window is bounded, and
anything that is not one well-formed stream is DataLoss. A stream cut
short decodes to fewer bytes than announced, which the receiver's size
and digest checks refuse.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import zstandard

from soda.errors import DataLoss, InvalidSpec
from soda.files import ChunkReader

RAW = ""
ZSTD = "zstd"
# What this side decodes, in order of preference.
ENCODINGS = (ZSTD,)
CHUNK_SIZE = 1 << 20
LEVEL = 3                   # zstd's default: about 400 MB/s per core, most of the gain
MAX_WINDOW = 1 << 23        # a peer may not make the decoder hold more than 8 MiB of window


def choose(offered: Iterable[str]) -> str:
    """The encoding to send in, given what the receiver can decode."""
    offered = set(offered)
    return next((e for e in ENCODINGS if e in offered), RAW)


def check(encoding: str) -> None:
    if encoding not in (RAW, *ENCODINGS):
        raise InvalidSpec(f"unknown content encoding {encoding!r}: this side decodes "
                          f"{', '.join(ENCODINGS)} or raw chunks")


def encode(chunks: Iterable[bytes], encoding: str, threads: int = 0) -> Iterator[bytes]:
    """`chunks` as `encoding` says, in pieces of about CHUNK_SIZE;
    `threads`: zstd's worker threads (0: this one; -1: one per CPU), for a
    client with cores to spare (a Master serving many pulls keeps to one)."""
    check(encoding)
    if encoding == RAW:
        yield from chunks
        return
    compressor = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True, threads=threads).compressobj()
    pending: list[bytes] = []
    held = 0
    for chunk in chunks:
        out = compressor.compress(chunk)
        if out:
            pending.append(out)
            held += len(out)
            if held >= CHUNK_SIZE:
                yield from _cut(b"".join(pending))
                pending, held = [], 0
    pending.append(compressor.flush())
    yield from _cut(b"".join(pending))


def _cut(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), CHUNK_SIZE):
        yield data[start:start + CHUNK_SIZE]


def decode(chunks: Iterable[bytes], encoding: str) -> Iterator[bytes]:
    """The bytes `chunks` stand for, in pieces of at most CHUNK_SIZE."""
    check(encoding)
    if encoding == RAW:
        yield from chunks
        return
    source = ChunkReader(chunks)
    reader = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).stream_reader(
        source, read_size=CHUNK_SIZE, read_across_frames=True)
    try:
        while piece := reader.read(CHUNK_SIZE):
            yield piece
    except zstandard.ZstdError as exc:
        raise DataLoss(f"the {encoding} stream is corrupt after {source.consumed} bytes: {exc}") from None
