"""SODA on a real host: a Debian VM with systemd as PID 1 on cgroup v2
(tests/system/nodevm.py), where scripts/install --role node installs SODA
from a copy of this checkout, systemd runs the Daemon and the Agent, and
the node joins a Master running on this host through the VM's network.

UML guests cannot boot inside the VM (a UML kernel does not offer its own
processes PTRACE_SYSEMU, which UML needs), QEMU guests can (TCG, in about 25 s): the node offers what
its drivers fingerprint as usable (qemu) and serves a real guest through a
Switch on this host, over host-gw routes to the VM. The Daemon's v2 fences
are measured on real processes standing in for a guest's
(tests/system/nodevm_probe.py, run inside the VM), which a test can load
and time exactly."""

from __future__ import annotations

import json
import os
import random
import secrets
import time

import pytest

from tests.support import free_port
from tests.system.cluster import Cluster, wait_until
from tests.system.guests import build_rootfs, fetch
from tests.system.nodevm import TOP, NodeVM, build

pytestmark = [pytest.mark.root, pytest.mark.cluster]

NODE = "vmnode"
UNITS = ("soda-daemon.service", "soda-agent.service")
PROBE = "/opt/soda/bin/python /root/soda/tests/system/nodevm_probe.py"
CHECKOUT_EXCLUDES = (".git", ".venv", "build", "__pycache__", "*.egg-info", ".pytest_cache")


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root (a TAP, the VM's network)")
    image_dir = build()
    prefix = f"snv{secrets.token_hex(2)}"
    node_vm = NodeVM(image_dir, prefix)
    try:
        node_vm.boot_seconds = node_vm.boot()
        yield node_vm
    finally:
        node_vm.close()


@pytest.fixture(scope="module")
def node(vm, tmp_path_factory):
    """The VM with SODA installed as a node (the operator's agent.yaml and
    certificate in place first), joined to a Master on this host."""
    cluster = Cluster(str(tmp_path_factory.mktemp("nodevm-cluster")), master_host=vm.host_ip)
    try:
        # A guest range of its own: this host routes it to the VM. The VM
        # runs under emulation: an Agent its watchdog restarts (6 s of hang,
        # RestartSec, Python starting under TCG) was seen silent for 10.3 s,
        # and a LOST node's guests are placed again. These tests prove that
        # restarts keep guests, not how soon silence is noticed.
        cluster.start_master("--cluster-cidr", f"10.{random.randrange(150, 200)}.0.0/16",
                             "--node-lost-seconds", "30")
        cluster.start_switch()
        tls = cluster.tls("agent", NODE)
        for name, path in (("ca.crt", tls.ca), (f"{NODE}.crt", tls.cert), (f"{NODE}.key", tls.key)):
            with open(path) as f:
                vm.write(f"/etc/soda/pki/{name}", f.read(), mode="600")
        vm.write("/etc/soda/agent.yaml", AGENT_YAML.format(master=cluster.master_addr, address=vm.ip))
        vm.copy_in(TOP, "/root/soda", *CHECKOUT_EXCLUDES)
        vm.copy_in(os.path.join(os.path.dirname(vm.image_dir), "wheels"), "/root/wheels")
        start = time.monotonic()
        vm.install = vm.ssh("/root/soda/scripts/install --role node --wheels /root/wheels", timeout=600)
        vm.install_seconds = time.monotonic() - start
        vm.cluster = cluster
        yield vm
    finally:
        cluster.close()


# An operator's edit of the shipped file: where the Master is and this
# node's certificate; the hypervisors are the default (what is usable here).
AGENT_YAML = """\
master: "{master}"
tls:
  ca: /etc/soda/pki/ca.crt
  cert: /etc/soda/pki/vmnode.crt
  key: /etc/soda/pki/vmnode.key
address: "{address}"
"""
SERVICE = "vmweb"
VNODE = f"{SERVICE}-0"


def probe(vm, *args: str) -> dict:
    return json.loads(vm.ssh(f"{PROBE} {' '.join(args)}", timeout=180).stdout.strip().splitlines()[-1])


def test_systemd_runs_the_node_on_cgroup_v2(node):
    controllers = node.ssh("cat /sys/fs/cgroup/cgroup.controllers").stdout.split()
    assert {"cpu", "memory", "pids"} <= set(controllers), controllers
    assert node.ssh("stat -f -c %T /sys/fs/cgroup").stdout.strip() == "cgroup2fs"
    assert node.ssh(f"systemctl is-active {' '.join(UNITS)}").stdout.split() == ["active", "active"]
    # Every unit SODA ships, the two a node does not run included (their
    # binaries are in /opt/soda too, and the soda user exists).
    for unit in ("soda-daemon", "soda-agent", "soda-master", "soda-switch"):
        result = node.ssh(f"systemd-analyze verify /root/soda/etc/systemd/{unit}.service", check=False)
        assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), \
            f"{unit}: {result.stdout}{result.stderr}"
    # The Daemon lives in a leaf of its delegated cgroup; nothing else is there.
    base = "/sys/fs/cgroup/system.slice/soda-daemon.service"
    pid = node.main_pid("soda-daemon.service")
    assert node.ssh(f"cat /proc/{pid}/cgroup").stdout.strip() == "0::/system.slice/soda-daemon.service/daemon"
    assert not node.ssh(f"cat {base}/cgroup.procs").stdout.strip()
    assert {"cpu", "memory", "pids"} <= set(node.ssh(f"cat {base}/cgroup.subtree_control").stdout.split())


