"""The real soda-daemon process on a Unix socket, driven with DaemonClient:
fence a TAP in the test's namespace, survive a restart, stop on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from soda import errors
from soda.model.spec import Resources
from soda.rpc.daemon_client import DaemonClient

from tests.integration.conftest import CGROUP_ROOT, link_names, make_tap, run

pytestmark = pytest.mark.root

TAP = "tap-p0"


@pytest.fixture
def sock_dir():
    d = tempfile.mkdtemp(prefix="soda-dp-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_daemon(sock_dir, netns, cgroup_parent, tmp_path):
    """Start soda-daemon; every process started is stopped (by its own pid) at the end."""
    procs = []
    sock = os.path.join(sock_dir, "daemon.sock")

    def start(*extra: str):
        log = open(tmp_path / f"daemon-{len(procs)}.log", "w")
        argv = [sys.executable, "-m", "soda.daemon.main", "--socket", sock,
                "--cgroup-parent", cgroup_parent, "--netns", netns, "--log-level", "DEBUG", *extra]
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        procs.append(p)
        client = DaemonClient(sock, timeout=20)
        try:
            client.wait_ready(timeout=20)
        except errors.Unavailable:
            client.close()
            p.kill()
            p.wait()
            raise AssertionError("soda-daemon did not start:\n" +
                                 (tmp_path / f"daemon-{len(procs) - 1}.log").read_text())
        return p, client, sock
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def stop(p: subprocess.Popen, client: DaemonClient) -> int:
    client.close()
    p.send_signal(signal.SIGTERM)
    return p.wait(timeout=20)


def test_daemon_process_fences_restarts_and_stops(start_daemon, netns, cgroup_parent):
    make_tap(netns, TAP)
    p, client, sock = start_daemon()
    assert os.stat(sock).st_mode & 0o777 == 0o600

    fence = client.apply_limits("web-0", Resources(cpu=0.5, memory=64, bandwidth=10), "uml", 32,
                                tap=TAP, cpu_cap=True)
    cpu_dir = os.path.join(CGROUP_ROOT, "cpu", cgroup_parent, "web-0")
    assert cpu_dir in fence.cgroups
    with open(os.path.join(cpu_dir, "cpu.cfs_quota_us")) as f:
        assert f.read().strip() == "50000"
    assert fence.ifb in link_names(netns)
    classes = run(["ip", "netns", "exec", netns, "tc", "class", "show", "dev", TAP]).stdout
    assert "rate 10Mbit" in classes

    usage = client.usage("web-0")
    assert usage.memory_limit_bytes == (64 + 32) << 20

    # SIGTERM: exits 0 and takes its socket along; the fences stay.
    assert stop(p, client) == 0
    assert not os.path.exists(sock)
    assert os.path.isdir(cpu_dir)

    # A new Daemon finds the virtual node and changes it in place.
    p, client, sock = start_daemon()
    listed = client.list()
    assert [(f.name, f.tap, f.ifb, f.limits.rate_bit) for f in listed] == \
        [("web-0", TAP, fence.ifb, 10_000_000)]
    client.apply_limits("web-0", Resources(cpu=0.5, memory=64, bandwidth=30), "uml", 32, tap=TAP)
    classes = run(["ip", "netns", "exec", netns, "tc", "class", "show", "dev", TAP]).stdout
    assert "rate 30Mbit" in classes and classes.count("class htb 1:10") == 1
    with open(os.path.join(cpu_dir, "cpu.cfs_quota_us")) as f:
        assert f.read().strip() == "-1"

    released = client.release_limits("web-0")
    assert released.existed
    assert not os.path.exists(cpu_dir)
    assert fence.ifb not in link_names(netns) and TAP in link_names(netns)
    assert client.release_limits("web-0").existed is False
    with pytest.raises(errors.NotFound):
        client.usage("web-0")
    assert stop(p, client) == 0


def test_daemon_refuses_to_start_in_a_missing_netns(sock_dir, cgroup_parent):
    sock = os.path.join(sock_dir, "d.sock")
    out = subprocess.run([sys.executable, "-m", "soda.daemon.main", "--socket", sock,
                          "--cgroup-parent", cgroup_parent, "--netns", "sodat-no-such-ns"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "network namespace sodat-no-such-ns does not exist" in out.stderr
    assert not os.path.exists(sock)
    assert not os.path.exists("/run/netns/sodat-no-such-ns")


def test_daemon_rejects_an_unknown_config_key(sock_dir, tmp_path):
    cfg = tmp_path / "daemon.yaml"
    cfg.write_text("socket: /tmp/x.sock\nheadroom: {uml: 16}\n")
    out = subprocess.run([sys.executable, "-m", "soda.daemon.main", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "unknown key(s) headroom" in out.stderr
