"""The guest launcher: put this process where a guest belongs, then become the VMM.

    python -I -S .../soda/hypervisors/launch.py [--hold] [--netns NAME]
        [--cgroup DIR]... [--no-aslr] [--log FILE] [--nofile N]
        [--user UID [--group GID]] [--fs-read PATH]... [--fs-write PATH]...
        -- ARGV...

(or `python -m soda.hypervisors.launch ...`).

In this order it joins each cgroup directory (writing its own pid to
`DIR/cgroup.procs`), enters the network namespace `/run/netns/NAME`, turns
off address-space randomisation (UML at small `mem=` starves without it: 6
of 10 boots died at mem=32M), with `--hold` waits until the driver that
spawned it writes "1" on its stdin (the driver has recorded the guest; an
end of file instead means the driver died first, and the launcher exits
rather than start a guest no record names), sends stdout and stderr to FILE
(appending, opened while still root) and stdin to /dev/null, sets the
open-files limit (RLIMIT_NOFILE, soft and hard) to N, and with `--user`
gives up root for good: no supplementary groups, gid GID (default: UID),
uid UID, a umask of 077 (what the VMM makes is its own alone), then
`no_new_privs` (no exec can gain privileges again: no setuid binary, no
file capabilities), and checks that no capability is left (effective and
permitted, from /proc/self/status). With `--fs-read`/`--fs-write` it
last confines itself and what it execs with Landlock to those paths (read
and execute beneath each `--fs-read`, anything beneath each `--fs-write`):
every other path of the host is refused to the VMM, whatever a guest makes
it open (hostfs mounts of `-o ../..` included); where the kernel has no
Landlock that is an error, not a silent run unconfined. Then it execs
ARGV. The cgroups and
the namespace need root, so they come first. The pid never changes, so the
driver that spawned it records the VMM's pid and the VMM is fenced from its
first instruction. Joining the cgroups first means everything after, the
VMM's memory included, is charged to the guest.

Anything that fails before the exec ends it with one line on stderr and
status 1 (2 for a usage error, 127 if ARGV cannot be executed). It owns
nothing else: no logging setup and no SODA imports but soda.netns (setns)
and soda.errors, which import nothing else, so that the drivers can run it
as a script without the site machinery (`-I -S`): it starts in ~10 ms
instead of ~50, on the way of every boot.
"""

import os
import sys

ADDR_NO_RANDOMIZE = 0x0040000
PERSONALITY_QUERY = 0xFFFFFFFF
USAGE = ("usage: python -m soda.hypervisors.launch [--hold] [--netns NAME] [--cgroup DIR]... "
         "[--no-aslr] [--log FILE] [--nofile N] [--user UID [--group GID]] "
         "[--fs-read PATH]... [--fs-write PATH]... -- ARGV...")
PR_SET_NO_NEW_PRIVS = 38
ID_MAX = 0xFFFFFFFE                  # (uid_t)-1 means "unchanged" to set*id: never a uid
GO = b"1"

# Landlock (linux/landlock.h): the syscalls, and the filesystem access rights
# by the ABI version that brought them.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1,        # execute .. make_sym
                    2: (1 << 14) - 1,        # + refer
                    3: (1 << 15) - 1,        # + truncate
                    5: (1 << 16) - 1}        # + ioctl on devices
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | 1 << 14 | 1 << 15
FS_READ_RIGHTS = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR


class LaunchError(Exception):
    pass


def parse(args: list[str]) -> dict:
    opts = {"netns": "", "cgroups": [], "no_aslr": False, "hold": False, "log": "", "argv": [],
            "nofile": None, "user": None, "group": None, "fs_read": [], "fs_write": []}
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
        if key not in ("--netns", "--cgroup", "--log", "--nofile", "--user", "--group",
                       "--fs-read", "--fs-write"):
            raise LaunchError(f"unknown argument {arg!r}\n{USAGE}")
        if not eq:
            if i + 1 >= len(args):
                raise LaunchError(f"{arg} needs a value\n{USAGE}")
            value = args[i + 1]
            i += 1
        i += 1
        if key == "--cgroup":
            opts["cgroups"].append(value)
        elif key in ("--fs-read", "--fs-write"):
            if not os.path.isabs(value):
                raise LaunchError(f"{key} takes an absolute path, not {value!r}\n{USAGE}")
            opts[key[2:].replace("-", "_")].append(value)
        elif key in ("--nofile", "--user", "--group"):
            opts[key[2:]] = _number(key, value)
        else:
            opts[key[2:]] = value
    if not opts["argv"]:
        raise LaunchError(f"nothing to run after --\n{USAGE}")
    if opts["group"] is not None and opts["user"] is None:
        raise LaunchError(f"--group needs --user\n{USAGE}")
    if opts["user"] is not None and opts["group"] is None:
        opts["group"] = opts["user"]
    if opts["netns"] and ("/" in opts["netns"] or opts["netns"] in (".", "..")):
        raise LaunchError(f"bad network namespace name {opts['netns']!r}")
    return opts