def guest_vmm(node) -> int:
    """The pid of the QEMU process of the VM's guest, from its cgroup."""
    procs = node.ssh(f"cat /sys/fs/cgroup/system.slice/soda-daemon.service/soda/{VNODE}/cgroup.procs").stdout.split()
    pids = [int(p) for p in procs
            if node.ssh(f"cat /proc/{p}/comm", check=False).stdout.strip().startswith("qemu-system")]
    assert len(pids) == 1, procs
    return pids[0]


def answers(url: str) -> bool:
    try:
        return f"SODA virtual node {VNODE}" in fetch(url, timeout=5)
    except OSError:
        return False


@pytest.mark.timeout(600)
def test_node_joins_the_hosts_master_and_serves_a_real_guest_through_the_switch(node, tmp_path):
    c = node.cluster
    wait_until(lambda: NODE in c.ready_nodes(), 60, 0.5, what="the VM's node to be READY")
    (listed,) = [n for n in c.json("node", "list") if n["name"] == NODE]
    assert listed["address"] == node.ip
    assert listed["hypervisors"] == ["qemu"], listed      # the default: what fingerprints as usable
    c.ctl("image", "push", build_rootfs(str(tmp_path / "image")), "--name", "busybox-httpd")
    port = free_port()
    start = time.monotonic()
    c.ctl("service", "create", SERVICE, "--image", "busybox-httpd", "--hypervisor", "qemu",
          "--nodes", "1", "--cpu", "1.0", "--memory", "96", "--switch", f"127.0.0.1:{port}",
          "--wait", "--timeout", "400", timeout=450)
    node.guest_url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: answers(node.guest_url), 60, 1.0, what="the Switch to serve the VM's guest")
    print(f"QEMU guest in the node VM: created to served through the Switch in "
          f"{time.monotonic() - start:.1f} s")
    # The guest's VMM: in its fence below the Daemon's delegated cgroup, not root.
    pid = guest_vmm(node)
    status = node.ssh(f"grep -E '^(Uid|NoNewPrivs)' /proc/{pid}/status").stdout.split()
    assert status[1] != "0" and status[-1] == "1", status
    node.guest_pid = pid


