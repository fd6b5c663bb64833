"""The Agent's image cache: base images pulled from the Master by digest.

Owns `<dir>/sha256-<hex>` files. A file only ever appears under that name
by a rename after its content was verified, so a file that is there is a
verified, complete image and is reused as is. Cached images are read-only:
guests write to their own copy-on-write layer, never here.

A layered image (soda.layers) arrives as its layer alone and is composed
here once, into a copy of its parent (pulled first when missing; reflinked
where the filesystem can), and checked against the image's sha256 before
it takes its name: every guest of every service that boots it shares that
one composed file, as it would a whole image.

The cache may be bounded (`limit_bytes`, what its files take on disk): after
a pull or a grow puts it over, the least recently used files (by atime,
which each use sets) go first, never one that a virtual node of this node
boots or is to boot (`in_use`); an evicted image is pulled again when next
needed.

Also owns each virtual node's root disk base (`sha256-<hex>.disk-<N>M`):
the image grown to the virtual node's disk size, shared read-only by every
guest of that image and size, under which the hypervisor puts the guest's
copy-on-write layer (UML `ubd0=cow,base`, a QEMU qcow2 overlay). Why:

- The virtual node's `disk` (MiB) is the size of the disk its guest sees,
  as a cloud flavor's root disk is: `--disk 256` over a 16 MiB image gives
  a 256 MiB root filesystem (an ext4 image, as the image contract says, is
  grown offline with resize2fs; any other content gets the bigger device
  only). A disk smaller than the image cannot hold it and is refused with
  a clear error (the Master refuses it at admission already).
- The bound is the VMM's, not ours: a COW layer can hold no more than its
  device, and the device is exactly `disk` MiB, so the guest's writes stop
  with ENOSPC (or EIO past the filesystem) inside the guest, and the layer's
  allocated size on the host stays within `disk` plus the format's own
  metadata (UML's COW bitmap is one bit per 512-byte sector; qcow2 adds its
  L2 and refcount tables). A UML COW layer is always the size of its base
  (ubd checks the base's size against the COW header), which is why the
  base itself is grown rather than the layer.
- Grown bases are made once per (image, size) and never modified, like the
  images; the copy is sparse (reflinked where the filesystem can), so one
  costs what the image's data does, not `disk`.

It must not talk gRPC itself; pulling goes through the MasterClient it is
given (anything with `pull_image(digest, fileobj) -> Image`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import BinaryIO, Callable, Iterable, Iterator

from soda import command, layers
from soda.errors import DataLoss, InvalidSpec, SodaError
from soda.files import file_chunks, sha256_file
from soda.model.names import DIGEST_RE
from soda.model.state import Image, ImageCacheState, check_disk_holds_image

log = logging.getLogger(__name__)

TEMP_PREFIX = ".pull-"
MiB = 1 << 20
EXT4_MAGIC_OFFSET = 1024 + 0x38      # s_magic in the superblock at byte 1024
EXT4_MAGIC = b"\x53\xef"
GROW_TIMEOUT = 300.0                 # seconds for one copy, fsck or resize


class ImageCache:
    def __init__(self, directory: str, client, limit_bytes: int = 0,
                 in_use: Callable[[], Iterable[tuple[str, int]]] = tuple):
        """`limit_bytes`: the bound on what the cache's files take on disk
        (0: none); `in_use()`: the (digest, disk MiB) of every virtual node
        this node runs or is to run, whose files are never evicted."""
        self.dir = directory
        self._client = client
        self.limit_bytes = limit_bytes
        self.in_use = in_use
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        self._trimming = threading.Lock()
        os.makedirs(directory, exist_ok=True)
        self._sweep_temp_files()

    def path(self, digest: str) -> str:
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise InvalidSpec(f"invalid image digest {digest!r}: expected sha256:<64 hex digits>")
        return os.path.join(self.dir, digest.replace(":", "-", 1))

    def ensure(self, digest: str, disk_mib: int = 0) -> str:
        """The local path of the image `digest`, pulled first if need be;
        with `disk_mib`, of its root disk base of that size (module doc)."""
        path = self.path(digest)
        if not os.path.exists(path):
            # One lock per digest: ten virtual nodes of one service booting
            # at once pull their image once, the others wait for it.
            with self._lock_for(digest):
                if not os.path.exists(path):
                    self._pull(digest, path)
        used = [path, self._sized(digest, path, disk_mib)] if disk_mib else [path]
        for p in used:
            _touch(p)
        self.trim(keep=used)
        return used[-1]

    # ---- the bound -----------------------------------------------------
    def files(self) -> list[tuple[float, int, str]]:
        """(last use, bytes on disk, path) of every image and disk base held."""
        out = []
        for entry in os.scandir(self.dir):
            if entry.name.startswith("sha256-") and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                out.append((st.st_atime, st.st_blocks * 512, entry.path))
        return out

    def state(self) -> ImageCacheState:
        """What the cache takes on disk, its bound and the images it holds
        (what a heartbeat reports)."""
        files = self.files()
        images = sorted("sha256:" + os.path.basename(p)[7:] for _, _, p in files
                        if DIGEST_RE.match("sha256:" + os.path.basename(p)[7:]))
        return ImageCacheState(bytes=sum(size for _, size, _ in files), limit=self.limit_bytes,
                               images=tuple(images))

    def protected(self) -> set[str]:
        """Files a virtual node of this node boots (or will): an image and
        the disk base grown from it for that virtual node's disk."""
        out = set()
        for digest, disk_mib in self.in_use():
            image = self.path(digest)
            out.update((image, f"{image}.disk-{disk_mib}M"))
        return out

    def trim(self, keep: Iterable[str] = ()) -> list[str]:
        """Evict the least recently used files no virtual node needs until
        the cache is within its bound; the paths evicted."""
        if not self.limit_bytes:
            return []
        with self._trimming:
            files = self.files()
            used = sum(size for _, size, _ in files)
            if used <= self.limit_bytes:
                return []
            protected = self.protected() | set(keep)
            evicted = []
            for last_use, size, path in sorted(files):
                if used <= self.limit_bytes:
                    break
                if path in protected:
                    continue
                lock = self._lock_for(path)
                if not lock.acquire(blocking=False):
                    continue                        # being made or grown right now
                try:
                    _discard(path)
                finally:
                    lock.release()
                used -= size
                evicted.append(path)
                log.info("image cache: evicted %s (%d bytes on disk, unused for %.0f s) to stay within "
                         "%d bytes", os.path.basename(path), size, max(0.0, time.time() - last_use),
                         self.limit_bytes)
            if used > self.limit_bytes:
                log.warning("image cache holds %d bytes, over its bound of %d: the rest is in use by "
                            "this node's virtual nodes", used, self.limit_bytes)
            return evicted

    def _sized(self, digest: str, image: str, disk_mib: int) -> str:
        size = os.stat(image).st_size
        check_disk_holds_image(disk_mib, Image(digest=digest, size=size))
        if disk_mib * MiB == size:
            return image
        path = f"{image}.disk-{disk_mib}M"
        if os.path.exists(path):
            return path
        with self._lock_for(path):
            if not os.path.exists(path):
                self._grow(image, path, disk_mib)
        return path

    def _grow(self, image: str, path: str, disk_mib: int) -> None:
        log.info("making a %d MiB root disk base from %s", disk_mib, image)
        with self._building(path, f"a {disk_mib} MiB root disk from {image}") as (fd, tmp):
            os.close(fd)
            _run(["cp", "--sparse=always", "--reflink=auto", image, tmp])
            os.truncate(tmp, disk_mib * MiB)
            if _is_ext4(tmp):
                # resize2fs insists on a freshly checked filesystem; -p only
                # fixes what is safe, and exit 1 means "fixed something".
                _run(["e2fsck", "-f", "-p", tmp], ok=(0, 1))
                _run(["resize2fs", tmp, f"{disk_mib}M"])
            else:
                log.warning("%s holds no ext4 filesystem: its guests get a %d MiB disk but the "
                            "filesystem on it keeps its size", image, disk_mib)

    def _lock_for(self, digest: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(digest, threading.Lock())

    def _pull(self, digest: str, path: str) -> None:
        """Pull the image: whole, or for a layered image its layer alone,
        composed here with its parent (pulled first if need be)."""
        log.info("pulling image %s", digest)
        with self._temporary(f"image {digest}") as (fd, layer):
            with os.fdopen(fd, "wb") as f:
                out = SparseWriter(f)
                image = self._client.pull_image(digest, out, layer=True)
                out.close()
                size = os.fstat(f.fileno()).st_size
                os.fsync(f.fileno())
            # MasterClient checked the bytes against the header; check that
            # the header is the image we asked for and that it all landed.
            if image.digest != digest:
                raise DataLoss(f"asked the Master for image {digest}, got {image.digest}")
            if size != (image.layer_size if image.layer else image.size):
                raise DataLoss(f"image {digest} arrived with {size} bytes, not as many as announced")
            if not image.layer:
                _publish(layer, path)
                log.info("image %s cached (%d bytes)", digest, image.size)
                return
            parent = self.ensure(image.parent)
            with self._building(path, f"image {digest} (its layer over {image.parent})") as (fd, tmp):
                os.close(fd)
                # Held, trim() passes the parent by while it is copied.
                with self._lock_for(parent):
                    _run(["cp", "--sparse=always", "--reflink=auto", parent, tmp])
                header, reader = layers.open_layer(file_chunks(layer), image.parent)
                if (header.digest, header.size) != (image.digest, image.size):
                    raise DataLoss(f"the layer of image {digest} names image {header.digest}")
                layers.apply(tmp, header, reader)
                layers.check_digest(sha256_file(tmp), header)
        log.info("image %s cached: a layer of %d bytes over %s, composed", digest, image.layer_size,
                 image.parent)

    @contextlib.contextmanager
    def _temporary(self, what: str) -> Iterator[tuple[int, str]]:
        """A temporary file in the cache (its fd and path), gone after the
        block unless the block published it."""
        try:
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=TEMP_PREFIX)
        except OSError as exc:
            raise SodaError(f"cannot write to the image cache {self.dir}: {exc.strerror}") from None
        try:
            yield fd, tmp
        except OSError as exc:
            raise SodaError(f"cannot write {what} to the image cache {self.dir}: "
                            f"{exc.strerror or exc}") from None
        finally:
            _discard(tmp)

    @contextlib.contextmanager
    def _building(self, path: str, what: str) -> Iterator[tuple[int, str]]:
        """A temporary file in the cache (its fd and path) that becomes the
        read-only `path` if the block succeeds, and is gone if it fails."""
        with self._temporary(what) as (fd, tmp):
            yield fd, tmp
            _publish(tmp, path)

    def _sweep_temp_files(self) -> None:
        # Leftovers of pulls cut short by an Agent crash; nobody else writes here.
        for entry in os.listdir(self.dir):
            if entry.startswith(TEMP_PREFIX):
                _discard(os.path.join(self.dir, entry))


