"""What a killed Agent leaves, against the real Daemon and kernel: an Agent
stopped between a guest's stop and the release of its fence leaves cgroups,
a shaped TAP and its neighbour entries behind; the next Agent finds them
through the Daemon and the kernel and releases them, and nothing of a guest
it runs."""

from __future__ import annotations

import os
import subprocess

import pytest

from soda.agent.network import NodeNetwork, tap_name
from soda.agent.plumbing import NodePlumbing
from soda.agent.reconciler import Reconciler
from soda.hypervisors.fake import FakeDriver
from soda.model.spec import Resources
from soda.model.state import DriverCapabilities, VirtualNode
from tests.fakes import FakeImages, RecordingReporter
from tests.integration.conftest import CGROUP_ROOT, V1_CONTROLLERS, link_names
from tests.integration.test_daemon_process import sock_dir, start_daemon  # noqa: F401 (fixtures)

pytestmark = pytest.mark.root

SUBNET, GATEWAY, UPLINK = "10.233.9.0/24", "10.233.9.1", "10.233.9.254"
ADDRESSES = {"web-0": "10.233.9.2", "old-1": "10.233.9.3"}


def vnode(name: str) -> VirtualNode:
    return VirtualNode(name=name, service=name.split("-")[0], index=int(name.split("-")[1]),
                       resources=Resources(cpu=0.5, memory=64, bandwidth=10, disk=64),
                       node="n1", address=ADDRESSES[name], prefix_length=24, gateway=GATEWAY,
                       generation=1, image_digest="sha256:" + "b" * 64, hypervisor="fake")


def fenced(cgroup_parent: str, name: str) -> list[str]:
    """The controllers in which `name` has a cgroup."""
    return [c for c in V1_CONTROLLERS if os.path.isdir(os.path.join(CGROUP_ROOT, c, cgroup_parent, name))]


def neighbours(netns: str) -> set[str]:
    out = subprocess.run(["ip", "-4", "-n", netns, "neigh", "show", "dev", "soda0"],
                         capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def converge(reconciler: Reconciler, passes: int = 3) -> None:
    for _ in range(passes):
        reconciler.reconcile_once()
        assert reconciler.wait_idle(30)


def test_a_restarted_agent_releases_the_fence_and_tap_a_killed_one_left(
        start_daemon, netns, cgroup_parent, tmp_path):  # noqa: F811
    _, daemon, _ = start_daemon()
    image = tmp_path / "base.img"
    image.write_bytes(b"rootfs")
    state = str(tmp_path / "state")
    network = NodeNetwork(netns=netns)
    reconcilers = []

    def agent() -> Reconciler:
        caps = {"fake": DriverCapabilities("fake", memory_overhead=32, plumbing=True)}
        reconciler = Reconciler({"fake": FakeDriver(state, boot_seconds=0)}, RecordingReporter(),
                                FakeImages(str(image)), ready_poll=0.01,
                                plumbing=NodePlumbing(network, daemon, caps))
        reconcilers.append(reconciler)
        return reconciler

    try:
        network.configure_node(SUBNET, GATEWAY, UPLINK)
        earlier = agent()
        earlier.replace_desired([vnode("web-0"), vnode("old-1")])
        converge(earlier)
        # The earlier Agent is killed while old-1 stops: its guest is gone,
        # its fence and network are not.
        earlier.close()
        FakeDriver(state).stop("old-1", 5)
        assert fenced(cgroup_parent, "old-1") == list(V1_CONTROLLERS)
        assert {tap_name("web-0"), tap_name("old-1")} <= set(link_names(netns))
        assert {f.name for f in daemon.list()} == {"web-0", "old-1"}

        later = agent()
        converge(later)               # no desired set yet: nothing is released
        assert fenced(cgroup_parent, "old-1") == list(V1_CONTROLLERS)
        later.replace_desired([vnode("web-0")])
        converge(later)
        assert fenced(cgroup_parent, "old-1") == []
        assert tap_name("old-1") not in link_names(netns)
        assert neighbours(netns) == {ADDRESSES["web-0"]}
        assert {f.name for f in daemon.list()} == {"web-0"}
        # The running guest keeps all of its own.
        assert fenced(cgroup_parent, "web-0") == list(V1_CONTROLLERS)
        assert network.plugged() == {"web-0"}
        assert [f.ifb != "" for f in daemon.list()] == [True]
    finally:
        for reconciler in reconcilers:
            reconciler.close()
        try:
            for name in ADDRESSES:
                daemon.release_limits(name)
        finally:
            network.teardown()          # the uplink's host end lives outside the namespace
            network.close()
