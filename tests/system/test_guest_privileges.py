"""Guests are hostile: their VMMs run unprivileged, and a guest
of Debian's UML kernel cannot see the host's files through hostfs.

- Two UML services on one node: every process of every guest (found from
  the guest's pids cgroup, not from the driver's records) runs as a
  non-zero uid, the same for the two virtual nodes of one service and
  different between the services, with no capabilities, `NoNewPrivs: 1`
  and the configured open-files limit; the disk layer is that uid's alone
  (0600) over a root-owned read-only base; the guests still serve (their
  TAPs are theirs to open), change memory live (mconsole: root talks to
  the uid's socket, the uid answers root's), survive an Agent restart and
  stop, leaving no process of their uids behind.
- A QEMU guest likewise, with its -sandbox on its command line when the
  driver's probe found this QEMU has it.
- With Debian's kernel (which has hostfs), `mount -t hostfs none /mnt` as
  root in the hostile image shows an empty directory, not the host's /.
  Debian's hostfs appends the mount option to that root unchecked, so
  `-o ../../..` climbs out of it: the VMM's Landlock confinement leaves it
  nothing there to read (the host's / cannot be listed, /etc/passwd and
  the Agent's state not opened).

Every result is read from /proc, the cgroup files, `stat` and HTTP."""

from __future__ import annotations

import glob
import os
import shutil
import stat

import pytest

from soda.hypervisors.launch import landlock_abi

from tests.support import skip_where_debians_kernel_cannot_run
from tests.system.cluster import wait_until
from tests.system.guests import (NODE, curl, guest_run, require_guest_support,
                                 uml_node)

pytestmark = [pytest.mark.root, pytest.mark.guest]

require_guest_support()

OPEN_FILES = 700               # not a default anywhere: seen only if the Agent set it
AGENT_CONFIG = f"guest_open_files: {OPEN_FILES}"


def create(c, name, *args, hypervisor="uml", timeout=120):
    c.ctl("service", "create", name, "--image", "busybox-httpd", "--hypervisor", hypervisor,
          "--cpu", "0.25", *args,
          "--wait", "--timeout", str(timeout), timeout=timeout + 60)
    svc = c.json("service", "get", name)
    return {v["name"]: v["address"] for v in svc["vnodes"]}


def vmm_pids(c, vnode) -> list[int]:
    """Every process of the guest: what its pids cgroup holds."""
    pids = sorted(c.cgroups.procs(vnode, "pids"))
    c.guest_pids.update(pids)
    return pids


def main_pid(c, vnode) -> int:
    """The guest's VMM itself: the one process of its cgroup whose parent
    is outside it (UML's helpers and guest processes are its children)."""
    pids = vmm_pids(c, vnode)
    roots = [p for p in pids if int(proc_status(p)["PPid"]) not in pids]
    assert len(roots) == 1, f"{vnode}: processes {pids}, roots {roots}"
    return roots[0]


def proc_status(pid) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def open_files_limit(pid) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return soft, hard
    raise AssertionError(f"no open-files limit in /proc/{pid}/limits")


def unprivileged_uid(pids) -> int:
    """The one uid all `pids` run as, after checking each is unprivileged."""
    uids = set()
    for pid in pids:
        status = proc_status(pid)
        real, effective, saved, fs = map(int, status["Uid"].split())
        assert real == effective == saved == fs != 0, f"pid {pid}: Uid {status['Uid']}"
        assert set(map(int, status["Gid"].split())) == {real}, f"pid {pid}: Gid {status['Gid']}"
        assert status["Groups"] == "", f"pid {pid}: groups {status['Groups']}"
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
        assert status["NoNewPrivs"] == "1"
        assert open_files_limit(pid) == (str(OPEN_FILES), str(OPEN_FILES))
        uids.add(real)
    assert len(uids) == 1, f"one guest's processes run as several uids: {uids}"
    return uids.pop()


