"""Sampling profiles of a running SODA process for the benches: py-spy
attached by pid while a bench loads it, and a summary of where the time
went (the top functions by samples, on CPU only).

    with Profile(pid, out_dir) as profile:
        ...load the process...
    print_top(profile.summary())

py-spy (PyPI) samples the process's Python stacks from outside, 100 times a
second, without stopping it (`--nonblocking`). Only the thread holding the
GIL is counted (`--gil`): py-spy's guess of which threads are idle counted
threads blocked in Condition.wait as busy, and a Python process runs Python
in one thread at a time anyway, so the counts are its Python CPU time. The raw
output is collapsed stacks, one line per distinct stack: frames from the
outermost to the innermost, `;`-separated, then the number of samples.

Two views of it: `self` counts a sample for the innermost frame only (where
the CPU was), `total` for every distinct function on the stack (what the
time was spent under). Both name a function as `name (file:line of its
first sample)` with the path shortened to the part below site-packages or
the checkout. Also runs as a program on a saved raw file:

    python bench/profile.py [--top 5] [--json] RAW_FILE
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys

# "name (path/to/file.py:123)"; py-spy writes "name (file.py)" when the line
# is unknown, and threads as "thread (0x...)" when asked for (not here).
FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    """py-spy beside this interpreter (the venv's), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return here if os.access(here, os.X_OK) else shutil.which("py-spy")


class Profile:
    """py-spy recording `pid` into `<out_dir>/profile-<pid>.txt` for as long
    as the `with` block runs. Without py-spy, `available` is False and the
    block runs unprofiled (the bench says so)."""

    def __init__(self, pid: int, out_dir: str, rate: int = 100):
        self.pid = pid
        self.path = os.path.join(out_dir, f"profile-{pid}.txt")
        self.rate = rate
        self.binary = py_spy()
        self.available = self.binary is not None
        self._proc: subprocess.Popen | None = None
        self._log = os.path.join(out_dir, f"py-spy-{pid}.log")

    def __enter__(self) -> "Profile":
        if self.available:
            with open(self._log, "wb") as log:
                self._proc = subprocess.Popen(
                    [self.binary, "record", "--pid", str(self.pid), "--rate", str(self.rate),
                     "--format", "raw", "--nonblocking", "--gil", "--output", self.path],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        # SIGINT: py-spy writes what it has and exits.
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def summary(self, top: int = 5) -> dict:
        """The top functions (see the module's docstring); empty lists and
        the reason when there was no profile."""
        if not self.available:
            return {"samples": 0, "self": [], "total": [], "note": "py-spy is not installed"}
        try:
            with open(self.path) as f:
                return summarize(f, top)
        except FileNotFoundError:
            with open(self._log, errors="replace") as f:
                why = f.read().strip().splitlines()[-1:] or ["no output"]
            return {"samples": 0, "self": [], "total": [], "note": f"py-spy wrote nothing: {why[0]}"}


def short(path: str) -> str:
    """`path` below site-packages or this checkout, else as given."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    return path[len(top):] if path.startswith(top) else path


def function_of(frame: str) -> str:
    """A frame as its function: `name (file)`, the line left out so that
    all samples inside one function count together."""
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m.group('name')} ({short(m.group('file'))})"


def summarize(lines, top: int = 5) -> dict:
    """Counts from collapsed-stack lines: {"samples", "self", "total"}, each
    list of {"function", "samples", "share"} best first."""
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in lines:
        line = line.rstrip("\n")
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        functions = [function_of(f) for f in stack.split(";") if f]
        if not functions:
            continue
        own[functions[-1]] += n
        for function in set(functions):
            under[function] += n

    def best(counter: collections.Counter[str]) -> list[dict]:
        # Ties by name: the same profile always reads the same.
        ranked = sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:top]
        return [{"function": f, "samples": c, "share": round(c / samples, 3) if samples else 0.0}
                for f, c in ranked]
    return {"samples": samples, "self": best(own), "total": best(under)}


def print_top(summary: dict, title: str = "profile") -> None:
    if not summary["samples"]:
        print(f"  {title}: no samples ({summary.get('note', 'empty profile')})")
        return
    print(f"  {title}: {summary['samples']} samples on CPU")
    for view, label in (("self", "where the CPU was"), ("total", "what it ran under")):
        print(f"    top by {view} ({label}):")
        for entry in summary[view]:
            print(f"      {entry['share'] * 100:5.1f} %  {entry['function']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Summarize a py-spy raw profile: the top functions.")
    p.add_argument("raw", help="a file py-spy record --format raw wrote")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object last")
    args = p.parse_args(argv)
    try:
        with open(args.raw) as f:
            summary = summarize(f, args.top)
    except OSError as exc:
        print(f"profile: cannot read {args.raw}: {exc.strerror}", file=sys.stderr)
        return 2
    print_top(summary, os.path.basename(args.raw))
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