class SparseWriter:
    """Writes through to `f`, leaving zero blocks as holes: an image's free
    space takes no room in the cache (as cp --sparse=always would)."""

    BLOCK = 64 << 10
    _ZEROS = bytes(BLOCK)

    def __init__(self, f: BinaryIO):
        self._f = f
        self._size = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        for start in range(0, len(view), self.BLOCK):
            piece = view[start:start + self.BLOCK]
            if piece == self._ZEROS[:len(piece)]:
                self._f.seek(len(piece), os.SEEK_CUR)
            else:
                self._f.write(piece)
        self._size += len(view)
        return len(view)

    def tell(self) -> int:
        return self._size

    def close(self) -> None:
        """Set the file's length: trailing holes are not written."""
        self._f.truncate(self._size)
        self._f.flush()


def _is_ext4(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(EXT4_MAGIC_OFFSET)
        return f.read(2) == EXT4_MAGIC


def _run(argv: list[str], ok: tuple[int, ...] = (0,)) -> None:
    # e2fsprogs live in /sbin, which a service's PATH may lack.
    found = shutil.which(argv[0]) or shutil.which(argv[0], path="/usr/sbin:/sbin")
    argv = [found or argv[0]] + argv[1:]
    command.run(argv, timeout=GROW_TIMEOUT, ok=ok, hint="Debian packages coreutils, e2fsprogs")


def _touch(path: str) -> None:
    """Mark a file used now (its atime; the mtime stays: a UML COW layer
    records its base's mtime and refuses a base whose mtime changed)."""
    try:
        st = os.stat(path)
        os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
    except FileNotFoundError:
        pass


def _publish(tmp: str, path: str) -> None:
    os.chmod(tmp, 0o444)
    os.replace(tmp, path)


def _discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
