"""A guest's console log as people read it: its tail, with the lines that
say nothing about the guest left out, and the tail of a file followed as it
grows (`sodactl service logs`).

The console is what the guest wrote, so it is untrusted text: it is read
in bounded amounts, decoded with replacement, stripped of terminal escape
sequences and control characters, and cut to a line length.
"""

from __future__ import annotations

import os
import re
from typing import Iterable

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
    r"^\[\s+OK\s+\] ",                               # systemd: a unit started or reached
    r"^\s+(Starting|Stopping|Mounting|Unmounting|Activating) .*\.\.\.$",
    r"^systemd\[1\]: (Started|Starting|Reached target|Finished|Mounted|Mounting|Listening on|"
    r"Created slice|Queued start job|.* was skipped because)",
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
