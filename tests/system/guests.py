"""One physical node with real User-Mode Linux guests, for system tests:
Master, Daemon, Agent and Switch as processes, the guest network in a
namespace the test creates, and a teardown that removes everything it made
(guest pids the Agent recorded, the cgroups below the test's own parent in
every hierarchy, the namespace and its uplink), even when the test failed.
Also the small readers tests use to check results outside the code under
test: cgroup files, `tc`, links, and HTTP from inside the namespace."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import urllib.request
import uuid

import pytest

from soda.agent.network import short_name
from tests.system.cgroupfs import VnodeCgroups
from tests.system.cluster import wait_until

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NODE = "node-a"


def require_guest_support() -> None:
    """Skip the calling test module where guests truly cannot run here."""
    if os.geteuid() != 0:
        pytest.skip("real guests need root (TAPs, namespaces, cgroups)", allow_module_level=True)
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("this kernel has no /dev/net/tun: guests cannot have a network",
                    allow_module_level=True)


HOSTILE_IMAGE = os.path.join(TOP, "tests", "guest-images", "hostile")


def build_rootfs(directory: str, overlay: str = "") -> str:
    """The reference image in `directory`; with `overlay`, that tree copied
    over its root (e.g. HOSTILE_IMAGE: tests/guest-images/README)."""
    out = os.path.join(directory, "rootfs.img")
    argv = [os.path.join(TOP, "scripts", "build-rootfs"), out]
    if overlay:
        argv += ["--overlay", overlay]
    subprocess.run(argv, check=True, capture_output=True)
    return out


def app_image(base: str, out: str, files: dict[str, bytes]) -> str:
    """A copy of the image `base` with `files` (path in the image -> content)
    written into its filesystem by debugfs, as an ASP makes an application
    image from a base image: only the blocks those files touch change."""
    shutil.copyfile(base, out)
    with tempfile.TemporaryDirectory() as scratch:
        commands = []
        for n, (dest, content) in enumerate(files.items()):
            local = os.path.join(scratch, str(n))
            with open(local, "wb") as f:
                f.write(content)
            commands += [f"rm {dest}", f"write {local} {dest}", f"sif {dest} mode 0100644"]
        script = os.path.join(scratch, "commands")
        with open(script, "w") as f:
            f.write("\n".join(commands) + "\n")
        debugfs = shutil.which("debugfs") or "/sbin/debugfs"
        subprocess.run([debugfs, "-w", "-f", script, out], check=True, capture_output=True)
    return out


def guest_run(netns: str, address: str, command: str, timeout: float = 60) -> str:
    """`command` run with sh as root inside a guest of the hostile image
    (its /cgi-bin/run), asked from inside the test's namespace; its output."""
    from urllib.parse import quote
    return curl(netns, f"http://{address}/cgi-bin/run?{quote(command, safe='')}", timeout=timeout)


def read(path):
    with open(path) as f:
        return f.read().strip()


def htb_rates(netns, dev):
    """The HTB class rates tc reports for `dev` (this iproute2 prints HTB
    classes as text even with -j)."""
    out = subprocess.run(["ip", "netns", "exec", netns, "tc", "class", "show", "dev", dev],
                         capture_output=True, text=True, check=True).stdout
    return re.findall(r"class htb \S+ .*?rate (\S+)", out)


def qdiscs(netns):
    """(device, kind, handle) of every qdisc in the namespace, from `tc -j`."""
    out = subprocess.run(["ip", "netns", "exec", netns, "tc", "-j", "qdisc", "show"],
                         capture_output=True, text=True, check=True).stdout
    return [(q["dev"], q["kind"], q["handle"]) for q in json.loads(out or "[]")]


def ns_links(netns):
    out = subprocess.run(["ip", "-j", "-n", netns, "link", "show"], capture_output=True, text=True, check=True)
    return {link["ifname"] for link in json.loads(out.stdout)}


