"""The Agent's image cache under a bound: least recently used first, never
a file a virtual node of the node boots, pulled again when next needed."""

from __future__ import annotations

import hashlib
import os
import time

from soda.agent.images import ImageCache
from soda.model import Image

MIB = 1 << 20


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Images:
    """A Master holding a few 1 MiB images (random: they take their size on disk)."""

    def __init__(self, names):
        self.data = {name: os.urandom(MIB) for name in names}
        self.digest = {name: _digest(data) for name, data in self.data.items()}
        self.pulls: list[str] = []

    def pull_image(self, digest, out, layer=False):
        name = next(n for n, d in self.digest.items() if d == digest)
        self.pulls.append(name)
        out.write(self.data[name])
        return Image(digest=digest, size=len(self.data[name]))


def _held(cache: ImageCache, master: Images) -> set[str]:
    on_disk = {os.path.basename(p) for _, _, p in cache.files()}
    return {n for n, d in master.digest.items() if d.replace(":", "-") in on_disk}


def _age(cache: ImageCache, digest: str, seconds_ago: float) -> None:
    path = cache.path(digest)
    st = os.stat(path)
    os.utime(path, ns=(time.time_ns() - int(seconds_ago * 1e9), st.st_mtime_ns))


def test_the_least_recently_used_image_goes_first_when_over_the_bound(tmp_path):
    master = Images("abcd")
    cache = ImageCache(str(tmp_path / "images"), master, limit_bytes=int(2.5 * MIB))
    cache.ensure(master.digest["a"])
    cache.ensure(master.digest["b"])
    _age(cache, master.digest["a"], 60)
    _age(cache, master.digest["b"], 30)
    cache.ensure(master.digest["a"])                   # a used again: b is now the oldest
    cache.ensure(master.digest["c"])
    assert _held(cache, master) == {"a", "c"}
    state = cache.state()
    assert state.bytes <= state.limit == int(2.5 * MIB)
    assert set(state.images) == {master.digest["a"], master.digest["c"]}
    cache.ensure(master.digest["b"])                   # pulled again when needed
    assert master.pulls == ["a", "b", "c", "b"] and _held(cache, master) == {"c", "b"}


def test_an_image_a_virtual_node_boots_is_never_evicted(tmp_path):
    master = Images("abc")
    wanted = [(master.digest["a"], 0)]
    cache = ImageCache(str(tmp_path / "images"), master, limit_bytes=int(1.5 * MIB), in_use=lambda: wanted)
    cache.ensure(master.digest["a"])
    _age(cache, master.digest["a"], 3600)
    cache.ensure(master.digest["b"])
    assert _held(cache, master) == {"a", "b"}         # over, but b was just pulled for use
    cache.ensure(master.digest["c"])
    assert _held(cache, master) == {"a", "c"}
    # Both in use and over the bound: nothing to evict, nothing lost.
    wanted.append((master.digest["c"], 0))
    assert cache.trim() == []
    assert _held(cache, master) == {"a", "c"}


def test_a_grown_disk_base_counts_and_is_kept_with_its_virtual_node(tmp_path):
    master = Images("ab")
    wanted = [(master.digest["a"], 4)]
    cache = ImageCache(str(tmp_path / "images"), master, limit_bytes=3 * MIB, in_use=lambda: wanted)
    base = cache.ensure(master.digest["a"], 4)       # a 4 MiB disk base: sparse, 1 MiB of data
    assert base.endswith(".disk-4M") and os.path.exists(base)
    cache.ensure(master.digest["b"])
    cache.trim()
    assert os.path.exists(base) and os.path.exists(cache.path(master.digest["a"]))
    wanted.clear()
    _age(cache, master.digest["a"], 60)
    os.utime(base, ns=(time.time_ns() - 60 * 10**9, os.stat(base).st_mtime_ns))
    cache.limit_bytes = int(1.5 * MIB)
    evicted = {os.path.basename(p) for p in cache.trim()}
    assert evicted == {os.path.basename(base), os.path.basename(cache.path(master.digest["a"]))}


def test_no_bound_evicts_nothing(tmp_path):
    master = Images("abc")
    cache = ImageCache(str(tmp_path / "images"), master)
    for name in "abc":
        cache.ensure(master.digest[name])
    state = cache.state()
    assert _held(cache, master) == {"a", "b", "c"} and (state.bytes, state.limit) == (3 * MIB, 0)


def test_eviction_keeps_the_mtime_a_uml_cow_layer_checks(tmp_path):
    master = Images("a")
    cache = ImageCache(str(tmp_path / "images"), master, limit_bytes=10 * MIB)
    path = cache.ensure(master.digest["a"])
    mtime = os.stat(path).st_mtime_ns
    time.sleep(0.01)
    cache.ensure(master.digest["a"])
    st = os.stat(path)
    assert st.st_mtime_ns == mtime and st.st_atime_ns > mtime


def test_a_pulled_image_keeps_its_free_space_as_holes(tmp_path):
    master = Images("a")
    data = bytes(3 * MIB) + master.data["a"] + bytes(4 * MIB + 100)    # zeros around 1 MiB of data
    master.data["a"], master.digest["a"] = data, _digest(data)
    cache = ImageCache(str(tmp_path / "images"), master)
    path = cache.ensure(master.digest["a"])
    with open(path, "rb") as f:
        assert f.read() == data
    assert os.path.getsize(path) == len(data) and cache.state().bytes < 1.2 * MIB
