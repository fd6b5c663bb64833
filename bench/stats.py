#!/usr/bin/env python3
"""Order statistics the benchmarks report: one definition of a percentile.

Imported by the benchmarks; run as a program it summarises numbers read
from stdin (one or more per line, e.g. timings from another tool) the same
way:

    python bench/stats.py [--json] < seconds.txt

prints count, min, median, p95 and max; with --json the last line is one
JSON object of them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (0 < q <= 100): the smallest value
    with at least q % of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def p95(values: list[float]) -> float:
    return percentile(values, 95)


def summary(values: list[float]) -> dict[str, float]:
    return {"count": len(values), "min": min(values), "median": percentile(values, 50),
            "p95": p95(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object last")
    args = p.parse_args(argv)
    try:
        values = [float(word) for line in sys.stdin for word in line.split()]
    except ValueError as exc:
        print(f"stats: not a number: {exc}", file=sys.stderr)
        return 2
    if not values:
        print("stats: no numbers on stdin", file=sys.stderr)
        return 2
    figures = summary(values)
    print("  ".join(f"{k} {v:g}" for k, v in figures.items()))
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
