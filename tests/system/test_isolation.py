"""Isolation measured on real User-Mode Linux guests: CPU split and cap,
bandwidth both ways (and changed live), memory containment (the hog's
allocation fails, its OOM kill is counted and reaches sodactl, its neighbour
answers throughout), and a Daemon restart after which the fence is still in
force and still changes live. Load goes only to guests inside the namespace
this test creates; every figure is read outside the code under test
(cpuacct, cpu and memory cgroup files, `tc`, the test's own clock)."""

import os
import signal
import threading
import time

import pytest

from tests.system.cluster import wait_until
from tests.system.guests import require_guest_support
from tests.system.guests import (alive, curl, guest_records, htb_rates,
                                 in_netns, ns_links, qdiscs)
from tests.system.guests import uml_node as _uml_node

pytestmark = [pytest.mark.root, pytest.mark.guest]

require_guest_support()

# Each bandwidth measurement moves what its limit passes in this long: the
# guest's CGI answers ~0.1 s after the last byte, which a fixed size would
# weigh more at higher limits (3 MB measured 20 Mbit/s as 14-18.5).
TRANSFER_SECONDS = 2.4


def transfer_bytes(mbit: float) -> int:
    return int(mbit * 1e6 / 8 * TRANSFER_SECONDS)


@pytest.fixture
def one_core_node(cluster, rootfs):
    """Every guest confined to CPU 0, so that CPU-hungry guests compete."""
    with _uml_node(cluster, rootfs, daemon_config='cpuset: "0"') as c:
        yield c


def create(c, name, *args):
    c.ctl("service", "create", name, "--image", "busybox-httpd", "--hypervisor", "uml", *args,
          "--wait", "--timeout", "120", timeout=180)
    svc = c.json("service", "get", name)
    c.guest_pids.update(r["pid"] for r in guest_records(c).values())
    return {v["name"]: v["address"] for v in svc["vnodes"]}


def cpu_ns(c, vnode):
    return int(c.cgroups.cpu_seconds(vnode) * 1e9)


def burn(c, address, seconds):
    """Start a burn in the guest; the returned thread ends with the answer."""
    thread = threading.Thread(target=curl, args=(c.netns, f"http://{address}/cgi-bin/burn?seconds={seconds}"),
                              kwargs={"timeout": seconds + 60}, daemon=True)
    thread.start()
    return thread


def cpu_shares_of_a_core(c, vnodes, warmup=2.0, window=5.0):
    """Each virtual node's share of the CPU used by all of them over
    `window` seconds, after a warm-up, from cpuacct."""
    time.sleep(warmup)
    before = {v: cpu_ns(c, v) for v in vnodes}
    t0 = time.monotonic()
    time.sleep(window)
    used = {v: cpu_ns(c, v) - before[v] for v in vnodes}
    wall = time.monotonic() - t0
    return used, wall


def test_cpu_shares_split_one_core_1_to_2(one_core_node):
    c = one_core_node
    addresses = create(c, "cpu", "--nodes", "2", "--cpu", "0.5,1.0", "--memory", "48")
    assert c.cgroups.cpus("cpu-0") == "0"
    threads = [burn(c, addresses[v], 14) for v in ("cpu-0", "cpu-1")]
    splits = []
    for _ in range(2):
        used, _ = cpu_shares_of_a_core(c, ("cpu-0", "cpu-1"), warmup=1.5, window=4.0)
        splits.append(100 * used["cpu-0"] / (used["cpu-0"] + used["cpu-1"]))
    for t in threads:
        t.join(90)
    print(f"cpu split 0.5:1.0 on one core: {splits} % for cpu-0 (ideal 33.3)")
    assert all(28.3 <= s <= 38.3 for s in splits), splits


