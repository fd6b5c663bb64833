"""Fixtures the unit tier shares across modules."""

import pytest

from soda.rpc.client import sha256_file
from tests.support import make_ext4_image
from tests.unit import crashing_master as crashing


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A Master state dir holding the state crashing_master's cases start from."""
    root = tmp_path_factory.mktemp("prepared")
    image = make_ext4_image(str(root / "rootfs.img"))
    crashing.prepare(str(root / "master"), image, sha256_file(image))
    return str(root / "master")