def processes_of(uid) -> list[int]:
    """Live processes of `uid` (not zombies: an adopted guest's VMM is
    init's child once the Agent that started it is gone, and init reaps
    in its own time)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid and \
                        proc_status(entry)["State"][0] not in "ZX":
                    found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return found


def test_uml_guests_run_as_a_uid_per_service_with_no_privileges(cluster, rootfs):
    with uml_node(cluster, rootfs, agent_config=AGENT_CONFIG) as c:
        pa = create(c, "pa", "--nodes", "2", "--memory", "64")
        pb = create(c, "pb", "--nodes", "1", "--memory", "64")
        uid = {v: unprivileged_uid(vmm_pids(c, v)) for v in (*pa, *pb)}
        assert uid["pa-0"] == uid["pa-1"] != uid["pb-0"], uid
        assert all(len(vmm_pids(c, v)) >= 2 for v in uid)      # UML's helpers too
        print(f"uids: {uid}")

        # The guest's disk layer is its uid's alone, over root's read-only base.
        for vnode in uid:
            cow = os.stat(os.path.join(c.agent_dir(NODE), "uml", vnode, "vmm", "cow.img"))
            assert (cow.st_uid, stat.S_IMODE(cow.st_mode)) == (uid[vnode], 0o600)
        with open(f"/proc/{main_pid(c, 'pa-0')}/cmdline", "rb") as f:
            ubd0 = next(a for a in f.read().decode().split("\0") if a.startswith("ubd0="))
        base = os.stat(ubd0.split(",")[1])
        assert (base.st_uid, stat.S_IMODE(base.st_mode)) == (0, 0o444)

        # They serve: the unprivileged VMM opened the TAP it owns.
        for vnode, address in {**pa, **pb}.items():
            assert f"SODA virtual node {vnode}" in curl(c.netns, f"http://{address}/", timeout=10)

        # mconsole both ways (the guest's free memory asked, then 16 MiB
        # taken back): live, the same process, its fence 16 MiB lower.
        limit, vmm = c.cgroups.memory_limit("pb-0"), main_pid(c, "pb-0")
        c.ctl("service", "resize", "pb", "--memory", "48", "--wait", "--timeout", "60", timeout=90)
        wait_until(lambda: c.cgroups.memory_limit("pb-0") == limit - (16 << 20), 15,
                   what="the memory limit to drop by 16 MiB")
        assert main_pid(c, "pb-0") == vmm
        assert c.json("service", "get", "pb")["vnodes"][0]["reason"] == ""

        # An Agent restart adopts them (same processes, same uids), and a
        # new guest of a service that has one here gets the same uid.
        before = {v: main_pid(c, v) for v in uid}
        c.kill(NODE)
        c.restart_agent()
        wait_until(lambda: c.ready_nodes() == [NODE], 30, what="the Agent to register again")
        c.ctl("service", "resize", "pa", "--nodes", "3", "--wait", "--timeout", "120", timeout=180)
        assert unprivileged_uid(vmm_pids(c, "pa-2")) == uid["pa-0"]
        assert {v: main_pid(c, v) for v in uid} == before

        # Deleting stops every process of the service's uid, as root may.
        c.ctl("service", "delete", "pa", "--wait", "--timeout", "60", timeout=90)
        assert processes_of(uid["pa-0"]) == []
        assert processes_of(uid["pb-0"]) != []
        c.ctl("service", "delete", "pb", "--wait", "--timeout", "60", timeout=90)
        assert processes_of(uid["pb-0"]) == []


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64") or not glob.glob("/boot/vmlinuz-*"),
                    reason="needs qemu-system-x86 and linux-image-amd64")
def test_a_qemu_guest_runs_unprivileged_and_sandboxed(cluster, rootfs):
    from soda.hypervisors.qemu import SANDBOX, sandbox_support
    with uml_node(cluster, rootfs, hypervisors="qemu", agent_config=AGENT_CONFIG) as c:
        (vnode, address), = create(c, "pq", "--memory", "128", hypervisor="qemu",
                                   timeout=240).items()
        uid = unprivileged_uid(vmm_pids(c, vnode))
        vmm = main_pid(c, vnode)
        with open(f"/proc/{vmm}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
        assert os.path.basename(argv[0]) == "qemu-system-x86_64"
        if sandbox_support() == SANDBOX:
            assert argv[argv.index("-sandbox") + 1] == SANDBOX
            # Its seccomp filter is in force (mode 2).
            assert proc_status(vmm)["Seccomp"] == "2"
        else:
            assert "-sandbox" not in argv
        overlay = os.stat(os.path.join(c.agent_dir(NODE), "qemu", vnode, "vmm", "overlay.qcow2"))
        assert (overlay.st_uid, stat.S_IMODE(overlay.st_mode)) == (uid, 0o600)
        assert f"SODA virtual node {vnode}" in curl(c.netns, f"http://{address}/", timeout=10)
        c.ctl("service", "delete", "pq", "--wait", "--timeout", "60", timeout=90)
        assert processes_of(uid) == []


def create_on_debians_kernel(c, name):
    """create(), skipped where Debian's kernel cannot run a process on this
    CPU: its 6.1 UML's FP register buffer is smaller than the XSAVE area of
    a CPU with AMX, and the guest's init dies at its first instruction."""
    try:
        return create(c, name, "--memory", "64")
    except AssertionError as e:
        skip_where_debians_kernel_cannot_run(str(e))
        raise