def guest_records(cluster, agent=NODE, hypervisor="uml"):
    """pid and argv of every guest the Agent's driver (UML by default) recorded."""
    root = os.path.join(cluster.agent_dir(agent), hypervisor)
    found = {}
    if os.path.isdir(root):
        for name in os.listdir(root):
            path = os.path.join(root, name, "guest.json")
            if os.path.exists(path):
                with open(path) as f:
                    found[name] = json.load(f)
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def fetch(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def in_netns(netns, argv, timeout=120, check=True) -> subprocess.CompletedProcess:
    """Run `argv` inside the test's namespace (traffic to guests stays there);
    "" is the root namespace (a fabric cluster's Switch host)."""
    return subprocess.run([*(["ip", "netns", "exec", netns] if netns else []), *argv],
                          capture_output=True, text=True, timeout=timeout, check=check)


def curl(netns, url, *extra, timeout=120) -> str:
    return in_netns(netns, ["curl", "-sS", "--max-time", str(timeout), *extra, url],
                    timeout=timeout + 10).stdout


def vnode_cgroups(cluster, controller="cpu"):
    """Names of the cgroup directories below the test's parent (one per
    fenced virtual node)."""
    return cluster.cgroups.names(controller)


def _sweep_cgroups(parent):
    """Kill what is left below `parent` in every hierarchy, then remove it,
    deepest first."""
    for top in VnodeCgroups(parent.split("/")[0]).leftovers():
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
            procs = os.path.join(dirpath, "cgroup.procs")
            if os.path.exists(procs):
                for pid in read(procs).split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                # A task the v1 freezer holds dies only once thawed.
                state = os.path.join(dirpath, "freezer.state")
                if os.path.exists(state):
                    with open(state, "w") as f:
                        f.write("THAWED")
                wait_until(lambda: not read(procs), 10, what=f"{dirpath} to empty")
            os.rmdir(dirpath)


@contextlib.contextmanager
def uml_node(cluster, rootfs, daemon_config: str = "", hypervisors: str = "uml",
             agent_config: str = ""):
    """The running cluster, with .netns, .cgroup_parent, .guest_pids (add
    the pid of every guest you see), .restart_daemon() and .restart_agent().
    `daemon_config`: extra YAML for the Daemon (e.g. 'cpuset: "0"');
    `hypervisors`: the drivers the Agent offers besides uml (e.g. "qemu");
    `agent_config`: YAML for the Agent (e.g. 'drivers: {uml: {kernel: /usr/bin/linux.uml}}')."""
    tag = uuid.uuid4().hex[:6]
    netns, parent = f"sodas-{tag}", f"soda-test-{tag}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    pids_seen: set[int] = set()
    daemon_args: list[str] = []
    if daemon_config:
        path = os.path.join(cluster.root, "daemon.yaml")
        with open(path, "w") as f:
            f.write(daemon_config + "\n")
        daemon_args = ["--config", path]
    try:
        # A range of its own: the node's uplink routes its /24 on the host,
        # and two clusters with the same range (concurrent runs) would steal
        # each other's guest traffic.
        cluster.start_master("--cluster-cidr", f"10.{100 + int(tag, 16) % 100}.0.0/16")
        socket_path = cluster.start_daemon(NODE, netns, parent, *daemon_args)
        agent_args = ["--hypervisor", hypervisors]
        if agent_config:
            path = os.path.join(cluster.root, "agent.yaml")
            with open(path, "w") as f:
                f.write(agent_config + "\n")
            agent_args += ["--config", path]
        cluster.start_real_agent(NODE, netns, socket_path, *agent_args)
        cluster.start_switch()
        wait_until(lambda: cluster.ready_nodes() == [NODE], 30, what="the Agent to register")
        cluster.ctl("image", "push", rootfs, "--name", "busybox-httpd")
        cluster.netns, cluster.cgroup_parent = netns, parent
        cluster.cgroups = VnodeCgroups(parent)
        cluster.guest_pids = pids_seen
        cluster.daemon_socket = socket_path
        cluster.restart_daemon = lambda: cluster.start_daemon(NODE, netns, parent, *daemon_args)
        cluster.restart_agent = lambda: cluster.start_real_agent(NODE, netns, socket_path, *agent_args)
        yield cluster
    finally:
        try:
            for svc in cluster.json("service", "list"):
                cluster.ctl("service", "delete", svc["name"], "--wait", "--timeout", "60", check=False)
        except Exception:  # noqa: BLE001 - teardown goes on whatever happened
            pass
        for hypervisor in ("uml", "qemu"):
            for record in guest_records(cluster, hypervisor=hypervisor).values():
                pids_seen.add(record["pid"])
        cluster.close()
        # Only pids this test's Agent recorded; then the cgroups and namespace it made.
        for pid in pids_seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        _sweep_cgroups(parent)
        subprocess.run(["ip", "link", "del", short_name("su", netns)], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