def _number(key: str, value: str) -> int:
    """A positive id or limit: root (0) is what --user gives up, and no
    limit of 0 open files lets anything run."""
    if not value.isdigit() or not 0 < int(value) <= ID_MAX:
        raise LaunchError(f"{key} takes a positive number, not {value!r}\n{USAGE}")
    return int(value)


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


def limit_open_files(n: int) -> None:
    import resource
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    except (OSError, ValueError) as e:
        raise LaunchError(f"cannot limit open files to {n}: {e}") from None


def drop_privileges(uid: int, gid: int) -> None:
    """Become uid:gid for good, with no capabilities and no way back."""
    # ctypes imported while still root: the interpreter's own files may be
    # out of the uid's reach (a pyenv under /root).
    _libc()
    try:
        os.setgroups([])
        os.setgid(gid)          # while still root: after setuid it is refused
        os.setuid(uid)          # real, effective and saved: no way back
    except OSError as e:
        raise LaunchError(f"cannot become uid {uid} gid {gid}: {e.strerror}") from None
    os.umask(0o077)
    set_no_new_privs()
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise LaunchError(f"still not uid {uid} gid {gid} alone after dropping privileges")
    left = {key: value for key, value in _status_fields("CapEff", "CapPrm", "NoNewPrivs").items()
            if (key == "NoNewPrivs") != (int(value, 16) != 0)}
    if left:
        raise LaunchError("privileges left after the drop to uid "
                          f"{uid}: {', '.join(f'{k} {v}' for k, v in sorted(left.items()))}")


def set_no_new_privs() -> None:
    """No exec from here on can gain privileges (setuid, file capabilities)."""
    ctypes, libc = _libc()
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise LaunchError(f"cannot set no_new_privs: {os.strerror(ctypes.get_errno())}")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where it has none (not built in,
    or not among the LSMs it runs)."""
    ctypes, libc = _libc()
    libc.syscall.restype = ctypes.c_long
    version = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                           ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(int(version), 0)


def confine_files(read: list[str], write: list[str]) -> None:
    """Refuse this process and what it execs every path but those beneath
    `read` (read and execute) and `write` (anything), for good."""
    abi = landlock_abi()
    if not abi:
        raise LaunchError("cannot confine the guest's files: this kernel has no Landlock "
                          "(CONFIG_SECURITY_LANDLOCK, and landlock in lsm=)")
    handled = FS_RIGHTS_BY_ABI[max(v for v in FS_RIGHTS_BY_ABI if v <= abi)]
    ctypes, libc = _libc()
    libc.syscall.restype = ctypes.c_long

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    # Only the handled_access_fs field: a kernel of a later ABI reads the
    # rest as zero (no network rights or scopes handled).
    ruleset_attr = ctypes.c_uint64(handled)
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(ruleset_attr),
                           ctypes.c_size_t(8), ctypes.c_uint32(0))
    if ruleset < 0:
        raise LaunchError(f"cannot make a Landlock ruleset: {os.strerror(ctypes.get_errno())}")
    try:
        for path, rights in [*((p, FS_READ_RIGHTS) for p in read),
                             *((p, handled) for p in write)]:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError as e:
                raise LaunchError(f"cannot confine the guest to {path}: {e.strerror}") from None
            try:
                if not os.path.isdir(f"/proc/self/fd/{fd}"):
                    rights &= FS_FILE_RIGHTS        # a file takes no directory rights
                rule = PathBeneath(rights & handled, fd)
                if libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                                ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                                ctypes.c_uint32(0)) < 0:
                    raise LaunchError(f"cannot allow {path} to the guest: "
                                      f"{os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
        # Landlock needs no_new_privs (or CAP_SYS_ADMIN): set here too for a
        # launch without --user.
        set_no_new_privs()
        if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) < 0:
            raise LaunchError(f"cannot confine the guest's files: "
                              f"{os.strerror(ctypes.get_errno())}")
    finally:
        os.close(ruleset)


def _status_fields(*keys: str) -> dict[str, str]:
    """Fields of /proc/self/status (missing ones as "0")."""
    found = dict.fromkeys(keys, "0")
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in found:
                    found[key] = value.strip()
    except OSError as e:
        raise LaunchError(f"cannot read /proc/self/status: {e.strerror}") from None
    return found


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
        if opts["nofile"] is not None:
            limit_open_files(opts["nofile"])
        if opts["user"] is not None:
            drop_privileges(opts["user"], opts["group"])
        if opts["fs_read"] or opts["fs_write"]:
            confine_files(opts["fs_read"], opts["fs_write"])
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
