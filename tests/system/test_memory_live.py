"""A memory change on a real User-Mode Linux guest: less memory applies
live (the same VMM process gives RAM back to the host and its memory cgroup
limit drops at once), more memory boots the guest again and sodactl says
so. Measured outside the code under test: the memory cgroup's
limit_in_bytes, the guest kernel's /proc/meminfo (through the image's
meminfo CGI), the VMM's pid."""

import re
import time

import pytest

from tests.system.cluster import wait_until
from tests.system.guests import require_guest_support
from tests.system.guests import alive, curl, guest_records, in_netns

pytestmark = [pytest.mark.root, pytest.mark.guest]

require_guest_support()

MiB = 1 << 20


def meminfo_kib(c, address):
    text = curl(c.netns, f"http://{address}/cgi-bin/meminfo", timeout=10)
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.M)}


def limit(c, vnode):
    return c.cgroups.memory_limit(vnode)


def host_oom_kills(c, vnode):
    return c.cgroups.oom_kills(vnode)


def test_less_memory_applies_live_more_memory_reboots_visibly(uml_node):
    c = uml_node
    c.ctl("service", "create", "mem", "--image", "busybox-httpd", "--hypervisor", "uml",
          "--memory", "64", "--wait", "--timeout", "120", timeout=180)
    [vnode] = c.json("service", "get", "mem")["vnodes"]
    # boot_seconds is measured once per boot: the same value means the same boot.
    address, boot_seconds = vnode["address"], vnode["boot_seconds"]
    assert boot_seconds > 0, vnode
    pid = guest_records(c)["mem-0"]["pid"]
    c.guest_pids.add(pid)
    limit_64 = limit(c, "mem-0")
    headroom = limit_64 - 64 * MiB         # what the fence adds for the VMM itself
    assert headroom > 0, limit_64
    before = meminfo_kib(c, address)

    # 64 -> 16 MiB: the guest has not 48 MiB free to give back and keep
    # enough to run on; it runs on as it was, and its status says why.
    c.ctl("service", "resize", "mem", "--memory", "16")
    reason = wait_until(lambda: c.json("service", "get", "mem")["vnodes"][0]["reason"], 15,
                        interval=0.2, what="the refused shrink to show")
    print(f"64 -> 16 MiB: {reason}")
    assert "cannot give back" in reason, reason
    assert limit(c, "mem-0") == limit_64
    assert guest_records(c)["mem-0"]["pid"] == pid and alive(pid)

    # 64 -> 40 MiB: live.
    t0 = time.monotonic()
    out = c.ctl("service", "resize", "mem", "--memory", "40")
    assert "mem-0 restarts" not in out.stderr, out.stderr
    wait_until(lambda: limit(c, "mem-0") == limit_64 - 24 * MiB, 10, interval=0.05,
               what="the memory cgroup limit to drop by 24 MiB")
    took = time.monotonic() - t0
    after = meminfo_kib(c, address)
    print(f"64 -> 40 MiB in {took:.2f}s: cgroup limit {limit_64 >> 20} -> {limit(c, 'mem-0') >> 20} MiB, "
          f"guest MemFree {before['MemFree'] >> 10} -> {after['MemFree'] >> 10} MiB, "
          f"MemTotal {before['MemTotal'] >> 10} -> {after['MemTotal'] >> 10} MiB")
    # The guest's own kernel lost the 24 MiB it gave back (give or take
    # what the guest itself did meanwhile).
    assert before["MemFree"] - after["MemFree"] >= 20 * 1024, (before, after)
    # ... and it is the same kernel: a new boot at 40 MiB would show a
    # MemTotal some 24 MiB smaller.
    assert after["MemTotal"] == before["MemTotal"], (before, after)
    assert guest_records(c)["mem-0"]["pid"] == pid and alive(pid)
    assert "SODA_NAME=mem-0" in curl(c.netns, f"http://{address}/cgi-bin/info")
    vnode = wait_until(lambda: (lambda v: v if (v["resources"]["memory"], v["phase"], v["reason"])
                                == (40, "RUNNING", "") else None)(c.json("service", "get", "mem")["vnodes"][0]),
                       10, interval=0.2, what="sodactl to show mem-0 running at 40 MiB with no reason")
    assert vnode["boot_seconds"] == boot_seconds, vnode
    # The fence is the guest's new memory plus the same headroom, and
    # lowering it made the host kill nothing.
    assert limit(c, "mem-0") == 40 * MiB + headroom
    assert host_oom_kills(c, "mem-0") == 0

    # 40 -> 64 MiB: back up to its boot size, live too.
    out = c.ctl("service", "resize", "mem", "--memory", "64")
    assert "grows live up to what it booted with" in out.stderr, out.stderr
    wait_until(lambda: limit(c, "mem-0") == limit_64, 10, interval=0.05,
               what="the memory cgroup limit to rise again")
    back = wait_until(lambda: (lambda m: m if m["MemFree"] - after["MemFree"] >= 20 * 1024 else None)(
        meminfo_kib(c, address)), 10, interval=0.2, what="the guest to get its RAM back")
    print(f"40 -> 64 MiB: guest MemFree {after['MemFree'] >> 10} -> {back['MemFree'] >> 10} MiB")
    assert guest_records(c)["mem-0"]["pid"] == pid and alive(pid)

    # 64 -> 80 MiB: more than it booted with, so a new boot, and said so.
    out = c.ctl("service", "resize", "mem", "--memory", "80")
    assert "restarts to go past that" in out.stderr, out.stderr
    new_pid = wait_until(lambda: [p for p in [guest_records(c).get("mem-0", {}).get("pid")] if p and p != pid],
                         60, interval=0.2, what="a new boot")[0]
    c.guest_pids.add(new_pid)
    c.ctl("service", "resize", "mem", "--wait", "--timeout", "120", "--memory", "80", timeout=180)
    assert not alive(pid)
    wait_until(lambda: limit(c, "mem-0") == 80 * MiB + headroom, 10, what="the 80 MiB limit")
    grown = wait_until(lambda: _meminfo_or_none(c, address), 60, interval=0.5, what="mem-0 to serve")
    print(f"64 -> 80 MiB: new boot (pid {pid} -> {new_pid}), MemTotal {grown['MemTotal'] >> 10} MiB")
    assert grown["MemTotal"] > before["MemTotal"] + 12 * 1024
    [vnode] = c.json("service", "get", "mem")["vnodes"]
    assert (vnode["resources"]["memory"], vnode["phase"]) == (80, "RUNNING"), vnode
    assert vnode["boot_seconds"] != boot_seconds, vnode          # sodactl shows the new boot too


