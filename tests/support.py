"""Helpers shared by every test tier: images, free ports, the tests' PKI,
in-process Master."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import socket
import stat
import struct
import tempfile
from typing import Iterator

from soda import config as soda_config

EXT4_MAGIC_OFFSET = 1024 + 56


def make_ext4_image(path: str, size: int = 4 << 20, *, data: bytes = b"") -> str:
    """A file whose ext4 superblock is valid enough for the Master's checks
    (magic, block count matching the size). mkfs.ext4 is not needed, so unit
    tests run anywhere; `data` is written after the superblock to vary the digest."""
    with open(path, "wb") as f:
        f.truncate(size)
        sb = bytearray(1024)
        struct.pack_into("<I", sb, 4, size // 4096)   # s_blocks_count_lo
        struct.pack_into("<I", sb, 24, 2)             # s_log_block_size: 4096
        struct.pack_into("<H", sb, 56, 0xEF53)        # s_magic
        f.seek(1024)
        f.write(sb)
        if data:
            f.seek(4096)
            f.write(data)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=None)
def cluster_ca():
    """One cluster CA for this test process (soda.pki), removed at exit:
    every in-process Master of the tests serves mutual TLS with it."""
    from soda import pki
    path = tempfile.mkdtemp(prefix="soda-test-pki-")
    atexit.register(shutil.rmtree, path, True)
    ca = pki.CertificateAuthority(os.path.join(path, "ca"))
    ca.init("tests")
    return ca


@functools.lru_cache(maxsize=None)
def tls_for(role: str = "operator", name: str = "tests") -> soda_config.TlsConfig:
    """The TLS files of ROLE NAME, issued once per test process by cluster_ca()."""
    ca = cluster_ca()
    ca.issue(role, name, hosts=["127.0.0.1", "localhost"] if role == "master" else ())
    return ca.tls(role, name)


def master_client(target: str, role: str = "operator", name: str = "tests", **kwargs):
    """A MasterClient of the tests' ROLE NAME (an operator unless told)."""
    from soda.rpc.client import MasterClient
    return MasterClient(target, tls=tls_for(role, name), **kwargs)


def master_channel(target: str, role: str = "operator", name: str = "tests"):
    """A raw gRPC channel to a Master of the tests, as ROLE NAME."""
    from soda.rpc import tls
    return tls.channel(target, tls.read(tls_for(role, name)))


def master_config(state_dir: str, **overrides) -> soda_config.MasterConfig:
    """An in-process Master's config: TLS with the tests' CA unless told
    (insecure=True for plaintext on loopback)."""
    if not overrides.get("insecure"):
        overrides.setdefault("tls", tls_for("master", "m1"))
        overrides.setdefault("crl", cluster_ca().file("crl.pem"))
    overrides.setdefault("listen", "127.0.0.1:0")
    return soda_config.MasterConfig(state_dir=state_dir, **overrides)


def start_master(state_dir: str, **overrides):
    """An in-process Master on a free port; returns (server, target)."""
    from soda.master.main import MasterServer
    os.makedirs(state_dir, exist_ok=True)
    server = MasterServer(master_config(state_dir, **overrides))
    server.start()
    return server, f"127.0.0.1:{server.port}"


# What Debian's 6.1 UML kernel says when it cannot run a process on this
# CPU: its FP register buffer is smaller than the XSAVE area of a CPU with
# AMX (SODA's own kernel is patched: etc/guest-kernel/patches/0001).
DEBIAN_KERNEL_XSAVE_FAILURE = "ptrace set fp regs failed"


def skip_where_debians_kernel_cannot_run(output: str) -> None:
    """Skip the test, saying why, if `output` (a console, an error) shows
    Debian's UML kernel failing at this CPU's XSAVE area."""
    import pytest
    if DEBIAN_KERNEL_XSAVE_FAILURE in output:
        pytest.skip("Debian's UML kernel cannot run processes on this CPU (ptrace set fp regs: "
                    "its XSAVE area is larger than the kernel's buffer)")


def cpu_ticks(*pids: int) -> int:
    """The CPU time (clock ticks, user and system) processes have used, read
    from /proc/PID/stat; a process that is gone counts nothing."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])          # utime, stime
    return total


def peak_rss_mib(pid: int) -> float:
    """The kernel's high-water mark of a process's resident memory (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no VmHWM for pid {pid}")


def reachable_dir(prefix: str) -> str:
    """A new directory under /tmp that guests' uids may traverse (0711), for
    a test's state: guests' VMMs run as uids of their own (soda.agent.uids)
    and must reach their files below it. Not under pytest's tmp dirs:
    pytest makes them 0700 again at every session start, which would close
    them under the guests of a run already going. The caller removes it."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(path, 0o711)
    return path


@contextlib.contextmanager
def reachable_tmp_dir(prefix: str) -> Iterator[str]:
    """`reachable_dir(prefix)`, removed with everything below it at exit."""
    path = reachable_dir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def traversable(path: str) -> str:
    """`path`, made if missing, with every directory on its way open to
    traversal by others (o+x, never o+r or o+w): guests' VMMs run as
    uids of their own (soda.agent.uids) and must reach their files under a
    test's state dir, and pytest makes its tmp dirs 0700."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    current = path
    while current != "/":
        mode = stat.S_IMODE(os.stat(current).st_mode)
        if not mode & stat.S_IXOTH:
            os.chmod(current, mode | stat.S_IXOTH)
        current = os.path.dirname(current)
    return path