def test_cpu_cap_holds_a_burning_guest_at_its_quarter(uml_node):
    c = uml_node
    addresses = create(c, "capped", "--nodes", "1", "--cpu", "0.25", "--cpu-cap", "--memory", "48")
    thread = burn(c, addresses["capped-0"], 12)
    used, wall = cpu_shares_of_a_core(c, ("capped-0",), warmup=2.0, window=6.0)
    share = used["capped-0"] / 1e9 / wall
    thread.join(90)
    print(f"capped guest: {100 * share:.1f} % of a core (cap 25 %)")
    assert 0.15 <= share <= 0.27, share


def _rate(c, address, direction, limit_mbit):
    """Mbit/s of one transfer, sized to last TRANSFER_SECONDS at `limit_mbit`,
    timed from inside the netns."""
    url = f"http://{address}/cgi-bin/"
    nbytes = transfer_bytes(limit_mbit)
    if direction == "to_guest":
        blob = os.path.join(c.root, f"blob-{nbytes}")
        if not os.path.exists(blob):
            with open(blob, "wb") as f:
                f.write(os.urandom(nbytes))
        # No "Expect: 100-continue": busybox httpd never answers it, and
        # curl would wait a second before sending the body.
        out = curl(c.netns, url + "recv", "--data-binary", f"@{blob}", "-H", "Expect:",
                   "-H", "Content-Type: application/octet-stream",
                   "-w", "\n%{size_upload} %{time_pretransfer} %{time_total}")
        assert f"received {nbytes}" in out, out
        size, start, total = out.strip().splitlines()[-1].split()
    else:
        out = curl(c.netns, url + f"send?bytes={nbytes}", "-o", "/dev/null",
                   "-w", "%{size_download} %{time_starttransfer} %{time_total}")
        size, start, total = out.split()
    assert int(size) == nbytes
    # From the first byte of the body on the wire to the last one: not the
    # connection set-up, nor the guest starting its CGI for a download.
    return int(size) * 8 / (float(total) - float(start)) / 1e6


def test_bandwidth_both_ways_and_changed_live(uml_node):
    c = uml_node
    addresses = create(c, "net", "--nodes", "1", "--bandwidth", "10", "--memory", "48")
    address = addresses["net-0"]
    pid = guest_records(c)["net-0"]["pid"]
    _rate(c, address, "from_guest", 10)           # warm-up
    rates = {d: sorted(_rate(c, address, d, 10) for _ in range(3)) for d in ("to_guest", "from_guest")}
    print(f"--bandwidth 10: {rates}")
    assert 9.0 <= rates["to_guest"][1] <= 11.0, rates
    assert 9.0 <= rates["from_guest"][1] <= 11.0, rates

    # 15, not 20: a UML guest receiving through busybox httpd and a CGI (each
    # syscall a ptrace round trip) tops out near 18.5 Mbit/s on this 2-core
    # machine, so a 20 Mbit/s limit measured 15-18.8 to the guest: the
    # guest's own ceiling, not the limit.
    c.ctl("service", "resize", "net", "--bandwidth", "15", timeout=60)
    t0 = time.monotonic()
    taps = [d for d in ns_links(c.netns) if d.startswith(("st", "ifb-"))]
    wait_until(lambda: all(htb_rates(c.netns, d) == ["15Mbit"] for d in taps), 10, interval=0.05,
               what="15 Mbit/s in tc")
    applied = time.monotonic() - t0
    rates = {d: sorted(_rate(c, address, d, 15) for _ in range(3)) for d in ("to_guest", "from_guest")}
    print(f"--bandwidth 15 (applied after {applied:.2f} s): {rates}")
    assert applied <= 2.0
    assert 13.5 <= rates["to_guest"][1] <= 16.5, rates
    assert 13.5 <= rates["from_guest"][1] <= 16.5, rates
    assert guest_records(c)["net-0"]["pid"] == pid and alive(pid)


def reported_usage(c, service):
    """Each virtual node's usage as sodactl reports it (None until reported)."""
    return {v["name"]: v["usage"] for v in c.json("service", "get", service)["vnodes"]}


