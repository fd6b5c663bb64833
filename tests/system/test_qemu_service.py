"""QEMU guests end to end: Master, Daemon, one Agent offering `uml,qemu`,
and the Switch as processes; the guest network in a namespace the test
creates.

- `sodactl service create --hypervisor qemu` boots a QEMU guest (TCG here)
  that serves through the Switch, fenced in its cgroups, while a UML
  service runs next to it on the same node; delete leaves nothing.
- One 2-node QEMU service, shared by the tests after that in file order:
  both virtual nodes answer through the Switch; a guest below the QEMU
  driver's minimum memory is refused at create; `kill -9` of the Agent and
  a restart adopt the running guests through QMP (same processes, state
  kept); a guest frozen with `sodactl service freeze` answers nothing,
  burns no CPU and keeps its memory charged, and counts on once thawed; `service delete --wait` leaves no process, overlay, QMP
  socket, TAP or cgroup.

Every result is read outside the code under test: HTTP (through the
Switch, or straight to a guest from inside the namespace), /proc, cgroup
files, `ip link`, the file system."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import time

import pytest

from soda.hypervisors.qemu import MIN_MEMORY as QEMU_MIN_MEMORY, QemuDriver
from soda.hypervisors.qmp import qmp
from tests.support import free_port
from tests.system.cluster import Cluster, wait_until
from tests.system.guests import require_guest_support
from tests.system.guests import (NODE, alive, fetch, guest_records,
                                 in_netns, ns_links, uml_node)

pytestmark = [pytest.mark.root, pytest.mark.guest]
VNODES = ("webq-0", "webq-1")
WINDOW = 2.0                  # s of CPU time measured, running and frozen

require_guest_support()
if not shutil.which("qemu-system-x86_64") or not glob.glob("/boot/vmlinuz-*"):
    pytest.skip("needs qemu-system-x86 and linux-image-amd64", allow_module_level=True)


@pytest.fixture
def mixed_node(cluster, rootfs):
    with uml_node(cluster, rootfs, hypervisors="qemu") as c:
        yield c


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
    qemu, uml = guest_records(c, hypervisor="qemu"), guest_records(c, hypervisor="uml")
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
        assert pid in c.cgroups.procs("webq-0", controller), controller
    limit = c.cgroups.memory_limit("webq-0")
    assert limit > 128 << 20, "QEMU needs headroom above the guest's RAM"
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{c.netns}").st_ino
    base = os.path.join(c.agent_dir(NODE), "qemu", "webq-0", "vmm", "overlay.qcow2")
    assert os.path.isfile(base)

    c.ctl("service", "delete", "webq", "--wait", "--timeout", "60", timeout=90)
    c.ctl("service", "delete", "webu", "--wait", "--timeout", "60", timeout=90)
    assert c.json("service", "list") == []
    assert not alive(pid) and not alive(uml["webu-0"]["pid"])
    assert guest_records(c, hypervisor="qemu") == {} and guest_records(c, hypervisor="uml") == {}
    assert [n for n in ns_links(c.netns) if n.startswith(("st", "ifb", "sf"))] == []
    leftovers = [e for e in os.listdir(os.path.join(c.agent_dir(NODE), "qemu"))
                 if not e.startswith("_")]
    assert leftovers == []


# ---- one 2-node QEMU service through its life ----------------------------------

@pytest.fixture(scope="module")
def qemu_service(tmp_path_factory, rootfs):
    """A node of its own and the service `webq`: 2 QEMU guests behind the
    Switch at `.url`; `.records` are the driver's records as it started."""
    cluster = Cluster(str(tmp_path_factory.mktemp("cluster")))
    try:
        with uml_node(cluster, rootfs, hypervisors="qemu") as c:
            port = free_port()
            c.ctl("service", "create", "webq", "--image", "busybox-httpd", "--hypervisor", "qemu",
                  "--nodes", "2", "--cpu", "0.5", "--memory", "128",
                  "--switch", f"127.0.0.1:{port}", "--wait", "--timeout", "240", timeout=300)
            c.url = f"http://127.0.0.1:{port}/"
            c.records = guest_records(c, hypervisor="qemu")
            c.guest_pids.update(r["pid"] for r in c.records.values())
            yield c
    finally:
        cluster.close()


def direct(c, vnode, path="/", timeout=5) -> str:
    """GET `path` from the guest itself (its address, inside the namespace)."""
    return in_netns(c.netns, ["curl", "-sS", "--max-time", str(timeout), guest_url(c, vnode) + path],
                    timeout=timeout + 10).stdout


