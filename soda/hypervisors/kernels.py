"""Which User-Mode Linux kernel a node boots its guests with.

Owns the choice between SODA's own guest kernel, built by
`scripts/build-guest-kernel` into the kernel cache
(`$SODA_KERNEL_CACHE`, default `/var/cache/soda/guest-kernel`, whose
`current/linux` links to the newest build), and Debian's
`/usr/bin/linux.uml`, and the smallest guest memory each one boots with
reliably: SODA's boots with as little as `mem=13M` (its build records the
minimum it is given, 16 MiB, in `metadata.json`; 150 of 150 boots at 16).
Debian's boots at 32 MiB (it panics at 22-24) with the command line the
UML driver gives every guest: without `ssl=none pty.legacy_count=0`, 1-3 %
of its boots at 32 died "System is deadlocked on memory", because each of
its ~660 serial and legacy pty devices ran the /sbin/hotplug uevent helper
and up to 166 helper threads (5 MiB) were alive at once when a 4 MiB
watermark boost struck (tests/system/test_boot_reliability.py).

Also what a guest's kernel said it measured at boot: its delay loop
(`calibrated_lpj`), which the driver hands to the guests after it.

It only looks at files: it never builds a kernel, runs one or fails because
one is missing (the driver refuses to start a guest on a missing kernel).
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Mapping, NamedTuple

log = logging.getLogger(__name__)

AUTO = "auto"
SODA = "soda"
DEBIAN = "debian"
CACHE_ENV = "SODA_KERNEL_CACHE"
DEFAULT_CACHE = "/var/cache/soda/guest-kernel"
CURRENT = "current"
KERNEL_FILE = "linux"
METADATA = "metadata.json"
DEBIAN_KERNEL = "/usr/bin/linux.uml"
SODA_MIN_MEMORY = 16                 # MiB; boots with 13
DEBIAN_MIN_MEMORY = 32               # MiB; panics at 22-24
# What a kernel prints once it has measured its delay loop (calibrate_delay);
# one told the figure (lpj=) says "(skipped) preset value" instead. It comes
# within the console's first few KiB.
_CALIBRATED = re.compile(rb"Calibrating delay loop\.\.\. [0-9.]+ BogoMIPS \(lpj=([0-9]+)\)")
_CALIBRATION_BYTES = 64 << 10


class UmlKernel(NamedTuple):
    path: str
    kind: str                        # SODA (built by SODA, in the cache) or DEBIAN (any other)
    min_memory: int                  # MiB: the smallest mem= that boots


def kernel_cache(environ: Mapping[str, str] | None = None) -> str:
    """Where scripts/build-guest-kernel puts its kernels."""
    environ = os.environ if environ is None else environ
    return environ.get(CACHE_ENV) or DEFAULT_CACHE


def find_uml_kernel(preference: str = AUTO, cache: str | None = None,
                    environ: Mapping[str, str] | None = None) -> UmlKernel:
    """The kernel to boot for `preference`: "auto" (or "") takes the
    newest SODA kernel in the cache when there is a runnable one, else
    Debian's; any other value is a kernel path used as given, SODA's when
    it lies inside the cache. An "auto" SODA kernel is returned by its real
    path (`<cache>/<key>/linux`), so a guest's record names the build it
    booted and a later build does not change the kernel of a running node."""
    cache = cache or kernel_cache(environ)
    if preference in ("", AUTO):
        current = os.path.join(cache, CURRENT, KERNEL_FILE)
        if os.path.isfile(current) and os.access(current, os.X_OK):
            path = os.path.realpath(current)
            return UmlKernel(path, SODA, _soda_min_memory(path))
        return UmlKernel(DEBIAN_KERNEL, DEBIAN, DEBIAN_MIN_MEMORY)
    if _inside(preference, cache):
        return UmlKernel(preference, SODA, _soda_min_memory(preference))
    return UmlKernel(preference, DEBIAN, DEBIAN_MIN_MEMORY)


def _inside(path: str, directory: str) -> bool:
    real = os.path.realpath(path)
    top = os.path.realpath(directory)
    return os.path.commonpath([real, top]) == top and real != top


def _soda_min_memory(kernel: str) -> int:
    """The minimum the build recorded beside the kernel, or the default."""
    path = os.path.join(os.path.dirname(os.path.realpath(kernel)), METADATA)
    try:
        with open(path) as f:
            value = json.load(f).get("min_memory_mib")
    except FileNotFoundError:
        return SODA_MIN_MEMORY
    except (OSError, ValueError, AttributeError) as e:
        log.warning("cannot read %s (%s): assuming %d MiB", path, e, SODA_MIN_MEMORY)
        return SODA_MIN_MEMORY
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        log.warning("%s: min_memory_mib %r is not a positive integer: assuming %d MiB",
                    path, value, SODA_MIN_MEMORY)
        return SODA_MIN_MEMORY
    return value


def calibrated_lpj(console_log: str) -> int:
    """The loops_per_jiffy a guest's kernel measured at boot, read from its
    console log; 0 when it has not said so (not booted that far, told the
    figure, or no log)."""
    try:
        with open(console_log, "rb") as f:
            found = _CALIBRATED.search(f.read(_CALIBRATION_BYTES))
    except OSError:
        return 0
    return int(found.group(1)) if found else 0
