"""The Master's image store: content-addressed image files under the state dir.

It owns receiving an upload (streamed to a temporary file while hashing,
never held in memory), checking it (size, sha256, ext4 superblock), and
making it visible atomically: the file is renamed into place and recorded
in the state store only once it is whole. An upload that fails or is cut
off leaves nothing behind; a deleted image's file goes once the deletion
has committed. A crash between file and record leaves a file the store does
not know, which the next start sweeps. It knows nothing of gRPC.

It also owns the room an upload may take: an announced size above the
configured maximum, or one that does not fit in the free space of the
image directory's filesystem (less a reserve the Master keeps, less what
pushes in flight were promised), is refused before any content is read;
the free space is measured again as the content arrives, because other
writers share that filesystem.

A layered image (soda.layers) is stored as its layer alone: a pushed layer
is composed with its parent as a stream, without writing the whole image,
to check the image's sha256 and filesystem before anything is recorded,
and composed the same way again for a caller that asks for the whole
image. An image another image is layered on cannot be deleted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import struct
import tempfile
import threading
import time
from dataclasses import replace
from typing import Callable, Iterable, Iterator

from soda import layers, model
from soda.errors import DataLoss, InvalidSpec, NoCapacity, NotFound, WrongState
from soda.files import file_chunks
from soda.master.store import StateReader, StateStore, Transaction

READ_CHUNK = 1 << 20
MAX_IMAGE_BYTES = 64 << 30          # defaults of MasterConfig.image_max_bytes and
RESERVE_BYTES = 1 << 30             # .image_reserve_bytes
# How often (in bytes written) an upload measures the free space again: a
# disk filled by someone else is noticed within this much.
RECHECK_BYTES = 64 << 20
# Layers over layers over ...: composing walks the chain, so it is bounded.
MAX_LAYER_DEPTH = 8
BLOCKS_SUFFIX = ".blocks"           # an image's cached block hashes, beside its file

_SUPERBLOCK = 1024
_EXT_MAGIC = 0xEF53
_INCOMPAT_64BIT = 0x80


def check_ext4(path: str, size: int) -> None:
    """Raise InvalidSpec unless `path` holds an ext2/3/4 filesystem whose
    superblock says it fits in `size` bytes (catches truncated images)."""
    with open(path, "rb") as f:
        check_ext4_start(f.read(_SUPERBLOCK + 1024), size)


def check_ext4_start(start: bytes, size: int) -> None:
    """check_ext4 of an image whose first 2 KiB are `start`."""
    sb = start[_SUPERBLOCK:_SUPERBLOCK + 1024]
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


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on `path`'s filesystem
    (the root-only reserve is not counted: the Master keeps its own)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class Reservation:
    """Room promised to one upload: `outstanding` is what it may still
    write (its size less what it wrote when last measured)."""

    def __init__(self, size: int):
        self.size = size
        self.outstanding = size


class ImageStore:
    def __init__(self, directory: str, store: StateStore, clock=time.time, *,
                 max_bytes: int = MAX_IMAGE_BYTES, reserve_bytes: int = RESERVE_BYTES,
                 free_bytes: Callable[[str], int] = free_bytes, recheck_bytes: int = RECHECK_BYTES):
        self.directory = directory
        self.store = store
        self.clock = clock
        self.max_bytes = max_bytes
        self.reserve_bytes = reserve_bytes
        self._free_bytes = free_bytes
        self._recheck_bytes = recheck_bytes
        # Uploads in flight, each with what it may still write: free space
        # one of them will fill is not free for the next.
        self._lock = threading.Lock()
        self._reservations: set[Reservation] = set()
        self._tmp = os.path.join(directory, "tmp")
        os.makedirs(self._tmp, exist_ok=True)
        self.sweep()

    def path(self, digest: str) -> str:
        return os.path.join(self.directory, digest.replace(":", "-"))

    def file_of(self, image: model.Image) -> str:
        """The file that holds what is stored of `image`: its layer, or it whole."""
        return self.path(image.layer or image.digest)

    def sweep(self) -> None:
        """Remove half-received uploads and files the store does not know
        (a crash between rename and record)."""
        for name in os.listdir(self._tmp):
            os.unlink(os.path.join(self._tmp, name))
        images = self.store.list_images()
        known = {self.file_of(i) for i in images} | {self.path(i.digest) + BLOCKS_SUFFIX for i in images}
        for name in os.listdir(self.directory):
            full = os.path.join(self.directory, name)
            if name.startswith("sha256-") and full not in known:
                os.unlink(full)

    def _room(self, mine: Reservation | None) -> tuple[int, int, int]:
        """(free, promised to other uploads, room left above the reserve);
        call with the lock held."""
        promised = sum(r.outstanding for r in self._reservations if r is not mine)
        free = self._free_bytes(self.directory)
        return free, promised, free - self.reserve_bytes - promised

    def _refuse(self, what: str, free: int, promised: int) -> NoCapacity:
        return NoCapacity(
            f"{what}: the filesystem of {self.directory} has {free} bytes free, of which the Master "
            f"keeps {self.reserve_bytes} (image_reserve_bytes) and pushes in flight hold {promised}; "
            f"nothing was stored: free space there and push again", resource="disk")

    @contextlib.contextmanager
    def reserve(self, size: int) -> Iterator[Reservation]:
        """Promise `size` bytes of the image directory's filesystem to one
        upload for as long as the block runs, or raise NoCapacity at once.
        Checked and recorded under one lock: two uploads cannot both be
        promised the same free space."""
        with self._lock:
            free, promised, room = self._room(None)
            if size > room:
                raise self._refuse(f"no room for an image of {size} bytes", free, promised)
            mine = Reservation(size)
            self._reservations.add(mine)
        try:
            yield mine
        finally:
            with self._lock:
                self._reservations.discard(mine)

    def recheck(self, mine: Reservation, written: int) -> None:
        """After `written` bytes of `mine`'s upload: raise NoCapacity if
        the rest no longer fits above the reserve (another writer filled
        the disk meanwhile). What it wrote already left the free space."""
        with self._lock:
            mine.outstanding = mine.size - written
            free, promised, room = self._room(mine)
            if mine.outstanding > room:
                raise self._refuse(f"no room left for the image of {mine.size} bytes after {written} "
                                   f"were received (the disk filled meanwhile)", free, promised)

    def receive(self, name: str, size: int, digest: str, init: str, chunks: Iterable[bytes],
                owner: str = model.OPERATORS, public: bool = False,
                check: Callable[[StateReader, model.Image], None] | None = None,
                base: model.Image | None = None) -> model.Image:
        """Receive one upload of `size` bytes with sha256 `digest` ("": any,
        for a fetch without one): an image whole, or with `base` a layer
        over that image. The image, once
        whole and checked, is recorded as `owner`'s too (a tenant's name, or
        the operators'), public if asked, with `name` as `owner`'s;
        `check(tx, image)` runs first in that transaction (the caller's
        rules, read again against the state it commits on)."""
        if name:
            model.check_image_name(name)
        if digest and not model.DIGEST_RE.match(digest):
            raise InvalidSpec(f"the sha256 digest of an image is sha256:<64 hex digits>, got {digest!r}")
        if size <= 0:
            raise InvalidSpec(f"image size {size} bytes is out of range (at least 1 byte)")
        if size > self.max_bytes:
            raise NoCapacity(f"image of {size} bytes is larger than the Master accepts ({self.max_bytes} "
                             f"bytes, its image_max_bytes)", resource="image size")
        init = init or "/sbin/init"
        if not init.startswith("/") or any(c.isspace() for c in init):
            raise InvalidSpec(f"init {init!r} must be an absolute path without spaces")
        if base is not None and len(self.chain(base)) >= MAX_LAYER_DEPTH:
            raise InvalidSpec(f"image {base.digest[:19]} is already {MAX_LAYER_DEPTH} layers deep: push "
                              f"the new image whole, or over an image nearer the bottom")
        if base is None:
            verify = self._verify_whole
        else:
            def verify(path: str, size: int, digest: str) -> model.Image:
                return self._verify_layer(path, size, digest, base)
        fresh, arrived = self._receive_file(size, digest, chunks, verify)
        stored = self.path(arrived.layer or arrived.digest)
        try:
            with self.store.transaction() as tx:
                try:
                    known = tx.resolve_image(arrived.digest)
                except NotFound:
                    known = replace(arrived, created_at=self.clock(), init=init)
                if check is not None:
                    check(tx, known)
                owners = set(known.owners) | ({owner} if owner != model.OPERATORS else set())
                tx.put_image(replace(known, owners=tuple(sorted(owners)), public=known.public or public),
                             name=name, name_owner=owner)
                recorded = known
        except BaseException:
            if fresh:
                self._unlink_unrecorded(stored)
            raise
        if fresh and self.file_of(recorded) != stored:
            # The image was already held (whole, or as another layer): this
            # layer is not needed.
            self._unlink_unrecorded(stored)
        return self.store.resolve_image(arrived.digest)

    def _verify_whole(self, path: str, size: int, digest: str) -> model.Image:
        check_ext4(path, size)
        return model.Image(digest=digest, size=size)

    def _verify_layer(self, path: str, size: int, digest: str, base: model.Image) -> model.Image:
        """Compose the layer at `path` with `base` as a stream: the image it
        names must come out, whole, with an ext4 filesystem."""
        header, reader = layers.open_layer(file_chunks(path), base.digest)
        if header.size > self.max_bytes:
            raise NoCapacity(f"the layer makes an image of {header.size} bytes, larger than the Master "
                             f"accepts ({self.max_bytes} bytes, its image_max_bytes)", resource="image size")
        start = b""
        for piece in layers.compose(self.content(base), header, reader):
            if len(start) < 2048:
                start += piece[:2048]
        check_ext4_start(start, header.size)
        return model.Image(digest=header.digest, size=header.size, parent=base.digest, layer=digest,
                           layer_size=size)

    def _receive_file(self, size: int, digest: str, chunks: Iterable[bytes],
                      verify: Callable[[str, int, str], model.Image]) -> tuple[bool, model.Image]:
        """Write the upload to a temporary file within a reservation of its
        room, check it whole (`verify(path, size, digest)` says what image
        it is), and rename it into place. Also returns whether this upload
        put the file there (False: the same content was already stored)."""
        # Refused here, before the first chunk is read, the client stops
        # sending: it learns of a full disk without uploading the image.
        with self.reserve(size) as mine:
            tmp = ""
            try:
                fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="upload-")
                h = hashlib.sha256()
                received = 0
                next_check = self._recheck_bytes
                with os.fdopen(fd, "wb") as out:
                    for chunk in chunks:
                        received += len(chunk)
                        if received > size:
                            raise DataLoss(f"upload sent more than the announced {size} bytes")
                        h.update(chunk)
                        out.write(chunk)
                        if received >= next_check:
                            self.recheck(mine, received)
                            next_check = received + self._recheck_bytes
                if received != size:
                    raise DataLoss(f"upload ended after {received} of {size} bytes; nothing was stored")
                got = "sha256:" + h.hexdigest()
                if digest and got != digest:
                    raise DataLoss(f"upload is corrupt: content has digest {got}, the client announced "
                                   f"{digest}; nothing was stored")
                arrived = verify(tmp, size, got)
                final = self.path(got)
                if os.path.exists(final):
                    os.unlink(tmp)
                    return False, arrived
                os.rename(tmp, final)
                return True, arrived
            except BaseException as exc:
                if tmp and os.path.exists(tmp):
                    os.unlink(tmp)
                # The disk filled faster than the checks saw (or the inodes
                # ran out): a shortage to report, not an internal error.
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoCapacity(f"the filesystem of {self.directory} filled up while receiving the "
                                     f"image of {size} bytes; nothing was stored: free space there and "
                                     f"push again", resource="disk") from exc
                raise

    def _unlink_unrecorded(self, path: str) -> None:
        """A file this push put in place that no record holds: it goes,
        unless another push of the same content recorded it meanwhile."""
        if all(self.file_of(i) != path for i in self.store.list_images()):
            _unlink(path)

    def chain(self, image: model.Image) -> list[model.Image]:
        """`image`, its parent, its parent's parent, ... down to a whole image."""
        out = [image]
        while out[-1].parent:
            if len(out) > MAX_LAYER_DEPTH:
                raise DataLoss(f"image {image.digest[:19]} is layered more than {MAX_LAYER_DEPTH} deep")
            out.append(self.store.resolve_image(out[-1].parent))
        return out

    def content(self, image: model.Image, layer: bool = False) -> Iterator[bytes]:
        """The bytes of `image` (composed, for a layered one), or with
        `layer` what is stored of it (a layered image's layer)."""
        if layer or not image.layer:
            return file_chunks(self.file_of(image))
        parent = self.store.resolve_image(image.parent)
        header, reader = layers.open_layer(file_chunks(self.file_of(image)), parent.digest)
        return layers.compose(self.content(parent), header, reader)

    def read(self, image: model.Image, layer: bool = False) -> Iterator[bytes]:
        """content(), opened at once: a file that is missing is an error
        here, before the caller has sent anything."""
        chunks = self.content(image, layer)
        first = next(chunks, b"")
        return itertools.chain((first,) if first else (), chunks)

    def block_hashes(self, image: model.Image) -> bytes:
        """soda.layers block hashes of the whole image, kept beside its file
        after the first time (an image never changes)."""
        path = self.path(image.digest) + BLOCKS_SUFFIX
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            pass
        hashes = b"".join(layers.block_hashes(self.content(image)))
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="blocks-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(hashes)
            os.rename(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        return hashes

    def delete(self, tx: Transaction, image: model.Image, in_use_by: Iterable[str]) -> model.Image:
        """Delete `image` (as read in `tx`) unless services use it or other
        images are layered on it; its files go once `tx` has committed."""
        users = [f"service(s) {', '.join(sorted(in_use_by))}"] if in_use_by else []
        children = sorted(",".join(i.names) or i.digest[:19] for i in tx.list_images()
                          if i.parent == image.digest)
        if children:
            users.append(f"image(s) {', '.join(children)} layered on it")
        if users:
            raise WrongState(f"image {image.digest[:19]} is used by {' and '.join(users)}; "
                             "delete them first")
        tx.delete_image(image)
        files = (self.file_of(image), self.path(image.digest) + BLOCKS_SUFFIX)
        tx.after_commit(lambda: [_unlink(f) for f in files])
        return image


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