def counter(c, vnode) -> int:
    return int(direct(c, vnode, "/cgi-bin/counter").strip())


def phases(c):
    return [v["phase"] for v in c.json("service", "get", "webq")["vnodes"]]


def identity(pid):
    """(start time, executable) of a live process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        starttime = int(f.read().rsplit(")", 1)[1].split()[19])
    return starttime, os.path.basename(os.readlink(f"/proc/{pid}/exe"))


def cpu_seconds(c, vnode) -> float:
    """CPU time of everything in the guest's cgroup (the QEMU process and
    its threads), from the kernel's cpuacct counter."""
    return c.cgroups.cpu_seconds(vnode)


def test_both_qemu_guests_answer_through_the_switch(qemu_service):
    c = qemu_service
    assert set(c.records) == set(VNODES)
    assert phases(c) == ["RUNNING", "RUNNING"]
    for vnode, record in c.records.items():
        assert identity(record["pid"])[1] == "qemu-system-x86_64"
        for controller in ("cpu", "cpuacct", "memory"):
            assert record["pid"] in c.cgroups.procs(vnode, controller), controller
    seen = set()

    def both_answered():
        try:
            page = fetch(c.url, timeout=3)
        except OSError:
            return False
        seen.update(v for v in VNODES if f"SODA virtual node {v} " in page)
        return seen == set(VNODES)
    wait_until(both_answered, 60, what="both QEMU guests to answer through the Switch")


def test_a_qemu_guest_below_the_drivers_minimum_memory_is_refused_at_create(qemu_service):
    c = qemu_service
    r = c.ctl("service", "create", "tinyq", "--image", "busybox-httpd", "--hypervisor", "qemu",
              "--nodes", "1", "--memory", str(QEMU_MIN_MEMORY - 32), check=False)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert f"minimum of {QEMU_MIN_MEMORY} MiB for qemu" in r.stderr, r.stderr
    assert [s["name"] for s in c.json("service", "list")] == ["webq"]


def test_agent_kill_9_then_restart_adopts_the_qemu_guests_through_qmp(qemu_service):
    c = qemu_service
    before = {v: (r["pid"], identity(r["pid"])) for v, r in c.records.items()}
    counts = {v: counter(c, v) for v in VNODES}
    c.kill(NODE, signal.SIGKILL)
    # The guests do not depend on their Agent.
    assert all(alive(pid) for pid, _ in before.values())
    assert "SODA virtual node" in fetch(c.url, timeout=5)

    offset = len(c.log(NODE))           # the restarted Agent appends to the same log
    reported = _cpu_reported(c)
    c.restart_agent()
    wait_until(lambda: "desired set from the Master: 2 virtual node(s)" in c.log(NODE)[offset:], 60,
               what="the restarted Agent to get its assignments")
    # Fresh usage figures in the Master come from the new Agent's heartbeats.
    wait_until(lambda: _cpu_reported(c) > reported and phases(c) == ["RUNNING", "RUNNING"], 60,
               what="the restarted Agent to report its guests RUNNING")
    new_log = c.log(NODE)[offset:]
    assert "booted in" not in new_log and " stopped" not in new_log, new_log
    after = guest_records(c, hypervisor="qemu")
    assert {v: (r["pid"], identity(r["pid"])) for v, r in after.items()} == before
    for vnode, record in after.items():
        # QMP still answers on the socket the guest was started with, and
        # the guest was not rebooted: its in-memory counter counts on.
        assert qmp(record["qmp"], "query-status")["status"] == "running"
        assert counter(c, vnode) == counts[vnode] + 1
    wait_until(lambda: "SODA virtual node" in fetch(c.url, timeout=5), 30,
               what="the Switch to serve after the Agent restart")


def _cpu_reported(c) -> float:
    """CPU seconds of the service's guests as the Agent last reported them."""
    return sum((v["usage"] or {}).get("cpu_seconds", 0.0)
               for v in c.json("service", "get", "webq")["vnodes"])