def test_v2_fences_measured_on_stand_in_processes(node):
    split = probe(node, "split")
    half, one = split["shares"]
    print(f"cpu split 0.5:1.0 -> {half:.3f}:{one:.3f} (usage {split['usage']}, weights {split['weights']})")
    assert abs(half - 1 / 3) <= 0.02 and abs(one - 2 / 3) <= 0.02, split
    cap = probe(node, "cap")
    print(f"cpu.max {cap['cpu_max']} -> {cap['usage']:.3f} of a CPU")
    assert abs(cap["usage"] - 0.30) <= 0.02, cap
    memory = probe(node, "memory")
    print(f"memory hog: {memory}")
    assert memory["oom_kill"] >= 1 and memory["hog_returncode"] == -9, memory
    assert memory["calm_alive"] and memory["calm_oom_kill"] == 0, memory
    released = probe(node, "release", "probe-half", "probe-one", "probe-cap", "probe-hog", "probe-calm")
    assert all(r["existed"] and not r["cgroup_left"] and not r["pids_alive_after"] for r in released.values()), released
    # A release with processes left kills them through cgroup.kill.
    standin = probe(node, "standin", "probe-tree")
    assert len(standin["procs"]) == 3, standin
    released = probe(node, "release", "probe-tree")["probe-tree"]
    assert released["killed"] >= 1 and not released["pids_alive_after"] and not released["cgroup_left"], released


def test_restarts_keep_guests_and_the_watchdog_kills_a_hung_loop(node):
    """The real guest (not a stand-in: a restarted Agent releases fences
    the Master does not want) outlives every restart of both daemons."""
    guest = guest_vmm(node)

    def guest_kept():
        seen = probe(node, "check", VNODE, str(guest))
        assert seen["alive"] and seen["listed"], seen
        assert seen["proc_cgroup"] == f"0::/system.slice/soda-daemon.service/soda/{VNODE}", seen
        assert guest_vmm(node) == guest
        # Generous: the guest is QEMU under TCG inside the VM, which shares
        # the host with the suite's other runs.
        wait_until(lambda: answers(node.guest_url), 90, 1.0, what="the guest to serve")

    for unit in UNITS:
        before = node.main_pid(unit)
        node.ssh(f"kill -9 {before}")
        wait_until(lambda: node.main_pid(unit) not in (0, before)
                   and node.ssh(f"systemctl is-active {unit}", check=False).stdout.strip() == "active",
                   60, 0.5, what=f"systemd to restart {unit}")
        guest_kept()
    # The Agent adopted its guest again: the node is READY and the guest RUNNING.
    wait_until(lambda: NODE in node.cluster.ready_nodes(), 60, 0.5, what="the node READY again")
    assert [v["phase"] for v in node.cluster.json("service", "get", SERVICE)["vnodes"]] == ["RUNNING"]
    # A hung main loop: the watchdog thread stops pinging, systemd kills
    # and restarts the daemon.
    for unit in UNITS:
        node.write(f"/etc/systemd/system/{unit}.d/hang.conf",
                   "[Service]\nEnvironment=SODA_TEST_HANG_ON_SIGUSR2=1\nWatchdogSec=6\n")
    node.ssh("systemctl daemon-reload && systemctl restart " + " ".join(UNITS))
    try:
        for unit in UNITS:
            before, restarts = node.main_pid(unit), int(node.unit_property(unit, "NRestarts"))
            node.ssh(f"kill -USR2 {before}")
            wait_until(lambda: int(node.unit_property(unit, "NRestarts")) > restarts
                       and node.ssh(f"systemctl is-active {unit}", check=False).stdout.strip() == "active",
                       60, 0.5, what=f"the watchdog to restart {unit}")
            journal = node.ssh(f"journalctl -u {unit} --no-pager -n 200").stdout
            assert "Watchdog timeout" in journal, journal[-2000:]
            assert node.main_pid(unit) != before
        guest_kept()
    finally:
        node.ssh("rm -rf " + " ".join(f"/etc/systemd/system/{u}.d" for u in UNITS)
                 + " && systemctl daemon-reload")


