"""QEMU guests end to end, beside UML guests on the same physical node:
Master, Daemon, one Agent offering `uml,qemu`, and the Switch as processes;
the guest network in a namespace this test creates. `sodactl service create
--hypervisor qemu` must boot a QEMU guest (TCG here) that serves through the
Switch, fenced in its cgroups, while a UML service runs next to it; delete
must leave nothing. Checked outside the code under test: HTTP through the
Switch, /proc, cgroup files, links, the Agent's state dir."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest

from soda.agent.network import short_name
from tests.support import free_port
from tests.system.cluster import wait_until
from tests.system.guests import _sweep_cgroups, alive, build_rootfs, fetch, ns_links, read

pytestmark = [pytest.mark.root, pytest.mark.guest]
CGROUP = "/sys/fs/cgroup"
NODE = "node-a"

if os.geteuid() != 0:
    pytest.skip("real guests need root (TAPs, namespaces, cgroups)", allow_module_level=True)
if not os.path.exists("/dev/net/tun"):
    pytest.skip("this kernel has no /dev/net/tun: guests cannot have a network",
                allow_module_level=True)
if not shutil.which("qemu-system-x86_64") or not glob.glob("/boot/vmlinuz-*"):
    pytest.skip("needs qemu-system-x86 and linux-image-amd64", allow_module_level=True)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    return build_rootfs(str(tmp_path_factory.mktemp("image")))


def records(cluster, hypervisor):
    root = os.path.join(cluster.agent_dir(NODE), hypervisor)
    found = {}
    if os.path.isdir(root):
        for name in os.listdir(root):
            path = os.path.join(root, name, "guest.json")
            if os.path.exists(path):
                with open(path) as f:
                    found[name] = json.load(f)
    return found


@pytest.fixture
def mixed_node(cluster, rootfs):
    tag = uuid.uuid4().hex[:6]
    netns, parent = f"sodas-{tag}", f"soda-test-{tag}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    pids_seen: set[int] = set()
    try:
        cluster.start_master()
        socket_path = cluster.start_daemon(NODE, netns, parent)
        cluster._spawn(NODE, [sys.executable, "-m", "soda.agent.main",
                              "--master", cluster.master_addr, "--name", NODE,
                              "--state-dir", cluster.agent_dir(NODE),
                              "--hypervisor", "uml,qemu", "--netns", netns,
                              "--daemon-socket", socket_path])
        cluster.start_switch()
        wait_until(lambda: cluster.ready_nodes() == [NODE], 30, what="the Agent to register")
        cluster.ctl("image", "push", rootfs, "--name", "busybox-httpd")
        cluster.netns, cluster.cgroup_parent, cluster.guest_pids = netns, parent, pids_seen
        yield cluster
    finally:
        try:
            for svc in cluster.json("service", "list"):
                cluster.ctl("service", "delete", svc["name"], "--wait", "--timeout", "60",
                            check=False)
        except Exception:  # noqa: BLE001 - teardown goes on whatever happened
            pass
        for hypervisor in ("uml", "qemu"):
            pids_seen.update(r["pid"] for r in records(cluster, hypervisor).values())
        cluster.close()
        for pid in pids_seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        _sweep_cgroups(parent)
        subprocess.run(["ip", "link", "del", short_name("su", netns)], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def _answers(url, name):
    try:
        return f"SODA virtual node {name}" in fetch(url, timeout=2)
    except OSError:
        return False


def test_qemu_and_uml_services_side_by_side(mixed_node):
    c = mixed_node
    qport, uport = free_port(), free_port()
    c.ctl("service", "create", "webq", "--image", "busybox-httpd", "--hypervisor", "qemu",
          "--nodes", "1", "--cpu", "1.0", "--memory", "128", "--switch", f"127.0.0.1:{qport}",
          "--wait", "--timeout", "240", timeout=300)
    c.ctl("service", "create", "webu", "--image", "busybox-httpd", "--hypervisor", "uml",
          "--nodes", "1", "--cpu", "0.5", "--memory", "64", "--switch", f"127.0.0.1:{uport}",
          "--wait", "--timeout", "120", timeout=180)
    qemu, uml = records(c, "qemu"), records(c, "uml")
    assert set(qemu) == {"webq-0"} and set(uml) == {"webu-0"}
    c.guest_pids.update([qemu["webq-0"]["pid"], uml["webu-0"]["pid"]])
    assert [v["phase"] for v in c.json("service", "get", "webq")["vnodes"]] == ["RUNNING"]

    wait_until(lambda: _answers(f"http://127.0.0.1:{qport}/", "webq-0"), 30,
               what="the Switch to serve webq")
    wait_until(lambda: _answers(f"http://127.0.0.1:{uport}/", "webu-0"), 30,
               what="the Switch to serve webu")

    # The QEMU guest is QEMU, in its own cgroups and the node's namespace.
    pid = qemu["webq-0"]["pid"]
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert os.path.basename(f.read().split(b"\0")[0].decode()) == "qemu-system-x86_64"
    for controller in ("cpu", "memory"):
        procs = os.path.join(CGROUP, controller, c.cgroup_parent, "webq-0", "cgroup.procs")
        assert str(pid) in read(procs).split()
    limit = int(read(os.path.join(CGROUP, "memory", c.cgroup_parent, "webq-0",
                                  "memory.limit_in_bytes")))
    assert limit > 128 << 20, "QEMU needs headroom above the guest's RAM"
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{c.netns}").st_ino
    base = os.path.join(c.agent_dir(NODE), "qemu", "webq-0", "overlay.qcow2")
    assert os.path.isfile(base)

    c.ctl("service", "delete", "webq", "--wait", "--timeout", "60", timeout=90)
    c.ctl("service", "delete", "webu", "--wait", "--timeout", "60", timeout=90)
    assert c.json("service", "list") == []
    assert not alive(pid) and not alive(uml["webu-0"]["pid"])
    assert records(c, "qemu") == {} and records(c, "uml") == {}
    assert [n for n in ns_links(c.netns) if n.startswith(("st", "ifb", "sf"))] == []
    leftovers = [e for e in os.listdir(os.path.join(c.agent_dir(NODE), "qemu"))
                 if not e.startswith("_")]
    assert leftovers == []
