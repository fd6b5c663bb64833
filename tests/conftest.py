import pytest

from tests.support import make_ext4_image, start_master


@pytest.fixture
def image_file(tmp_path):
    return make_ext4_image(str(tmp_path / "rootfs.img"))


@pytest.fixture
def master(tmp_path):
    """(server, target) of an in-process Master with its own state dir."""
    server, target = start_master(str(tmp_path / "master"))
    yield server, target
    server.stop(grace=0)
