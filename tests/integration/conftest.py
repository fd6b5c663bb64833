"""Shared fixtures of the root tier: a network namespace, TAPs, a cgroup
parent, each with a unique name and a cleanup that runs even when the test
fails.

Names carry the creating pytest process's pid ("sodat-<pid>-<rand>",
"soda-test-<pid>-<rand>"), so the sweep at session start and after each
test removes leftovers of dead runs only, never what a concurrent run is
using. Nothing here kills a process it cannot tie to a test: pids are
signalled only while they sit in a test's own cgroup.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time

import pytest

NETNS_PREFIX = "sodat-"
CGROUP_PREFIX = "soda-test-"
CGROUP_ROOT = "/sys/fs/cgroup"
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids")
# Hierarchies a test's cgroups may have dirs in (the freezer's where mounted).
V1_HIERARCHIES = V1_CONTROLLERS + ("freezer",)
_OWNED = re.compile(r"^(?:sodat-|soda-test-)(\d+)-[0-9a-f]+$")


def run(argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a command (argv, never a shell string); its output as text."""
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=timeout)


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}-{secrets.token_hex(3)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftover(name: str, prefix: str) -> bool:
    """A name of ours whose creating pytest process is gone."""
    m = _OWNED.match(name)
    return bool(m) and name.startswith(prefix) and not _pid_alive(int(m.group(1)))


# ---- network namespaces ----------------------------------------------------

def delete_netns(name: str) -> None:
    run(["ip", "netns", "del", name], check=False)


def sweep_netns() -> None:
    out = run(["ip", "netns", "list"], check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if _leftover(name, NETNS_PREFIX):
            delete_netns(name)


def make_tap(netns: str, name: str, up: bool = True) -> str:
    """A TAP device in `netns` (persistent, no process attached)."""
    run(["ip", "-n", netns, "tuntap", "add", "dev", name, "mode", "tap"])
    if up:
        run(["ip", "-n", netns, "link", "set", name, "up"])
    return name


def link_names(netns: str) -> list[str]:
    out = run(["ip", "-n", netns, "-j", "link", "show"]).stdout
    return [link["ifname"] for link in json.loads(out or "[]")]


# ---- cgroups -----------------------------------------------------------------

def _kill_members(directory: str) -> None:
    """SIGKILL what sits in a test's cgroup (pinned by pidfd, re-checked)."""
    procs = os.path.join(directory, "cgroup.procs")
    for _ in range(200):
        try:
            with open(procs) as f:
                pids = [int(p) for p in f.read().split()]
        except FileNotFoundError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                with open(procs) as f:
                    if str(pid) in f.read().split():
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finally:
                os.close(fd)
        # A task the v1 freezer holds dies only once thawed.
        if os.path.exists(os.path.join(directory, "freezer.state")):
            with open(os.path.join(directory, "freezer.state"), "w") as f:
                f.write("THAWED")
        time.sleep(0.02)


def remove_cgroup_parent(parent: str, root: str = CGROUP_ROOT) -> None:
    """Remove <root>/<controller>/<parent> and everything below it."""
    for controller in V1_HIERARCHIES:
        top = os.path.join(root, controller, parent)
        if not os.path.isdir(top):
            continue
        # Deepest first: a cgroup directory can only go once its children are gone.
        for dirpath, dirnames, _files in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
            _kill_members(dirpath)
            for _ in range(50):
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def sweep_cgroups(root: str = CGROUP_ROOT) -> None:
    for controller in V1_HIERARCHIES:
        base = os.path.join(root, controller)
        if not os.path.isdir(base):
            continue
        for name in os.listdir(base):
            if _leftover(name, CGROUP_PREFIX):
                remove_cgroup_parent(name, root)


def cgroup_v1_usable() -> bool:
    return all(os.path.isfile(os.path.join(CGROUP_ROOT, c, "cgroup.procs")) for c in V1_CONTROLLERS)


# ---- fixtures ----------------------------------------------------------------

@pytest.fixture(autouse=True)
def _root_only(request):
    if request.node.get_closest_marker("root") is None:
        return
    if os.geteuid() != 0:
        pytest.skip("needs root: creates network namespaces, cgroups and qdiscs")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("needs iproute2 (ip, tc) to check the kernel's state independently")


@pytest.fixture(scope="session", autouse=True)
def _sweep_leftovers():
    if os.geteuid() == 0 and shutil.which("ip"):
        sweep_netns()
        sweep_cgroups()
    yield


@pytest.fixture
def netns():
    """A fresh network namespace, deleted after the test."""
    name = unique(NETNS_PREFIX)
    run(["ip", "netns", "add", name])
    try:
        yield name
    finally:
        delete_netns(name)
        sweep_netns()


@pytest.fixture
def cgroup_parent():
    """A unique cgroup parent name, removed (with anything below) after the test."""
    if not cgroup_v1_usable():
        pytest.skip("needs cgroup v1 with cpu, cpuacct, memory and pids mounted under /sys/fs/cgroup")
    name = unique(CGROUP_PREFIX)
    try:
        yield name
    finally:
        remove_cgroup_parent(name)
        sweep_cgroups()