def host_oom_kills(c, vnode):
    """OOM kills by the virtual node's memory cgroup (its fence), from the kernel."""
    return c.cgroups.oom_kills(vnode)


def test_memory_hog_is_contained_and_neighbours_untouched(uml_node):
    c = uml_node
    addresses = create(c, "mem", "--nodes", "2", "--memory", "48")
    before = {name: r["pid"] for name, r in guest_records(c).items()}
    # alloc really commits memory: the guest's cgroup grows while it holds it.
    idle = c.cgroups.memory_usage("mem-0")
    holder = threading.Thread(target=try_alloc, args=(c, addresses["mem-0"], 16, 4), daemon=True)
    holder.start()
    grown = wait_until(lambda: (lambda now: now - idle >= 12 << 20 and now)(c.cgroups.memory_usage("mem-0")), 30,
                       interval=0.1, what="the guest to commit 16 MiB")
    holder.join(60)
    print(f"alloc 16 MiB: cgroup {idle >> 20} -> {grown >> 20} MiB")
    reported = wait_until(lambda: (lambda u: u if all(u.values()) else None)(reported_usage(c, "mem")), 30,
                          interval=0.5, what="usage of both guests in sodactl")
    assert reported["mem-0"]["oom_kills"] == reported["mem-1"]["oom_kills"] == 0, reported

    # The neighbour is asked who it is, again and again, while the hog runs.
    answers, stop = [], threading.Event()

    def ask_neighbour():
        while not stop.is_set():
            t0 = time.monotonic()
            answers.append((_serves(c, addresses["mem-1"]), time.monotonic() - t0))
            stop.wait(0.2)
    asker = threading.Thread(target=ask_neighbour, daemon=True)
    asker.start()
    # Allocate past the guest's RAM: its own kernel kills the allocator
    # (or, failing that, the memory cgroup kills the guest and the Agent
    # boots it again). Either way the allocation must not succeed.
    try:
        out = try_alloc(c, addresses["mem-0"], 80)
    finally:
        stop.set()
        asker.join(30)
    print(f"alloc 80 MiB in a 48 MiB guest: {out!r}; the neighbour answered {sum(ok for ok, _ in answers)} "
          f"of {len(answers)} times meanwhile, slowest {max((t for _, t in answers), default=0):.2f} s")
    assert f"allocated {80 << 20}" not in out[1], out
    # Somebody counted the kill, and it reaches sodactl: the guest's kernel
    # (its vmstat oom_kill) or the host's memory cgroup.
    hog = wait_until(lambda: (lambda u: u if u and u["oom_kills"] >= 1 else None)(
        reported_usage(c, "mem")["mem-0"]), 30, interval=0.5, what="sodactl to report mem-0's OOM kill")
    print(f"mem-0 OOM kills in sodactl: {hog['oom_kills']}; host cgroup: {host_oom_kills(c, 'mem-0')}")

    # The neighbour: answered all along (each within _serves' timeout), same
    # process, nothing killed in it.
    assert answers and all(ok for ok, _ in answers), answers
    assert guest_records(c)["mem-1"]["pid"] == before["mem-1"] and alive(before["mem-1"])
    assert host_oom_kills(c, "mem-1") == 0
    assert reported_usage(c, "mem")["mem-1"]["oom_kills"] == 0
    assert "mem-1" in curl(c.netns, f"http://{addresses['mem-1']}/cgi-bin/info")
    # The hog's guest serves again (same guest, or a new boot by the Agent).
    wait_until(lambda: _serves(c, addresses["mem-0"]), 60, interval=0.5, what="mem-0 to serve again")
    c.guest_pids.update(r["pid"] for r in guest_records(c).values())


def try_alloc(c, address, mib, hold=0):
    result = in_netns(
        c.netns, ["curl", "-sS", "--max-time", "60", f"http://{address}/cgi-bin/alloc?mib={mib}&hold={hold}"],
        timeout=70, check=False)
    return (result.returncode, result.stdout.strip()[:80])


