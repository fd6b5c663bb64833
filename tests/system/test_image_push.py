"""A 200 MiB image streams through a Master process without the Master
holding it in memory."""

import os

from tests.support import make_ext4_image, peak_rss_mib

MIB = 1 << 20


def test_big_push_keeps_master_memory_bounded(cluster, tmp_path):
    master = cluster.start_master()
    path = make_ext4_image(str(tmp_path / "big.img"), size=200 * MIB, data=os.urandom(MIB))
    before = peak_rss_mib(master.pid)
    with cluster.client(timeout=120) as client:
        image = client.push_image(path, name="big")
        assert image.size == 200 * MIB
        # The stored copy is byte-identical (its digest was verified on arrival).
        stored = os.path.join(cluster.root, "master", "images", image.digest.replace(":", "-"))
        assert os.path.getsize(stored) == 200 * MIB
        from soda.rpc.client import sha256_file
        assert sha256_file(stored) == image.digest
    peak = peak_rss_mib(master.pid)
    print(f"master peak RSS {before:.1f} MiB before, {peak:.1f} MiB after a 200 MiB push")
    assert peak - before < 48, f"Master grew by {peak - before:.0f} MiB while receiving 200 MiB"
    assert peak < 150
