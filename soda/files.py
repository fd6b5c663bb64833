"""Files SODA keeps: written whole or not at all, removed whatever they are.

Records (guests, the local cluster's state) are replaced atomically, so a
reader or a restarted process sees the old file or the new one, never half
of one; `remove_path` takes away a file, a link or a whole tree alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any


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
