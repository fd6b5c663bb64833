"""The guest launcher: put this process where a guest belongs, then become the VMM.

    python -I -S .../soda/hypervisors/launch.py [--hold] [--netns NAME]
        [--cgroup DIR]... [--no-aslr] [--log FILE] -- ARGV...

(or `python -m soda.hypervisors.launch ...`).

In this order it joins each cgroup directory (writing its own pid to
`DIR/cgroup.procs`), enters the network namespace `/run/netns/NAME`, turns
off address-space randomisation (UML at small `mem=` starves without it: 6
of 10 boots died at mem=32M), with `--hold` waits until the driver that
spawned it writes "1" on its stdin (the driver has recorded the guest; an
end of file instead means the driver died first, and the launcher exits
rather than start a guest no record names), sends stdout and stderr to FILE
(appending) and stdin to /dev/null, and execs ARGV. The pid never changes, so the driver that
spawned it records the VMM's pid and the VMM is fenced from its first
instruction. Joining the cgroups first means everything after, the VMM's
memory included, is charged to the guest.

Anything that fails before the exec ends it with one line on stderr and
status 1 (127 if ARGV cannot be executed). It owns nothing else: no logging
setup and no SODA imports but soda.netns (setns) and soda.errors, which
import nothing else, so that the drivers can run it as a script without the
site machinery (`-I -S`): it starts in ~10 ms instead of ~50, on the way of
every boot.
"""

import os
import sys

ADDR_NO_RANDOMIZE = 0x0040000
PERSONALITY_QUERY = 0xFFFFFFFF
USAGE = ("usage: python -m soda.hypervisors.launch [--hold] [--netns NAME] [--cgroup DIR]... "
         "[--no-aslr] [--log FILE] -- ARGV...")
GO = b"1"


class LaunchError(Exception):
    pass


def parse(args: list[str]) -> dict:
    opts = {"netns": "", "cgroups": [], "no_aslr": False, "hold": False, "log": "", "argv": []}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            opts["argv"] = args[i + 1:]
            break
        if arg in ("--no-aslr", "--hold"):
            opts[arg[2:].replace("-", "_")] = True
            i += 1
            continue
        key, eq, value = arg.partition("=")
        if key not in ("--netns", "--cgroup", "--log"):
            raise LaunchError(f"unknown argument {arg!r}\n{USAGE}")
        if not eq:
            if i + 1 >= len(args):
                raise LaunchError(f"{arg} needs a value\n{USAGE}")
            value = args[i + 1]
            i += 1
        i += 1
        if key == "--cgroup":
            opts["cgroups"].append(value)
        else:
            opts[key[2:]] = value
    if not opts["argv"]:
        raise LaunchError(f"nothing to run after --\n{USAGE}")
    if opts["netns"] and ("/" in opts["netns"] or opts["netns"] in (".", "..")):
        raise LaunchError(f"bad network namespace name {opts['netns']!r}")
    return opts


def _libc():
    import ctypes
    return ctypes, ctypes.CDLL(None, use_errno=True)


def join_cgroup(directory: str) -> None:
    try:
        # A bare open().write() can swallow EINVAL: use `with`.
        with open(os.path.join(directory, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError as e:
        raise LaunchError(f"cannot join cgroup {directory}: {e.strerror or e}") from None


def enter_netns(name: str) -> None:
    # soda.netns and soda.errors import nothing else (~1 ms). Run as a
    # script (-I -S), sys.path holds only this file's directory: add the
    # package root.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from soda.errors import SodaError
    from soda.netns import enter_netns as setns
    try:
        setns(name)
    except (SodaError, OSError) as e:
        raise LaunchError(f"cannot enter network namespace {name}: {e}") from None


def disable_aslr() -> None:
    ctypes, libc = _libc()
    libc.personality.argtypes = [ctypes.c_ulong]
    libc.personality.restype = ctypes.c_int
    old = libc.personality(PERSONALITY_QUERY)
    if old == -1 or libc.personality(old | ADDR_NO_RANDOMIZE) == -1:
        raise LaunchError(f"cannot turn off address-space randomisation: "
                          f"{os.strerror(ctypes.get_errno())}")


def hold() -> None:
    """Wait for the driver's go on stdin."""
    try:
        got = os.read(0, 1)
    except OSError as e:
        raise LaunchError(f"cannot read the driver's go: {e.strerror}") from None
    if got != GO:
        raise LaunchError("the driver went away before it recorded this guest: not starting it")


def redirect(log: str) -> None:
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640) if log else None
    except OSError as e:
        raise LaunchError(f"cannot open {e.filename}: {e.strerror}") from None
    os.dup2(null, 0)
    os.close(null)
    if out is not None:
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)


def main(args: list[str]) -> int:
    try:
        opts = parse(args)
        for directory in opts["cgroups"]:
            join_cgroup(directory)
        if opts["netns"]:
            enter_netns(opts["netns"])
        if opts["no_aslr"]:
            disable_aslr()
        if opts["hold"]:
            hold()
        redirect(opts["log"])
    except LaunchError as e:
        print(f"soda-launch: {e}", file=sys.stderr, flush=True)
        return 2 if str(e).endswith(USAGE) else 1
    argv = opts["argv"]
    sys.stdout.flush()
    try:
        os.execv(argv[0], argv)
    except OSError as e:
        # stderr may be the log by now: that is where the driver looks.
        print(f"soda-launch: cannot execute {argv[0]}: {e.strerror}", file=sys.stderr, flush=True)
        return 127
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
