"""The minimum guest memory follows the kernel and is enforced at admission
end to end: a real Agent whose UML driver boots Debian's kernel
registers 32 MiB as its minimum; `sodactl service create` below it fails
with exit 1 and a message naming the value, the minimum and the kernel, and
nothing is created (no service, no guest, no cgroup); at the minimum the
guest boots and serves. Checked outside the code under test: the Agent's
guest records, the cgroup tree, HTTP from inside the namespace."""

import os

import pytest

from soda.hypervisors.kernels import DEBIAN_KERNEL, DEBIAN_MIN_MEMORY
from tests.support import skip_where_debians_kernel_cannot_run
from tests.system.guests import require_guest_support
from tests.system.guests import curl, guest_records
from tests.system.guests import uml_node as _uml_node

pytestmark = [pytest.mark.root, pytest.mark.guest]

require_guest_support()
if not os.access(DEBIAN_KERNEL, os.X_OK):
    pytest.skip(f"{DEBIAN_KERNEL} is missing (user-mode-linux)", allow_module_level=True)


@pytest.fixture
def debian_node(cluster, rootfs):
    with _uml_node(cluster, rootfs, agent_config=f"drivers: {{uml: {{kernel: {DEBIAN_KERNEL}}}}}") as c:
        yield c


def test_below_the_kernels_minimum_is_refused_and_creates_nothing(debian_node):
    c = debian_node
    [node] = c.json("node", "list")
    assert node["min_memory"]["uml"] == {"mib": DEBIAN_MIN_MEMORY,
                                         "kernel": f"{DEBIAN_KERNEL} (debian)"}

    refused = c.ctl("service", "create", "tiny", "--image", "busybox-httpd", "--hypervisor", "uml",
                    "--nodes", "2", "--memory", "24", "--wait", "--timeout", "30", check=False)
    assert refused.returncode == 1, refused.stderr      # a bad request, not "no room" (3)
    message = refused.stderr
    assert "24 MiB" in message and f"{DEBIAN_MIN_MEMORY} MiB" in message, message
    assert DEBIAN_KERNEL in message, message
    assert "Traceback" not in message
    assert c.json("service", "list") == []
    assert c.json("node", "list")[0]["vnodes"] == 0
    assert guest_records(c) == {}
    assert c.cgroups.names("memory") == []

    # At the minimum the same request is admitted, and the guest boots and serves.
    try:
        c.ctl("service", "create", "tiny", "--image", "busybox-httpd", "--hypervisor", "uml",
              "--nodes", "1", "--memory", str(DEBIAN_MIN_MEMORY), "--wait", "--timeout", "120", timeout=180)
    except AssertionError as e:
        skip_where_debians_kernel_cannot_run(str(e))   # the refusal above held; booting cannot here
        raise
    svc = c.json("service", "get", "tiny")
    assert [v["phase"] for v in svc["vnodes"]] == ["RUNNING"]
    record = guest_records(c)["tiny-0"]
    c.guest_pids.add(record["pid"])
    assert record["kernel"] == {"path": DEBIAN_KERNEL, "kind": "debian"}
    assert f"mem={DEBIAN_MIN_MEMORY}M" in record["argv"]
    assert "tiny-0" in curl(c.netns, f"http://{svc['vnodes'][0]['address']}/", timeout=30)

    # Growing it is fine; shrinking it below the minimum is refused and changes nothing.
    shrink = c.ctl("service", "resize", "tiny", "--memory", "16", check=False)
    assert shrink.returncode == 1 and f"{DEBIAN_MIN_MEMORY} MiB" in shrink.stderr, shrink.stderr
    assert [v["resources"]["memory"] for v in c.json("service", "get", "tiny")["vnodes"]] == \
        [DEBIAN_MIN_MEMORY]
