"""soda-switch: entry point of the Service Switch (load balancing over virtual nodes).

Not built yet: the control plane core comes first. The command exists so
that packaging and systemd units are in place; it refuses to run instead
of pretending to work.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="soda-switch", description="Run the Service Switch (load balancing over virtual nodes).")
    parser.parse_args(sys.argv[1:] if argv is None else argv)
    print("soda-switch: the Service Switch (load balancing over virtual nodes) is not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