def test_master_and_switch_run_hardened_as_soda(node):
    """The control and edge roles on the same VM: their units start them as
    the soda user, without privileges, and they serve (READY=1 reached
    systemd: `systemctl start` returned)."""
    c = node.cluster
    for role, name in (("master", "vmmaster"), ("switch", "vmswitch"), ("operator", "vmops")):
        tls = c.tls(role, name)
        for src, dst in ((tls.cert, f"{name}.crt"), (tls.key, f"{name}.key")):
            with open(src) as f:
                node.write(f"/etc/soda/pki/{dst}", f.read(), mode="640")
    node.ssh("chgrp soda /etc/soda/pki/ca.crt /etc/soda/pki/vmmaster.* /etc/soda/pki/vmswitch.* && "
             "chmod 640 /etc/soda/pki/ca.crt")
    tls_yaml = "tls:\n  ca: /etc/soda/pki/ca.crt\n  cert: /etc/soda/pki/{0}.crt\n  key: /etc/soda/pki/{0}.key\n"
    node.write("/etc/soda/master.yaml", tls_yaml.format("vmmaster"))
    node.write("/etc/soda/switch.yaml", tls_yaml.format("vmswitch"))
    node.ssh("/root/soda/scripts/install --role control --role edge --wheels /root/wheels", timeout=300)
    for unit in ("soda-master.service", "soda-switch.service"):
        pid = node.main_pid(unit)
        status = node.ssh(f"ps -o user= -p {pid}; grep -E '^(NoNewPrivs|CapEff)' /proc/{pid}/status").stdout
        user, *fields = status.splitlines()
        fields = dict(f.split(":") for f in fields)
        assert user.strip() == "soda" and fields["NoNewPrivs"].strip() == "1", status
        # The Master holds no capability; the Switch only the network's two.
        assert int(fields["CapEff"], 16) == (0 if "master" in unit else (1 << 12) | (1 << 10)), status
    env = ("SODA_CA=/etc/soda/pki/ca.crt SODA_CERT=/etc/soda/pki/vmops.crt "
           "SODA_KEY=/etc/soda/pki/vmops.key")
    assert json.loads(node.ssh(f"{env} sodactl --master 127.0.0.1:7070 -o json node list", timeout=60).stdout) == []
    metrics = node.ssh("/opt/soda/bin/python -c 'import urllib.request; print(urllib.request.urlopen("
                       "\"http://127.0.0.1:9470/metrics\").read().decode())'").stdout
    assert "soda_switch_" in metrics, metrics[:500]


def test_install_again_changes_nothing_and_keeps_the_operators_edit(node):
    pids = {u: node.main_pid(u) for u in UNITS}
    edited = node.ssh("sha256sum /etc/soda/agent.yaml").stdout
    again = node.ssh("/root/soda/scripts/install --role node --wheels /root/wheels", timeout=300)
    assert again.stderr.strip().splitlines()[-1] == "install: done: node: nothing to change", again.stderr
    assert {u: node.main_pid(u) for u in UNITS} == pids
    assert node.ssh("sha256sum /etc/soda/agent.yaml").stdout == edited
    assert "kept your edited /etc/soda/agent.yaml" in node.install.stderr
    assert node.ssh("test -f /etc/soda/agent.yaml.dist", check=False).returncode == 0


def test_uninstall_purge_leaves_nothing(node):
    c = node.cluster
    node.ssh("/root/soda/scripts/uninstall --purge", timeout=300)
    leftovers = node.ssh(
        "ls -d /opt/soda /etc/soda /var/lib/soda /var/cache/soda /run/soda /usr/local/bin/soda* "
        "/usr/local/lib/systemd/system/soda-* /sys/fs/cgroup/system.slice/soda-*.service 2>/dev/null;"
        "getent passwd soda; getent group soda; ip -o link show soda0 2>/dev/null;"
        "nft list tables | grep -i soda; ps -eo args | grep -E '^/opt/soda|soda-(agent|daemon)' | grep -v grep",
        check=False).stdout
    assert not leftovers.strip(), leftovers
    # The Master sees the node go.
    wait_until(lambda: NODE not in c.ready_nodes(), 60, 0.5, what="the node to be LOST")
