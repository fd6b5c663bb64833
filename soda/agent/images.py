"""The Agent's image cache: base images pulled from the Master by digest.

Owns `<dir>/sha256-<hex>` files. A file only ever appears under that name
by a rename after its content was verified, so a file that is there is a
verified, complete image and is reused as is. Cached images are read-only:
guests write to their own copy-on-write layer, never here.

It must not talk gRPC itself; pulling goes through the MasterClient it is
given (anything with `pull_image(digest, fileobj) -> Image`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading

from soda.errors import DataLoss, InvalidSpec, SodaError
from soda.model import DIGEST_RE

log = logging.getLogger(__name__)

TEMP_PREFIX = ".pull-"


class ImageCache:
    def __init__(self, directory: str, client):
        self.dir = directory
        self._client = client
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        os.makedirs(directory, exist_ok=True)
        self._sweep_temp_files()

    def path(self, digest: str) -> str:
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise InvalidSpec(f"invalid image digest {digest!r}: expected sha256:<64 hex digits>")
        return os.path.join(self.dir, digest.replace(":", "-", 1))

    def ensure(self, digest: str) -> str:
        """The local path of the image `digest`, pulled first if need be."""
        path = self.path(digest)
        if os.path.exists(path):
            return path
        # One lock per digest: ten virtual nodes of one service booting at
        # once pull their image once, the others wait for it.
        with self._lock_for(digest):
            if os.path.exists(path):
                return path
            self._pull(digest, path)
        return path

    def _lock_for(self, digest: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(digest, threading.Lock())

    def _pull(self, digest: str, path: str) -> None:
        log.info("pulling image %s", digest)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=TEMP_PREFIX)
        except OSError as exc:
            raise SodaError(f"cannot write to the image cache {self.dir}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as out:
                image = self._client.pull_image(digest, out)
                out.flush()
                size = os.fstat(out.fileno()).st_size
                os.fsync(out.fileno())
            # MasterClient checked the bytes against the header; check that
            # the header is the image we asked for and that it all landed.
            if image.digest != digest:
                raise DataLoss(f"asked the Master for image {digest}, got {image.digest}")
            if size != image.size:
                raise DataLoss(f"image {digest} arrived with {size} of {image.size} bytes")
            os.chmod(tmp, 0o444)
            os.replace(tmp, path)
        except OSError as exc:
            _discard(tmp)
            raise SodaError(f"cannot write image {digest} to the image cache {self.dir}: "
                            f"{exc.strerror or exc}") from None
        except BaseException:
            _discard(tmp)
            raise
        log.info("image %s cached (%d bytes)", digest, image.size)

    def _sweep_temp_files(self) -> None:
        # Leftovers of pulls cut short by an Agent crash; nobody else writes here.
        for entry in os.listdir(self.dir):
            if entry.startswith(TEMP_PREFIX):
                _discard(os.path.join(self.dir, entry))


def _discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
