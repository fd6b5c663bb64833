import pytest

from tests.system.cluster import Cluster


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(str(tmp_path))
    yield c
    c.close()