def _serves(c, address):
    try:
        return "SODA_NAME" in curl(c.netns, f"http://{address}/cgi-bin/info", timeout=3)
    except Exception:  # noqa: BLE001 - not serving yet
        return False


def test_daemon_kill_9_and_restart_keeps_the_fence_and_changes_it(uml_node):
    c = uml_node
    create(c, "web", "--nodes", "2", "--cpu", "0.5,1.0", "--bandwidth", "10", "--memory", "48")
    vnodes = ("web-0", "web-1")
    weights = {v: c.cgroups.cpu_weight(v) for v in vnodes}
    assert weights["web-1"] == 2 * weights["web-0"], weights

    def kept():
        return {v: (c.cgroups.memory_limit(v), c.cgroups.pids_max(v)) for v in vnodes}
    before = kept()
    pids = {name: r["pid"] for name, r in guest_records(c).items()}
    shaped_before = sorted(qdiscs(c.netns))
    taps = [d for d in ns_links(c.netns) if d.startswith(("st", "ifb-"))]
    assert len(taps) == 4 and all(htb_rates(c.netns, d) == ["10Mbit"] for d in taps), taps
    c.kill("node-a-daemon", signal.SIGKILL)
    c.restart_daemon()
    # A change only a Daemon that found its fences again can make: swap the
    # CPU shares and raise the bandwidth, then read the kernel's values.
    c.ctl("service", "resize", "web", "--cpu", "1.0,0.5", "--bandwidth", "12", "--wait", timeout=60)
    wait_until(lambda: {v: c.cgroups.cpu_weight(v) for v in vnodes}
               == {"web-0": weights["web-1"], "web-1": weights["web-0"]}, 20,
               what="the CPU weights swapped in the kernel")
    wait_until(lambda: all(htb_rates(c.netns, d) == ["12Mbit"] for d in taps), 20, what="12 Mbit/s in tc")
    # Changed where the guests are: each guest's VMM is still in its cgroup.
    for v in vnodes:
        assert pids[v] in c.cgroups.procs(v, "cpu"), v
    assert kept() == before
    # The restarted Daemon must not stack a second tree on any TAP.
    roots = [(dev, kind) for dev, kind, handle in qdiscs(c.netns) if kind in ("htb", "ingress")]
    assert len(roots) == len(set(roots)), roots                  # one tree per device
    assert sorted((d, k) for d, k, _ in qdiscs(c.netns)) == sorted((d, k) for d, k, _ in shaped_before)
    assert sorted(d for d in ns_links(c.netns) if d.startswith(("st", "ifb-"))) == sorted(taps)
    assert {name: r["pid"] for name, r in guest_records(c).items()} == pids
    assert all(alive(p) for p in pids.values())


def test_usage_reaches_sodactl(uml_node):
    c = uml_node
    addresses = create(c, "acct", "--nodes", "1", "--memory", "48")
    curl(c.netns, f"http://{addresses['acct-0']}/cgi-bin/send?bytes=200000", "-o", "/dev/null")

    def reported():
        [v] = c.json("service", "get", "acct")["vnodes"]
        u = v["usage"]
        return u if u and u["cpu_seconds"] > 0 and u["memory_bytes"] > 0 and u["bytes_out"] >= 200_000 else None
    usage = wait_until(reported, 30, interval=0.5, what="usage in sodactl service get")
    cgroup_mem = c.cgroups.memory_usage("acct-0")
    assert 0.5 * cgroup_mem <= usage["memory_bytes"] <= 2 * cgroup_mem
    assert usage["memory_peak_bytes"] >= usage["memory_bytes"]
    [node] = c.json("node", "list")
    assert node["usage"]["cpu_seconds"] >= usage["cpu_seconds"] * 0.5
    table = c.ctl("service", "get", "acct").stdout
    assert "CPU-S" in table and "MEM-PEAK" in table
