"""A guest's console log as people read it: its tail with the lines that
say nothing about the guest left out (a FAILED reason's quote), and the
console followed as it grows (`sodactl service logs`).

The console is what the guest wrote, so it is untrusted text: it is read
in bounded amounts, decoded with replacement, stripped of terminal escape
sequences and control characters, and cut to a line length.
"""

from __future__ import annotations

import os
import re
import time
from typing import Callable, Iterable, Iterator

# How much of the end of a console is read to find its last lines.
TAIL_BYTES = 64 * 1024
LINE_MAX = 240
# ANSI/VT escape sequences (systemd colours its status) and the other
# control characters a hostile guest could use to rewrite a terminal.
_ESCAPES = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]"
                      r"|[\x00-\x08\x0b-\x1f\x7f]")
# Lines that say nothing about why a guest does or does not serve: the
# kernel's and systemd's routine progress. What is left (a unit that
# FAILED, a service's own error, a panic) is what a reason quotes.
_NOISE = re.compile("|".join((
    r"^\s*$",
    r"^setup_one_line failed for device \d+",       # Debian's UML kernel, ssl=none
    r"^epollctl add err fd \d+",                     # UML consoles on files and null
    # systemd's progress, but for a service of the image's own that started
    # (which says it is up though its port is not).
    r"^\[\s+OK\s+\] (?!Started )",
    r"^\[\s+OK\s+\] Started .*(getty|systemd-|dbus|\.timer|\.path|Timer|Watch)",
    r"^\s+(Starting|Stopping|Mounting|Unmounting|Activating) .*\.\.\.$",
    r"^systemd\[1\]: (Started|Starting|Reached target|Finished|Mounted|Mounting|Listening on|"
    r"Created slice|Queued start job|.* was skipped because|.*: Deactivated successfully)",
    r"^systemd-journald\[\d+\]: (Received client request|Journal started|Runtime Journal|System Journal)",
)))


def clean(text: str) -> str:
    """`text` without escape sequences and control characters (tabs kept)."""
    return _ESCAPES.sub("", text.replace("\t", " "))


def read_tail(path: str, size: int = TAIL_BYTES) -> str:
    """The last `size` bytes of `path` as text ("" when it cannot be read),
    starting at a whole line where it was cut."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read(size)
    except OSError:
        return ""
    if end > size and b"\n" in data:
        data = data[data.index(b"\n") + 1:]
    return data.decode(errors="replace")


def meaningful(lines: Iterable[str]) -> list[str]:
    """`lines` cleaned, cut to LINE_MAX, without the noise."""
    out = []
    for line in lines:
        line = clean(line).rstrip()
        if not _NOISE.search(line):
            out.append(line[:LINE_MAX])
    return out


def last_lines(path: str, count: int = 6) -> list[str]:
    """The last `count` meaningful lines of the console at `path`."""
    return meaningful(read_tail(path).splitlines())[-count:]


def quote(path: str, count: int = 6) -> str:
    """The last meaningful console lines as one line for a reason:
    `"line" | "line"`, or "" when there are none."""
    return " | ".join(last_lines(path, count))


# ---- following a console (`sodactl service logs`) ---------------------------------

DEFAULT_TAIL = 100
# What "all" (tail -1) reads of a console at most, and the most one chunk
# of a followed console carries.
ALL_BYTES = 1024 * 1024
CHUNK_BYTES = 64 * 1024
FOLLOW_POLL = 0.25
# A followed console that stays quiet still sends an empty chunk this
# often: how the relay learns that its reader has gone.
KEEPALIVE_SECONDS = 2.0
LOG_LINE_MAX = 4096


def _shipped(lines: Iterable[str]) -> bytes:
    return "".join(clean(line)[:LOG_LINE_MAX] + "\n" for line in lines).encode()


def _chunks(lines: list[str]) -> Iterator[bytes]:
    batch: list[str] = []
    size = 0
    for line in lines:
        batch.append(line)
        size += len(line) + 1
        if size >= CHUNK_BYTES:
            yield _shipped(batch)
            batch, size = [], 0
    if batch:
        yield _shipped(batch)


def follow(path: str, kept: str = "", tail: int = 0, keep_following: bool = False,
           stop: Callable[[], bool] = lambda: False, poll: float = FOLLOW_POLL,
           sleep: Callable[[float], None] = time.sleep) -> Iterator[bytes]:
    """A console as chunks of whole, cleaned lines: its last `tail` lines
    (0 = DEFAULT_TAIL, -1 = all, up to ALL_BYTES), then, with
    `keep_following`, what the guest writes next until `stop()` or the
    console goes away (the guest stopped). With no `path`, the `kept` text
    of a guest that is no longer running."""
    count = DEFAULT_TAIL if tail == 0 else tail
    if not path:
        lines = kept.splitlines()
        yield from _chunks(lines if count < 0 else lines[-count:])
        return
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            offset = f.tell()
    except OSError:
        return
    text = read_tail(path, ALL_BYTES if count < 0 else max(TAIL_BYTES, count * 200))
    lines = text.splitlines()
    yield from _chunks(lines if count < 0 else lines[-count:])
    partial = b""
    quiet = 0.0
    while keep_following and not stop():
        sleep(poll)
        quiet += poll
        if quiet >= KEEPALIVE_SECONDS:
            quiet = 0.0
            yield b""
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                if size < offset:           # a new boot wrote a new console
                    offset, partial = 0, b""
                f.seek(offset)
                data = f.read(CHUNK_BYTES)
        except OSError:
            return                           # the guest stopped: its console is gone
        if not data:
            continue
        quiet = 0.0
        offset += len(data)
        data = partial + data
        cut = data.rfind(b"\n")
        if cut < 0 and len(data) < CHUNK_BYTES:
            partial = data                   # half a line: wait for its end
            continue
        whole, partial = (data, b"") if cut < 0 else (data[:cut + 1], data[cut + 1:])
        yield _shipped(whole.decode(errors="replace").splitlines())
