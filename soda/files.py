"""Files SODA keeps: written whole or not at all, removed whatever they are.

Records (guests, the local cluster's state) are replaced atomically, so a
reader or a restarted process sees the old file or the new one, never half
of one; `remove_path` takes away a file, a link or a whole tree alike.
Also the reading of big files and streams of chunks: a file in chunks, its
sha256, and exact reads over an iterator of chunks (image transfers).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Iterator

CHUNK_SIZE = 1 << 20


def file_chunks(path: str, start: int = 0) -> Iterator[bytes]:
    """The file's bytes from `start`, in CHUNK_SIZE pieces."""
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(CHUNK_SIZE):
            yield chunk


_ZEROS = bytes(CHUNK_SIZE)


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The byte ranges [start, end) of an open file of `size` bytes that hold
    data, as SEEK_DATA/SEEK_HOLE find them: the rest are holes, zeros
    without blocks (a filesystem that cannot tell has one range, all of it)."""
    out: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:        # ENXIO: no data after offset
                raise
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if start >= stop:
            break
        out.append((start, stop))
        offset = stop
    return out


def sparse_chunks(path: str) -> Iterator[bytes]:
    """The file's bytes in pieces of at most CHUNK_SIZE, its holes as zeros
    that are not read (a guest's disk of 256 MiB may hold 20 MiB of data)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        at = 0
        for start, stop in [*data_extents(f.fileno(), size), (size, size)]:
            while at < start:
                n = min(start - at, CHUNK_SIZE)
                yield _ZEROS[:n] if n < CHUNK_SIZE else _ZEROS
                at += n
            f.seek(at)
            while at < stop:
                chunk = f.read(min(stop - at, CHUNK_SIZE))
                if not chunk:
                    return
                at += len(chunk)
                yield chunk


def sha256_file(path: str, progress: Callable[[int, int], None] | None = None) -> str:
    """"sha256:<hex>" of the file; `progress(done, total)` as it reads."""
    h = hashlib.sha256()
    total = os.path.getsize(path)
    done = 0
    for chunk in sparse_chunks(path):
        h.update(chunk)
        done += len(chunk)
        if progress:
            progress(done, total)
    return "sha256:" + h.hexdigest()


class ChunkReader:
    """read(n) over an iterator of chunks: `n` bytes, fewer only where the
    stream ends (then `ended`); `consumed` counts what it handed out."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._buffer = b""
        self._at = 0
        self.ended = False
        self.consumed = 0

    def read(self, n: int) -> bytes:
        parts = []
        while n > 0:
            if self._at == len(self._buffer):
                nxt = next(self._chunks, None)
                if nxt is None:
                    self.ended = True
                    break
                self._buffer, self._at = nxt, 0
            take = self._buffer[self._at:self._at + n]
            self._at += len(take)
            n -= len(take)
            parts.append(take)
        out = b"".join(parts)
        self.consumed += len(out)
        return out


def write_json_atomic(path: str, data: Any, indent: int | None = None) -> None:
    """Replace `path` with `data` so that a reader (or a restarted Agent)
    sees either the old file or the new one, never half of it."""
    text = json.dumps(data, sort_keys=True, indent=indent) + ("\n" if indent is not None else "")
    write_file_atomic(path, text.encode())


def write_file_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data`, mode `mode` from its first byte (a key
    is never readable by others, not even half-written), whole or not at
    all."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_path(path: str) -> None:
    """Remove `path`: a directory with all below it (a link to one is only
    unlinked), a file or link; one that is already gone is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
