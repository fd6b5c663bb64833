"""The fake hypervisor driver keeps state like a real one, and the registry."""

import json
import os

import pytest

from soda.errors import CommandError, InvalidSpec, NotFound, SodaError
from soda.hypervisors.base import DRIVERS, EXITED, RUNNING, GuestSpec, HypervisorDriver, make_driver
from soda.hypervisors.fake import FakeDriver
from soda.model.spec import Resources
from tests.fakes import FakeClock


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "base.img"
    path.write_bytes(b"rootfs")
    return str(path)


def spec(image, name="web-0", generation=1):
    return GuestSpec(name=name, service="web", image_path=image, image_digest="sha256:" + "a" * 64,
                     resources=Resources(cpu=0.5, memory=64, bandwidth=10, disk=64),
                     address="10.233.1.2", prefix_length=24, gateway="10.233.1.1", port=80,
                     hypervisor="fake", generation=generation)


def new_driver(tmp_path, **kw):
    kw.setdefault("sleep", lambda s: None)
    return FakeDriver(str(tmp_path / "state"), **kw)


def test_registry_names_the_fake_and_refuses_others(tmp_path):
    assert DRIVERS["fake"] is FakeDriver
    driver = make_driver("fake", str(tmp_path), FakeDriver.Config(boot_seconds=0))
    assert isinstance(driver, FakeDriver) and isinstance(driver, HypervisorDriver)
    with pytest.raises(InvalidSpec, match=r"unknown hypervisor driver 'xen' \(available: (\w+, )*fake, (\w+, )*qemu, (\w+, )*uml"):
        make_driver("xen", str(tmp_path))


def test_build_argv_is_pure_and_complete(tmp_path, image):
    driver = new_driver(tmp_path)
    argv = driver.build_argv(spec(image))
    assert argv == driver.build_argv(spec(image))
    assert argv[0] == "fake-vmm"
    assert f"image={image}" in argv and "ip=10.233.1.2/24" in argv and "mem=64M" in argv
    assert driver.list() == {}


def test_start_lists_a_running_guest_ready_after_boot_seconds(tmp_path, image):
    clock = FakeClock()
    driver = new_driver(tmp_path, clock=clock, boot_seconds=2.0)
    info = driver.start(spec(image))
    assert info.state == RUNNING and not info.ready and info.pid
    assert not driver.is_ready("web-0")
    clock.now += 2.0
    assert driver.is_ready("web-0")
    listed = driver.list()
    assert set(listed) == {"web-0"}
    assert listed["web-0"].ready and listed["web-0"].generation == 1
    assert listed["web-0"].started_at == 1000.0


def test_start_of_a_running_guest_returns_it_without_starting_again(tmp_path, image):
    driver = new_driver(tmp_path, boot_seconds=0)
    first = driver.start(spec(image))
    again = driver.start(spec(image))
    assert again.pid == first.pid
    assert driver.start_counts() == {"web-0": 1}


def test_stop_forgets_the_guest_and_stop_of_an_absent_guest_succeeds(tmp_path, image):
    slept = []
    driver = new_driver(tmp_path, boot_seconds=0, stop_seconds=0.5, sleep=slept.append)
    driver.start(spec(image))
    driver.stop("web-0", timeout=0.1)
    assert slept == [0.1]                 # forced after the timeout
    assert driver.list() == {}
    driver.stop("web-0", timeout=1)       # already gone
    driver.stop("never-0", timeout=1)
    assert not driver.is_ready("web-0")


def test_a_new_instance_on_the_same_dir_adopts_the_guests(tmp_path, image):
    driver = new_driver(tmp_path, boot_seconds=0)
    driver.start(spec(image, "web-0"))
    driver.start(spec(image, "web-1"))
    restarted = new_driver(tmp_path, boot_seconds=0)
    listed = restarted.list()
    assert set(listed) == {"web-0", "web-1"}
    assert all(i.state == RUNNING and i.ready for i in listed.values())
    restarted.start(spec(image, "web-0"))     # adopted, not booted again
    assert restarted.start_counts() == {"web-0": 1, "web-1": 1}


def test_crash_marker_from_outside_makes_the_guest_exited(tmp_path, image):
    driver = new_driver(tmp_path, boot_seconds=0)
    driver.start(spec(image))
    marker = tmp_path / "state" / "fake" / "web-0.crash"
    assert driver.marker_path("web-0") == str(marker)
    marker.touch()
    info = driver.list()["web-0"]
    assert info.state == EXITED and info.exit_reason == "crashed" and not info.ready
    assert not marker.exists()
    # Starting it again boots a new guest that the old marker cannot touch.
    assert driver.start(spec(image)).state == RUNNING
    assert driver.list()["web-0"].state == RUNNING
    assert driver.start_counts() == {"web-0": 2}


def test_crash_method_and_crash_of_unknown_guest(tmp_path, image):
    driver = new_driver(tmp_path, boot_seconds=0)
    driver.start(spec(image))
    driver.crash("web-0")
    assert driver.info("web-0").state == EXITED
    with pytest.raises(NotFound):
        driver.crash("other-0")
    driver.stop("web-0", timeout=1)           # an exited guest is cleaned up too
    assert driver.list() == {}


def test_fail_start_by_name_or_pattern_raises_with_a_reason(tmp_path, image):
    driver = new_driver(tmp_path, boot_seconds=0, fail_start=["bad-*"])
    with pytest.raises(CommandError, match="told to fail starting bad-3") as err:
        driver.start(spec(image, "bad-3"))
    assert isinstance(err.value, SodaError)
    assert driver.list() == {} and driver.start_counts() == {}
    driver.start(spec(image, "good-0"))
    assert set(driver.list()) == {"good-0"}


def test_start_needs_the_image(tmp_path):
    driver = new_driver(tmp_path)
    with pytest.raises(NotFound, match="does not exist"):
        driver.start(spec(str(tmp_path / "missing.img")))


def test_names_cannot_escape_the_state_dir(tmp_path, image):
    driver = new_driver(tmp_path)
    with pytest.raises(InvalidSpec):
        driver.start(spec(image, "../etc"))
    with pytest.raises(InvalidSpec):
        driver.stop("a/b", timeout=1)


def test_state_is_plain_json_readable_by_another_process(tmp_path, image):
    driver = new_driver(tmp_path, boot_seconds=0)
    driver.start(spec(image))
    fake_dir = tmp_path / "state" / "fake"
    record = json.loads((fake_dir / "web-0.json").read_text())
    assert record["state"] == RUNNING and record["spec"]["address"] == "10.233.1.2"
    assert json.loads((fake_dir / "_starts.json").read_text())["starts"] == {"web-0": 1}
    assert not [e for e in os.listdir(fake_dir) if e.startswith(".tmp-")]
