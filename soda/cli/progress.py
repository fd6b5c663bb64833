"""Progress on stderr for sodactl's long work (image push, --wait).

Owns how progress looks: on a terminal one line redrawn in place; on a pipe
or a log file no redraws, only the lines worth keeping. Never writes to
stdout, which carries data for scripts.
"""

from __future__ import annotations

import sys
from typing import TextIO

from soda.cli.output import format_bytes

BAR_WIDTH = 30
CLEAR_LINE = "\r\x1b[K"


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):       # closed or not a real file
        return False


class StatusLine:
    """One line of progress. `update` redraws it on a terminal; elsewhere only
    updates marked as milestones are written, so logs stay readable."""

    def __init__(self, stream: TextIO | None = None, interactive: bool | None = None):
        self._stream = stream if stream is not None else sys.stderr
        self._interactive = is_terminal(self._stream) if interactive is None else interactive
        self._drawn = ""            # what the terminal line shows now
        self._written = ""          # last full line written
        self._line_open = False     # a redrawn line not yet ended with a newline

    def update(self, text: str, milestone: bool = False) -> None:
        if self._interactive:
            if text != self._drawn:
                self._stream.write(CLEAR_LINE + text)
                self._stream.flush()
                self._drawn, self._line_open = text, True
        elif milestone and text != self._written:
            self._write_line(text)

    def finish(self, text: str) -> None:
        """End the current step with a line that stays."""
        if self._interactive:
            self._stream.write(CLEAR_LINE)
            self._line_open = False
            self._drawn = ""
        if text != self._written or self._interactive:
            self._write_line(text)

    def close(self) -> None:
        # Leave the cursor on a fresh line so an error message after us is readable.
        if self._line_open:
            self._stream.write("\n")
            self._stream.flush()
            self._line_open = False

    def __enter__(self) -> "StatusLine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_line(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()
        self._written = text


class ByteProgress:
    """A `progress(done, total[, wire])` callback that draws a bar on a
    StatusLine; `wire` is what the bytes took on the wire (compressed),
    kept in .wire."""

    def __init__(self, status: StatusLine, label: str):
        self._status = status
        self._label = label
        self._percent = -1
        self.wire: int | None = None

    def __call__(self, done: int, total: int, wire: int | None = None) -> None:
        self.wire = wire
        percent = min(100, done * 100 // total) if total else 100
        if percent == self._percent:        # redraw at most a hundred times
            return
        self._percent = percent
        filled = BAR_WIDTH * percent // 100
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        on_wire = f" ({format_bytes(wire)} on the wire)" if wire is not None else ""
        self._status.update(f"{self._label} [{bar}] {percent:3d}%  "
                            f"{format_bytes(done)} / {format_bytes(total)}{on_wire}")