def _meminfo_or_none(c, address):
    try:
        return meminfo_kib(c, address)
    except Exception:  # noqa: BLE001 - not serving yet
        return None


def test_oom_kills_inside_the_guest_reach_sodactl(uml_node):
    c = uml_node
    c.ctl("service", "create", "oom", "--image", "busybox-httpd", "--hypervisor", "uml",
          "--memory", "32", "--wait", "--timeout", "120", timeout=180)
    [vnode] = c.json("service", "get", "oom")["vnodes"]
    c.guest_pids.update(r["pid"] for r in guest_records(c).values())
    address = vnode["address"]
    # Past its RAM: the guest's own kernel kills the allocator.
    in_netns(c.netns, ["curl", "-sS", "--max-time", "60", f"http://{address}/cgi-bin/alloc?mib=80"],
             timeout=70, check=False)
    guest = wait_until(lambda: _guest_oom_kills(c, address), 60, interval=0.5,
                       what="the guest kernel to count an OOM kill")
    host = c.cgroups.oom_kills("oom-0")
    print(f"OOM kills: guest kernel {guest}, host memory cgroup {host}")
    reported = wait_until(lambda: (lambda u: u and u.get("oom_kills", 0) >= guest + host and u)(
        c.json("service", "get", "oom")["vnodes"][0].get("usage")), 30, interval=0.5,
        what="sodactl to report the OOM kills")
    assert reported["oom_kills"] == _guest_oom_kills(c, address) + host


def _guest_oom_kills(c, address):
    try:
        text = curl(c.netns, f"http://{address}/cgi-bin/meminfo", timeout=5)
    except Exception:  # noqa: BLE001 - busy or restarting httpd
        return None
    m = re.search(r"^oom_kill (\d+)", text, re.M)
    return int(m.group(1)) if m and int(m.group(1)) > 0 else None