def test_frozen_guest_answers_nothing_burns_no_cpu_and_counts_on_when_thawed(qemu_service):
    c = qemu_service
    # Frozen and thawed with sodactl; the VM's own state is read from QMP
    # through its recorded socket, outside the Agent.
    driver = QemuDriver(c.agent_dir(NODE), accel="tcg")
    vnode, other = VNODES
    pid = c.records[vnode]["pid"]
    start = counter(c, vnode)
    # A guest process spinning its CPU: frozen, even that must cost nothing.
    burn = subprocess.Popen(["ip", "netns", "exec", c.netns, "curl", "-sS", "--max-time", "120",
                             f"{guest_url(c, vnode)}/cgi-bin/burn?seconds=4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        running_cpu = cpu_over(c, vnode, WINDOW)
        memory_before = c.cgroups.memory_usage(vnode)
        c.ctl("service", "freeze", "webq", "--vnode", vnode, "--wait", "--timeout", "60", timeout=90)
        try:
            assert driver.status(vnode) == "paused"
            assert phases(c) == ["FROZEN", "RUNNING"]
            frozen_cpu = cpu_over(c, vnode, 2 * WINDOW)
            memory_frozen = c.cgroups.memory_usage(vnode)
            # curl exits 28 when its --max-time runs out: no answer at all.
            r = in_netns(c.netns, ["curl", "-sS", "--max-time", "3",
                                   f"{guest_url(c, vnode)}/cgi-bin/counter"], check=False)
            assert r.returncode == 28, (r.returncode, r.stdout, r.stderr)
            # Its neighbour is not frozen, and the process is the same one.
            assert counter(c, other) >= 1
            assert alive(pid)
        finally:
            c.ctl("service", "thaw", "webq", "--vnode", vnode, "--wait", "--timeout", "60", timeout=90)
        out, err = burn.communicate(timeout=60)
    finally:
        if burn.poll() is None:
            burn.kill()
            burn.wait()
    print(f"\n{vnode} (spinning): CPU over {WINDOW:g} s running {running_cpu * 1000:.0f} ms; over "
          f"{2 * WINDOW:g} s frozen {frozen_cpu * 1000:.1f} ms ({100 * frozen_cpu / (2 * WINDOW):.3f} % "
          f"of a core); memory charged {memory_before >> 20} MiB before, {memory_frozen >> 20} MiB frozen")
    # Generous: other tests may load this 2-core machine; 1.3 s was seen alone.
    assert running_cpu > 0.1 * WINDOW, f"the burn did not load the guest ({running_cpu:.3f} s)"
    assert frozen_cpu < 0.005 * 2 * WINDOW, f"a frozen guest used {frozen_cpu:.3f} s of CPU"
    assert memory_frozen >= 0.9 * memory_before, (memory_before, memory_frozen)
    assert driver.status(vnode) == "running"
    # Thawed, the spinning request finishes and the guest's memory is
    # intact: the counter counts on (a reboot would start it again at 1).
    assert out.strip() == "burned 4", (out, err)
    assert counter(c, vnode) == start + 1
    assert alive(pid) and guest_records(c, hypervisor="qemu")[vnode]["pid"] == pid
    assert phases(c) == ["RUNNING", "RUNNING"]


def guest_url(c, vnode) -> str:
    spec = c.records[vnode]["spec"]
    return f"http://{spec['address']}:{spec['port']}"


def cpu_over(c, vnode, seconds) -> float:
    """CPU seconds the guest's cgroup used over `seconds` of wall time."""
    before = cpu_seconds(c, vnode)
    time.sleep(seconds)
    return cpu_seconds(c, vnode) - before


def test_delete_wait_leaves_no_process_overlay_socket_tap_or_cgroup(qemu_service):
    c = qemu_service
    records = guest_records(c, hypervisor="qemu")
    assert set(records) == set(VNODES)
    pids = [r["pid"] for r in records.values()]
    taps = [r["spec"]["tap"] for r in records.values()]
    files = [os.path.join(os.path.dirname(r["qmp"]), "overlay.qcow2") for r in records.values()]
    sockets = [r["qmp"] for r in records.values()]
    cgroups = [d for r in records.values() for d in r["spec"]["cgroups"]]
    assert all(taps) and all(os.path.exists(p) for p in files + sockets + cgroups)
    assert set(taps) <= ns_links(c.netns)

    c.ctl("service", "delete", "webq", "--wait", "--timeout", "60", timeout=90)

    assert c.json("service", "list") == []
    assert [p for p in pids if alive(p)] == []
    assert [p for p in files + sockets if os.path.exists(p)] == []
    assert [t for t in taps if t in ns_links(c.netns)] == []
    assert [n for n in ns_links(c.netns) if n.startswith(("st", "ifb", "sf"))] == []
    assert [d for d in cgroups if os.path.exists(d)] == []
    for vnode in VNODES:
        assert c.cgroups.dirs(vnode) == [], vnode
    state = os.path.join(c.agent_dir(NODE), "qemu")
    assert [e for e in os.listdir(state) if not e.startswith("_")] == []
    assert glob.glob(os.path.join(state, "**", "*.qcow2"), recursive=True) == []