@pytest.mark.skipif(not os.access("/usr/bin/linux.uml", os.X_OK), reason="needs user-mode-linux")
def test_hostfs_shows_a_guest_of_debians_kernel_nothing_of_the_host(cluster, hostile_rootfs):
    config = f"{AGENT_CONFIG}\ndrivers: {{uml: {{kernel: /usr/bin/linux.uml}}}}"
    with uml_node(cluster, hostile_rootfs, agent_config=config) as c:
        (vnode, address), = create_on_debians_kernel(c, "hf").items()
        vmm_pids(c, vnode)
        # The kernel has hostfs: the restriction, not its absence, is tested.
        assert "hostfs" in guest_run(c.netns, address, "cat /proc/filesystems")
        out = guest_run(c.netns, address,
                        "mkdir -p /mnt/h && mount -t hostfs none /mnt/h && echo mounted; "
                        "ls -a /mnt/h; ls /mnt/h/etc /mnt/h/proc /mnt/h/usr 2>&1 | head -3")
        print(f"hostfs in the guest:\n{out}")
        lines = out.splitlines()
        assert lines[0] == "mounted"
        assert sorted(lines[1:3]) == [".", ".."], out          # an empty directory
        assert all("No such file or directory" in line for line in lines[3:]), out


@pytest.mark.skipif(not os.access("/usr/bin/linux.uml", os.X_OK), reason="needs user-mode-linux")
@pytest.mark.skipif(not landlock_abi(), reason="this kernel has no Landlock")
def test_hostfs_dotdot_stays_inside_the_empty_root(cluster, hostile_rootfs):
    config = f"{AGENT_CONFIG}\ndrivers: {{uml: {{kernel: /usr/bin/linux.uml}}}}"
    with uml_node(cluster, hostile_rootfs, agent_config=config) as c:
        (vnode, address), = create_on_debians_kernel(c, "hd").items()
        vmm_pids(c, vnode)
        out = guest_run(c.netns, address, "mkdir -p /mnt/e && mount -t hostfs none /mnt/e "
                                          "-o ../../../../../.. && echo mounted; ls /mnt/e; "
                                          "cat /mnt/e/etc/passwd; ls /mnt/e/var/lib")
        print(f"hostfs -o ../..:\n{out}")
        assert out.splitlines()[0] == "mounted", out
        assert "etc" not in out.split() and "root:" not in out, out
        # Its own disk layer is the VMM's to open, but nothing beside it.
        out = guest_run(c.netns, address, "mkdir -p /mnt/s && mount -t hostfs none /mnt/s "
                                          f"-o ../../../../../..{c.agent_dir(NODE)} && ls /mnt/s")
        assert "uml" not in out.split() and "images" not in out.split(), out
