"""Fixtures of the system tier: a cluster of real processes, the reference
image and the hostile one (tests/guest-images/README; each built once a
session: they are only read), and one physical node with
real UML guests (tests.system.guests.uml_node)."""

import pytest

from tests.system.cluster import Cluster
from tests.system.guests import HOSTILE_IMAGE, build_rootfs
from tests.system.guests import uml_node as _uml_node


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path))
    yield c
    c.close()


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory):
    return build_rootfs(str(tmp_path_factory.mktemp("image")))


@pytest.fixture(scope="session")
def hostile_rootfs(tmp_path_factory):
    """The reference image plus /cgi-bin/run (any command, as root in the
    guest): tests.system.guests.guest_run."""
    return build_rootfs(str(tmp_path_factory.mktemp("hostile-image")), overlay=HOSTILE_IMAGE)


@pytest.fixture
def uml_node(cluster, rootfs):
    with _uml_node(cluster, rootfs) as c:
        yield c
