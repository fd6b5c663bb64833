"""soda-daemon: entry point of the SODA Daemon (isolation: cgroups, tc, disk bounds).

Not built yet: the control plane core comes first. The command exists so
that packaging and systemd units are in place; it refuses to run instead
of pretending to work.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="soda-daemon", description="Run the SODA Daemon (isolation: cgroups, tc, disk bounds).")
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    print("soda-daemon: the SODA Daemon (isolation: cgroups, tc, disk bounds) is not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
