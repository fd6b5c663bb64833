"""The Master's image store: content-addressed image files under the state dir.

It owns receiving an upload (streamed to a temporary file while hashing,
never held in memory), checking it (size, sha256, ext4 superblock), and
making it visible atomically: the file is renamed into place and recorded
in the state store only once it is whole. An upload that fails or is cut
off leaves nothing behind; a deleted image's file goes once the deletion
has committed. A crash between file and record leaves a file the store does
not know, which the next start sweeps. It knows nothing of gRPC.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import time
from typing import BinaryIO, Iterable, Iterator

from soda import model
from soda.errors import DataLoss, InvalidSpec, WrongState
from soda.master.store import StateStore, Transaction

READ_CHUNK = 1 << 20
MAX_IMAGE_BYTES = 64 << 30

_SUPERBLOCK = 1024
_EXT_MAGIC = 0xEF53
_INCOMPAT_64BIT = 0x80


def check_ext4(path: str, size: int) -> None:
    """Raise InvalidSpec unless `path` holds an ext2/3/4 filesystem whose
    superblock says it fits in `size` bytes (catches truncated images)."""
    with open(path, "rb") as f:
        f.seek(_SUPERBLOCK)
        sb = f.read(1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != _EXT_MAGIC:
        raise InvalidSpec("not an ext4 filesystem image (no ext2/3/4 superblock); "
                          "an image is a raw ext4 root filesystem, e.g. built with mkfs.ext4 -d")
    blocks_lo = struct.unpack_from("<I", sb, 4)[0]
    log_block = struct.unpack_from("<I", sb, 24)[0]
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    blocks_hi = struct.unpack_from("<I", sb, 0x150)[0] if incompat & _INCOMPAT_64BIT else 0
    if log_block > 6:
        raise InvalidSpec(f"corrupt ext4 superblock (block size 2^{10 + log_block})")
    need = ((blocks_hi << 32) | blocks_lo) * (1024 << log_block)
    if need > size:
        raise InvalidSpec(f"truncated ext4 image: its superblock says {need} bytes, the file has {size}")


class ImageStore:
    def __init__(self, directory: str, store: StateStore, clock=time.time):
        self.directory = directory
        self.store = store
        self.clock = clock
        self._tmp = os.path.join(directory, "tmp")
        os.makedirs(self._tmp, exist_ok=True)
        self.sweep()

    def path(self, digest: str) -> str:
        return os.path.join(self.directory, digest.replace(":", "-"))

    def sweep(self) -> None:
        """Remove half-received uploads and files the store does not know
        (a crash between rename and record)."""
        for name in os.listdir(self._tmp):
            os.unlink(os.path.join(self._tmp, name))
        known = {self.path(i.digest) for i in self.store.list_images()}
        for name in os.listdir(self.directory):
            full = os.path.join(self.directory, name)
            if name.startswith("sha256-") and full not in known:
                os.unlink(full)

    def receive(self, name: str, size: int, digest: str, init: str,
                chunks: Iterable[bytes]) -> model.Image:
        if name:
            model.check_image_name(name)
        if not model.DIGEST_RE.match(digest or ""):
            raise InvalidSpec(f"push must announce the sha256 digest of its content, got {digest!r}")
        if not 0 < size <= MAX_IMAGE_BYTES:
            raise InvalidSpec(f"image size {size} bytes is out of range (1 byte to {MAX_IMAGE_BYTES})")
        init = init or "/sbin/init"
        if not init.startswith("/") or any(c.isspace() for c in init):
            raise InvalidSpec(f"init {init!r} must be an absolute path without spaces")
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="upload-")
        try:
            h = hashlib.sha256()
            received = 0
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    received += len(chunk)
                    if received > size:
                        raise DataLoss(f"upload sent more than the announced {size} bytes")
                    h.update(chunk)
                    out.write(chunk)
            if received != size:
                raise DataLoss(f"upload ended after {received} of {size} bytes; nothing was stored")
            got = "sha256:" + h.hexdigest()
            if got != digest:
                raise DataLoss(f"upload is corrupt: content has digest {got}, the client announced "
                               f"{digest}; nothing was stored")
            check_ext4(tmp, size)
            final = self.path(digest)
            if os.path.exists(final):
                os.unlink(tmp)
            else:
                os.rename(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        with self.store.transaction() as tx:
            tx.put_image(model.Image(digest=digest, size=size, created_at=self.clock(), init=init), name=name)
        return self.store.resolve_image(digest)

    def open(self, ref: str) -> tuple[model.Image, BinaryIO]:
        image = self.store.resolve_image(ref)
        return image, open(self.path(image.digest), "rb")

    def read(self, ref: str) -> Iterator[model.Image | bytes]:
        """The image record, then its content in chunks."""
        image, f = self.open(ref)
        with f:
            yield image
            while chunk := f.read(READ_CHUNK):
                yield chunk

    def delete(self, tx: Transaction, image: model.Image, in_use_by: Iterable[str]) -> model.Image:
        """Delete `image` (as read in `tx`) unless services use it; its file
        goes once `tx` has committed."""
        users = sorted(in_use_by)
        if users:
            raise WrongState(f"image {image.digest[:19]} is used by service(s) {', '.join(users)}; "
                             "delete them first")
        tx.delete_image(image)
        tx.after_commit(lambda: self._unlink(image.digest))
        return image

    def _unlink(self, digest: str) -> None:
        try:
            os.unlink(self.path(digest))
        except FileNotFoundError:
            pass
