"""Which UML kernel a node boots (soda.hypervisors.kernels) and how the UML
driver follows it, against a fake kernel cache: no root, nothing booted."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from soda.errors import InvalidSpec
from soda.hypervisors.base import GuestSpec
from soda.hypervisors.kernels import (DEBIAN, DEBIAN_KERNEL, DEBIAN_MIN_MEMORY, DEFAULT_CACHE, SODA,
                                      SODA_MIN_MEMORY, UmlKernel, calibrated_lpj, find_uml_kernel,
                                      kernel_cache)
from soda.hypervisors.uml import UmlDriver
from soda.model.spec import Resources


def spec(memory=64, image="/var/lib/soda/agent/images/sha256-ab12/rootfs.img"):
    return GuestSpec(name="web-0", service="web", image_path=image, image_digest="sha256:" + "ab" * 32,
                     resources=Resources(cpu=0.5, memory=memory, bandwidth=10, disk=64),
                     address="127.0.0.1", prefix_length=24, gateway="127.0.0.1", port=1,
                     hypervisor="uml")


def build(cache, key="6.1.192-2-0123456789ab", metadata=None, executable=True, current=True,
          kernel=None):
    """What scripts/build-guest-kernel leaves: <cache>/<key>/linux, its
    metadata.json and the `current` link."""
    directory = cache / key
    directory.mkdir(parents=True)
    linux = directory / "linux"
    if kernel:
        shutil.copy(kernel, linux)
    else:
        linux.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(linux, 0o755 if executable else 0o644)
    if metadata is not None:
        (directory / "metadata.json").write_text(metadata if isinstance(metadata, str)
                                                 else json.dumps(metadata))
    if current:
        os.symlink(key, cache / "current")
    return str(linux)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "guest-kernel"
    path.mkdir()
    monkeypatch.setenv("SODA_KERNEL_CACHE", str(path))
    return path


def test_the_cache_is_in_var_cache_unless_the_environment_says_otherwise():
    assert kernel_cache({}) == DEFAULT_CACHE == "/var/cache/soda/guest-kernel"
    assert kernel_cache({"SODA_KERNEL_CACHE": ""}) == DEFAULT_CACHE
    assert kernel_cache({"SODA_KERNEL_CACHE": "/srv/k"}) == "/srv/k"


def test_auto_without_a_built_kernel_is_debians(cache):
    assert find_uml_kernel() == UmlKernel("/usr/bin/linux.uml", "debian", DEBIAN_MIN_MEMORY)
    assert find_uml_kernel("") == find_uml_kernel("auto") == (DEBIAN_KERNEL, DEBIAN, DEBIAN_MIN_MEMORY)


def test_auto_prefers_the_current_soda_kernel_by_its_real_path(cache):
    linux = build(cache, metadata={"min_memory_mib": 20, "source_version": "6.1.192-2"})
    found = find_uml_kernel()
    assert found == (linux, SODA, 20)
    assert found.path == str(cache / "6.1.192-2-0123456789ab" / "linux")
    assert "/current/" not in found.path, "a later build must not change a resolved kernel"


def test_auto_follows_current_to_the_newest_build(cache):
    build(cache, key="old-aaaaaaaaaaaa", metadata={})
    newer = build(cache, key="new-bbbbbbbbbbbb", metadata={}, current=False)
    os.symlink("new-bbbbbbbbbbbb", cache / ".current.tmp")
    os.replace(cache / ".current.tmp", cache / "current")
    assert find_uml_kernel().path == newer


def test_auto_skips_a_kernel_it_cannot_run(cache):
    build(cache, metadata={}, executable=False)
    assert find_uml_kernel().kind == DEBIAN
    (cache / "current").unlink()
    os.symlink("missing-key", cache / "current")
    assert find_uml_kernel().kind == DEBIAN


def test_the_environment_and_the_argument_choose_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SODA_KERNEL_CACHE", raising=False)
    one, two = tmp_path / "one", tmp_path / "two"
    linux_one = build(one, metadata={})
    linux_two = build(two, metadata={})
    assert find_uml_kernel(environ={"SODA_KERNEL_CACHE": str(one)}).path == linux_one
    assert find_uml_kernel(cache=str(two)).path == linux_two
    monkeypatch.setenv("SODA_KERNEL_CACHE", str(two))
    assert find_uml_kernel().path == linux_two


def test_a_missing_or_bad_minimum_falls_back_to_the_soda_default(cache, caplog):
    linux = build(cache)                                   # no metadata.json
    assert find_uml_kernel() == (linux, SODA, SODA_MIN_MEMORY) == (linux, "soda", 16)
    for bad in ("{not json", '{"min_memory_mib": "16"}', '{"min_memory_mib": 0}',
                '{"min_memory_mib": true}', "[16]"):
        (cache / "6.1.192-2-0123456789ab" / "metadata.json").write_text(bad)
        assert find_uml_kernel().min_memory == SODA_MIN_MEMORY, bad
    assert "assuming 16 MiB" in caplog.text


def test_an_explicit_path_is_used_as_given(cache, tmp_path):
    linux = build(cache, metadata={"min_memory_mib": 18})
    via_current = str(cache / "current" / "linux")
    assert find_uml_kernel(via_current) == (via_current, SODA, 18)
    assert find_uml_kernel(linux) == (linux, SODA, 18)
    # Anything outside the cache is a stock kernel, with Debian's minimum,
    # whether or not it exists (the driver refuses to start a missing one).
    assert find_uml_kernel("/usr/bin/linux.uml") == ("/usr/bin/linux.uml", DEBIAN, DEBIAN_MIN_MEMORY)
    assert find_uml_kernel("/opt/uml/linux") == ("/opt/uml/linux", DEBIAN, DEBIAN_MIN_MEMORY)
    assert find_uml_kernel(str(tmp_path / "guest-kernel-other" / "linux")).kind == DEBIAN
    # A link from outside into the cache is still SODA's kernel.
    os.symlink(linux, tmp_path / "linux")
    assert find_uml_kernel(str(tmp_path / "linux")) == (str(tmp_path / "linux"), SODA, 18)


def test_the_delay_loop_a_guest_measured_comes_from_its_console(tmp_path):
    log = tmp_path / "console.log"
    assert calibrated_lpj(str(log)) == 0                       # no log
    log.write_bytes(b"Linux version 6.1.192\n")
    assert calibrated_lpj(str(log)) == 0                       # not that far yet
    log.write_bytes(b"Calibrating delay loop (skipped) preset value.. 2315.05 BogoMIPS (lpj=11575296)\n")
    assert calibrated_lpj(str(log)) == 0                       # told, not measured
    log.write_bytes(b"Linux version 6.1.192\nCalibrating delay loop... 2315.05 BogoMIPS "
                    b"(lpj=11575296)\npid_max: default: 32768 minimum: 301\n")
    assert calibrated_lpj(str(log)) == 11575296


# ---- the UML driver follows the kernel ----------------------------------------------

def test_the_driver_boots_the_soda_kernel_when_built(cache, tmp_path):
    linux = build(cache, metadata={"min_memory_mib": 16})
    d = UmlDriver(str(tmp_path / "state"), python="/opt/soda/venv/bin/python")
    assert (d.kernel, d.kernel_kind, d.min_memory) == (linux, SODA, 16)
    argv = d.build_argv(spec(memory=16))
    assert argv[argv.index("--") + 1] == linux
    assert "mem=16M" in argv
    with pytest.raises(InvalidSpec, match="below the 16 MiB"):
        d.build_argv(spec(memory=15))


def test_the_driver_falls_back_to_debians_kernel_and_minimum(cache, tmp_path):
    d = UmlDriver(str(tmp_path / "state"))
    assert (d.kernel, d.kernel_kind, d.min_memory) == (DEBIAN_KERNEL, DEBIAN, DEBIAN_MIN_MEMORY)
    d.build_argv(spec(memory=DEBIAN_MIN_MEMORY))
    with pytest.raises(InvalidSpec, match=f"below the {DEBIAN_MIN_MEMORY} MiB"):
        d.build_argv(spec(memory=DEBIAN_MIN_MEMORY - 1))
    explicit = UmlDriver(str(tmp_path / "state"), kernel="/usr/bin/linux.uml")
    assert (explicit.kernel, explicit.kernel_kind, explicit.min_memory) == (DEBIAN_KERNEL, DEBIAN, DEBIAN_MIN_MEMORY)


def test_an_explicit_minimum_wins(cache, tmp_path):
    build(cache, metadata={})
    assert UmlDriver(str(tmp_path / "state"), min_memory=48).min_memory == 48
    assert UmlDriver(str(tmp_path / "state"), kernel="/opt/linux", min_memory=12).min_memory == 12


def test_the_kernel_is_resolved_once(cache, tmp_path):
    d = UmlDriver(str(tmp_path / "state"))
    assert d.kernel_kind == DEBIAN
    build(cache, metadata={})
    argv = d.build_argv(spec())
    assert d.kernel == DEBIAN_KERNEL and argv[argv.index("--") + 1] == DEBIAN_KERNEL
    assert UmlDriver(str(tmp_path / "state")).kernel_kind == SODA


def test_the_guest_record_names_the_kernel_it_booted(cache, tmp_path):
    # /bin/true stands in for the kernel: the launcher execs it, it exits.
    linux = build(cache, metadata={}, kernel="/bin/true")
    image = tmp_path / "base.img"
    image.write_bytes(b"x")
    d = UmlDriver(str(tmp_path / "state"), short_dir=str(tmp_path / "run"))
    d.start(spec(image=str(image), memory=16))
    try:
        with open(os.path.join(d.guest_dir("web-0"), "guest.json")) as f:
            record = json.load(f)
        assert record["kernel"] == {"path": linux, "kind": "soda"}
        assert record["kernel_argv"][0] == linux
    finally:
        d.stop("web-0", timeout=0)
    assert d.list() == {}
