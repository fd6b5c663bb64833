"""The disk bound measured on real User-Mode Linux guests: a guest that
writes until its disk is full gets ENOSPC inside, its copy-on-write layer
on the host stays within the virtual node's disk size (plus the COW
format's bitmap), the host filesystem loses no more than that, and a
neighbour keeps serving. Read outside the code under test: `stat` of the
COW file, `statvfs` of the host filesystem, `df` inside the guest."""

import math
import os
import re
import subprocess

import pytest

from tests.system.guests import require_guest_support
from tests.system.guests import alive, curl, guest_records
from tests.system.guests import NODE, TOP

pytestmark = [pytest.mark.root, pytest.mark.guest]

require_guest_support()

MiB = 1 << 20
DISK = 64                    # MiB: four times the 16 MiB reference image


def cow_allowance(disk_mib):
    """What UML's COW format adds to the data: a header (with the base's
    path), and a bitmap of one bit per 512-byte sector, rounded up to the
    file's blocks."""
    return 64 * 1024 + math.ceil(disk_mib * MiB / 512 / 8)


def test_a_guest_filling_its_disk_stops_at_the_disk_size(uml_node):
    c = uml_node
    c.ctl("service", "create", "disk", "--image", "busybox-httpd", "--hypervisor", "uml",
          "--nodes", "2", "--disk", str(DISK), "--wait", "--timeout", "120", timeout=180)
    vnodes = {v["name"]: v["address"] for v in c.json("service", "get", "disk")["vnodes"]}
    records = guest_records(c)
    c.guest_pids.update(r["pid"] for r in records.values())
    cow = os.path.join(c.agent_dir(NODE), "uml", "disk-0", "vmm", "cow.img")
    host = os.statvfs(cow)
    host_free = host.f_bavail * host.f_frsize

    # The guest sees a root filesystem of the disk's size, not the image's.
    before = curl(c.netns, f"http://{vnodes['disk-0']}/cgi-bin/fill?mib=1")
    total_kib = int(re.search(r"df: \S+\s+(\d+)", before).group(1))
    print(f"guest root filesystem: {total_kib} KiB for a {DISK} MiB disk")
    assert (DISK - 8) * 1024 <= total_kib <= DISK * 1024, before

    # Write four times the disk: the guest's own kernel says ENOSPC.
    out = curl(c.netns, f"http://{vnodes['disk-0']}/cgi-bin/fill?mib={4 * DISK}", timeout=240)
    wrote = int(re.search(r"wrote (\d+)", out).group(1))
    print(f"fill {4 * DISK} MiB in a {DISK} MiB guest: {out!r}")
    assert "No space left on device" in out, out
    assert wrote < DISK * MiB, out

    # The COW layer on the host: its allocated bytes stay within the disk.
    st = os.stat(cow)
    allocated = st.st_blocks * 512
    print(f"COW layer: {allocated / MiB:.1f} MiB allocated, {st.st_size / MiB:.1f} MiB apparent, "
          f"bound {DISK} MiB + {cow_allowance(DISK) / 1024:.0f} KiB")
    assert allocated >= wrote - 2 * MiB, (allocated, wrote)          # the data did land there
    assert allocated <= DISK * MiB + cow_allowance(DISK), allocated
    assert st.st_size <= DISK * MiB + cow_allowance(DISK), st.st_size
    # The host filesystem lost at most that (other writers may add noise
    # either way; they cannot make it lose more than a few MiB here).
    host = os.statvfs(cow)
    lost = host_free - host.f_bavail * host.f_frsize
    print(f"host filesystem: {lost / MiB:.1f} MiB less free")
    assert lost <= DISK * MiB + cow_allowance(DISK) + 32 * MiB, lost

    # The full guest still serves; its neighbour never noticed.
    assert "SODA_NAME=disk-0" in curl(c.netns, f"http://{vnodes['disk-0']}/cgi-bin/info")
    assert "SODA_NAME=disk-1" in curl(c.netns, f"http://{vnodes['disk-1']}/cgi-bin/info")
    after = guest_records(c)
    for name, record in records.items():
        assert after[name]["pid"] == record["pid"] and alive(record["pid"]), name
    other = os.stat(os.path.join(c.agent_dir(NODE), "uml", "disk-1", "vmm", "cow.img"))
    assert other.st_blocks * 512 < 8 * MiB


def test_a_disk_smaller_than_the_image_is_refused_and_nothing_is_created(uml_node, tmp_path):
    c = uml_node
    image = os.path.join(str(tmp_path), "big.img")
    subprocess.run([os.path.join(TOP, "scripts", "build-rootfs"), image, "--size", "24M"], check=True,
                   capture_output=True)
    c.ctl("image", "push", image, "--name", "big")
    result = c.ctl("service", "create", "tiny", "--image", "big", "--hypervisor", "uml",
                   "--disk", "20", check=False)
    assert result.returncode == 1, result
    assert "disk 20 MiB cannot hold image" in result.stderr and "at least 24 MiB" in result.stderr
    assert "Traceback" not in result.stderr
    assert [s["name"] for s in c.json("service", "list")] == []
    # Nor can a running service shrink its disk below the image; a disk of
    # exactly the image's size boots over the image itself.
    c.ctl("service", "create", "small", "--image", "big", "--hypervisor", "uml",
          "--disk", "24", "--wait", "--timeout", "120", timeout=180)
    c.guest_pids.update(r["pid"] for r in guest_records(c).values())
    result = c.ctl("service", "resize", "small", "--disk", "20", check=False)
    assert result.returncode == 1 and "cannot hold image" in result.stderr, result
    assert c.json("service", "get", "small")["vnodes"][0]["resources"]["disk"] == 24
