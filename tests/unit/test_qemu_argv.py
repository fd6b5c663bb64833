"""The QEMU driver without root and without booting: golden command lines,
spec refusals, the QMP client against a scripted server, and how records,
identity checks, adoption (/proc and QMP), freeze/thaw and stop behave
against ordinary processes standing in for a VMM."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from soda.errors import InvalidSpec, NotFound, WrongState
from soda.files import write_json_atomic
from soda.hypervisors import launch
from soda.hypervisors.base import DRIVERS, EXITED, RUNNING, GuestSpec, make_driver, spec_as_dict
from soda.hypervisors.recorded import LAUNCHER
from soda.hypervisors.qemu import QemuDriver, _proc_starttime, guest_mac
from soda.hypervisors.qmp import QmpError, qmp
from soda.model.spec import Resources
from tests.support import free_port

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
UPDATE = os.environ.get("SODA_UPDATE_GOLDEN") == "1"
GOLDEN_LAUNCHER = "soda/hypervisors/launch.py"
KERNEL = "/boot/vmlinuz-6.1.0-99-amd64"


def spec(name="web-0", memory=128, image="/var/lib/soda/agent/images/sha256-ab12/rootfs.img", **kw):
    return GuestSpec(name=name, service="web", image_path=image, image_digest="sha256:" + "ab" * 32,
                     resources=Resources(cpu=0.5, memory=memory, bandwidth=10, disk=64),
                     address="10.233.1.2", prefix_length=24, gateway="10.233.1.1", port=80,
                     hypervisor="qemu", generation=3, **kw)


def golden_driver(state_dir="/var/lib/soda/agent", **kw):
    kw.setdefault("python", "/opt/soda/venv/bin/python")
    kw.setdefault("qemu", "/usr/bin/qemu-system-x86_64")
    kw.setdefault("qemu_img", "/usr/bin/qemu-img")
    kw.setdefault("kernel", KERNEL)
    kw.setdefault("accel", "tcg")
    kw.setdefault("sandbox", "off")          # "auto" would probe this machine's QEMU
    return QemuDriver(state_dir, **kw)


def check_golden(name: str, argv: list[str]) -> None:
    path = os.path.join(GOLDEN, f"{name}.argv")
    # The launcher is named by its path in this checkout: the file says where in the package.
    text = "".join(f"{GOLDEN_LAUNCHER if arg == LAUNCHER else arg}\n" for arg in argv)
    if UPDATE:
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read(), f"argv differs from {path} (SODA_UPDATE_GOLDEN=1 to accept)"


# ---- golden command lines ----------------------------------------------------

def test_argv_plain_guest():
    check_golden("qemu-plain", golden_driver().build_argv(spec()))


def test_argv_with_netns_cgroups_tap_uid_and_sandbox(monkeypatch):
    from soda.hypervisors import qemu
    # As if the probe had found -sandbox works with this QEMU.
    monkeypatch.setitem(qemu._sandbox_verdicts, "/usr/bin/qemu-system-x86_64", qemu.SANDBOX)
    s = spec(name="web-1", memory=96, tap="sv-web-1", netns="soda-node",
             cgroups=("/sys/fs/cgroup/cpu/soda/web-1", "/sys/fs/cgroup/memory/soda/web-1"),
             init="/init", uid=200007, open_files=1024)
    driver = golden_driver(initramfs="/opt/soda/initramfs.img", sandbox="auto")
    check_golden("qemu-full", driver.build_argv(s))


def test_sandbox_is_what_the_probe_found_and_the_fingerprint_says_so(monkeypatch):
    from soda.hypervisors import qemu
    monkeypatch.setitem(qemu._sandbox_verdicts, "/usr/bin/qemu-system-x86_64",
                        "unsupported: -sandbox is not supported by this QEMU binary")
    driver = golden_driver(sandbox="auto")
    assert "-sandbox" not in driver.build_argv(spec())
    assert driver.sandbox_note.startswith("unsupported: ")
    assert "-sandbox" not in golden_driver(sandbox="off").build_argv(spec())
    with pytest.raises(InvalidSpec, match="sandbox 'maybe'"):
        golden_driver(sandbox="maybe")


def test_argv_moves_the_qmp_socket_when_its_path_is_too_long():
    deep = "/var/lib/" + "/".join(["very-long-directory-name"] * 4)
    argv = golden_driver(deep, short_dir="/run/soda-qemu").build_argv(spec(tap="t0"))
    check_golden("qemu-long-state-dir", argv)
    qmp_arg = argv[argv.index("-qmp") + 1]
    assert qmp_arg.startswith("unix:/run/soda-qemu/") and len(qmp_arg.split(",")[0]) < 113


def test_argv_is_pure_and_boots_the_contract():
    d = QemuDriver("/srv/state", kernel="/boot/vmlinuz-6.1.0-9-amd64", accel="tcg")
    assert d.build_argv(spec()) == d.build_argv(spec())
    argv = d.build_argv(spec(tap="tap7"))
    # The launcher runs as a script without the site machinery: it starts fast.
    assert argv[:4] == [sys.executable, "-I", "-S", LAUNCHER]
    assert LAUNCHER == os.path.abspath(launch.__file__)
    vmm = argv[argv.index("--") + 1:]
    assert vmm[vmm.index("-accel") + 1] == "tcg"
    assert vmm[vmm.index("-kernel") + 1] == "/boot/vmlinuz-6.1.0-9-amd64"
    assert vmm[vmm.index("-initrd") + 1] == "/srv/state/qemu/_initramfs/initramfs-6.1.0-9-amd64.img"
    append = vmm[vmm.index("-append") + 1].split()
    assert append[:3] == ["console=ttyS0", "root=/dev/vda", "rw"]
    assert append[-4:] == ["soda.ip=10.233.1.2/24", "soda.gw=10.233.1.1", "soda.name=web-0",
                           "soda.service=web"]
    assert "init=/sbin/init" in append
    assert "file=/srv/state/qemu/web-0/vmm/overlay.qcow2,format=qcow2,if=virtio" in \
        vmm[vmm.index("-drive") + 1]
    assert "tap,id=n0,ifname=tap7,script=no,downscript=no" in vmm
    assert f"virtio-net-pci,netdev=n0,mac={guest_mac('10.233.1.2')}" in vmm
    assert "-no-reboot" in vmm and "-nodefaults" in vmm
    assert "--no-aslr" not in argv
    assert not os.path.exists("/srv/state/qemu"), "build_argv must not touch the disk"


def test_mac_follows_the_address_like_uml():
    # A new guest at a reused address must get the MAC its peers cached.
    from soda.hypervisors import uml
    assert guest_mac is uml.guest_mac


# ---- refusals --------------------------------------------------------------------

@pytest.mark.parametrize("memory", [0, 32, 64])
def test_too_little_memory_is_refused(memory):
    with pytest.raises(InvalidSpec, match="below the 96 MiB"):
        golden_driver().build_argv(spec(memory=memory))


@pytest.mark.parametrize("field, value", [("image", "/images/a,b.img"), ("image", "/images/a b.img"),
                                          ("init", "sbin/init"), ("tap", "t,0"), ("netns", "../x")])
def test_values_that_would_break_the_command_line_are_refused(field, value):
    s = spec(image=value) if field == "image" else spec(**{field: value})
    with pytest.raises(InvalidSpec):
        golden_driver().build_argv(s)


def test_bad_names_and_accelerators_are_refused():
    with pytest.raises(InvalidSpec):
        golden_driver().build_argv(spec(name="../etc"))
    with pytest.raises(InvalidSpec, match="accelerator"):
        golden_driver(accel="hvf")
    with pytest.raises(InvalidSpec, match="version"):
        golden_driver(kernel="/opt/bzImage")


def test_start_checks_the_host_first(tmp_path):
    image = tmp_path / "base.img"
    image.write_bytes(b"x")
    initramfs = tmp_path / "initramfs.img"
    initramfs.write_bytes(b"x")
    d = QemuDriver(str(tmp_path / "state"), qemu=str(tmp_path / "no-qemu"), kernel=KERNEL,
                   initramfs=str(initramfs), accel="tcg")
    with pytest.raises(NotFound, match="QEMU"):
        d.start(spec(image=str(image)))
    d = QemuDriver(str(tmp_path / "state"), qemu="/bin/true", kernel="/bin/true",
                   initramfs=str(tmp_path / "none.img"), accel="tcg")
    with pytest.raises(NotFound, match="initramfs"):
        d.start(spec(image=str(image)))
    d = QemuDriver(str(tmp_path / "state"), qemu="/bin/true", kernel="/bin/true",
                   initramfs=str(initramfs), accel="tcg")
    with pytest.raises(NotFound, match="image"):
        d.start(spec(image=str(tmp_path / "missing.img")))
    with pytest.raises(NotFound, match="network namespace"):
        d.start(spec(image=str(image), netns="sodau-does-not-exist"))
    with pytest.raises(NotFound, match="cgroup"):
        d.start(spec(image=str(image), cgroups=(str(tmp_path / "no-cgroup"),)))
    assert d.list() == {}


def test_registry_knows_qemu(tmp_path):
    assert DRIVERS["qemu"] is QemuDriver
    d = make_driver("qemu", str(tmp_path), QemuDriver.Config(kernel=KERNEL, accel="tcg"))
    assert isinstance(d, QemuDriver) and d.kernel == KERNEL and d.accel == "tcg"


# ---- QMP -------------------------------------------------------------------------

class FakeQmp:
    """A scripted QMP server on a Unix socket: greets, negotiates, answers
    each command from `answers` (a dict value, or an exception dict), and
    sends an event before every answer to prove clients skip them."""

    def __init__(self, path, answers):
        self.path = path
        self.answers = answers
        self.commands: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                f = conn.makefile("rwb")
                f.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
                f.flush()
                for line in f:
                    cmd = json.loads(line)["execute"]
                    self.commands.append(cmd)
                    f.write(b'{"event": "SOMETHING", "data": {}}\n')
                    if cmd == "qmp_capabilities":
                        f.write(b'{"return": {}}\n')
                    elif cmd in self.answers:
                        answer = self.answers[cmd]
                        answer = answer() if callable(answer) else answer
                        f.write(json.dumps(answer).encode() + b"\n")
                    else:
                        f.write(json.dumps({"error": {"class": "CommandNotFound",
                                                      "desc": f"no {cmd}"}}).encode() + b"\n")
                    f.flush()

    def close(self):
        self.sock.close()


def test_qmp_client_negotiates_skips_events_and_reports_errors(tmp_path):
    server = FakeQmp(str(tmp_path / "qmp.sock"), {"query-status": {"return": {"status": "running"}}})
    try:
        assert qmp(server.path, "query-status") == {"status": "running"}
        assert server.commands == ["qmp_capabilities", "query-status"]
        with pytest.raises(QmpError, match="CommandNotFound"):
            qmp(server.path, "bogus")
    finally:
        server.close()
    with pytest.raises(OSError):
        qmp(str(tmp_path / "nothing.sock"), "query-status", timeout=0.5)


# ---- records, identity, adoption, stop (ordinary processes as the VMM) --------------

@pytest.fixture
def stand_ins():
    started = []

    def spawn(argv):
        p = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)
        started.append(p)
        want = [a.encode() for a in argv]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/proc/{p.pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:-1] == want:
                    break
            time.sleep(0.01)
        return p

    yield spawn
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def plant_record(driver, name, pid, vmm_argv):
    """A record as start() writes it, for a process started by the test;
    its guest "listens" on a closed loopback port."""
    s = dataclasses.replace(spec(name=name), address="127.0.0.1", port=free_port())
    directory = driver.guest_dir(name)
    os.makedirs(driver.vmm_dir(name), exist_ok=True)
    for path in (driver.overlay_path(name), driver.console_path(name)):
        open(path, "w").close()
    argv = [sys.executable, "-m", "soda.hypervisors.launch", "--"] + vmm_argv
    record = {"name": name, "pid": pid, "starttime": _proc_starttime(pid), "started_at": 1234.5,
              "argv": argv, "vmm_argv": vmm_argv, "generation": 3, "qmp": driver.qmp_path(name),
              "spec": spec_as_dict(s)}
    write_json_atomic(os.path.join(directory, "guest.json"), record)
    return record


def driver_in(tmp_path, **kw):
    # A short state dir: the QMP socket path must fit in sun_path.
    state = tmp_path / "s"
    return QemuDriver(str(state), kernel=KERNEL, accel="tcg", short_dir=str(tmp_path / "run"), **kw)


def test_a_recorded_process_is_adopted_and_checked_over_qmp(tmp_path, stand_ins):
    vmm = stand_ins(["sleep", "300"])
    d = driver_in(tmp_path)
    plant_record(d, "web-0", vmm.pid, ["sleep", "300"])
    status = {"return": {"status": "running", "running": True}}
    server = FakeQmp(d.qmp_path("web-0"), {"query-status": lambda: status,
                                           "stop": {"return": {}}, "cont": {"return": {}}})
    try:
        fresh = driver_in(tmp_path)
        info = fresh.info("web-0")
        assert info.state == RUNNING and info.pid == vmm.pid and info.generation == 3
        assert "query-status" in server.commands, "adoption must ask QEMU too"
        assert fresh.list() == {"web-0": info}
        assert fresh.start(dataclasses.replace(spec(), image_path="/bin/sh")).pid == vmm.pid
        fresh.freeze("web-0")
        fresh.thaw("web-0")
        assert server.commands[-4:] == ["qmp_capabilities", "stop", "qmp_capabilities", "cont"]
        # A VMM whose VM has ended (a new driver asks again) is not running.
        status = {"return": {"status": "guest-panicked", "running": False}}
        ended = driver_in(tmp_path).info("web-0")
        assert ended.state == EXITED and "guest-panicked" in ended.exit_reason
    finally:
        server.close()
    with pytest.raises(NotFound):
        d.freeze("web-9")


def test_a_recorded_pid_with_another_start_time_or_cmdline_is_not_ours(tmp_path, stand_ins):
    vmm = stand_ins(["sleep", "300"])
    d = driver_in(tmp_path)
    record = plant_record(d, "web-0", vmm.pid, ["sleep", "301"])
    info = d.info("web-0")
    assert info.state == EXITED and "belongs to another process" in info.exit_reason
    with pytest.raises(WrongState):
        d.freeze("web-0")
    record["vmm_argv"] = ["sleep", "300"]
    record["starttime"] -= 1
    write_json_atomic(os.path.join(d.guest_dir("web-0"), "guest.json"), record)
    assert d.info("web-0").state == EXITED
    d.stop("web-0", timeout=0.1)
    assert vmm.poll() is None
    assert d.list() == {} and os.listdir(d.dir) == []


def test_exit_reason_comes_from_the_console(tmp_path):
    d = driver_in(tmp_path)
    p = subprocess.Popen(["true"])
    p.wait()
    os.makedirs(d.guest_dir("web-0"))
    with open(d.console_path("web-0"), "w") as f:
        f.write("booting\nsoda-initramfs: cannot mount /dev/vda (ext4) on /newroot\n"
                "Kernel panic - not syncing: Attempted to kill init!\n")
    write_json_atomic(os.path.join(d.guest_dir("web-0"), "guest.json"),
                      {"name": "web-0", "pid": p.pid, "starttime": 1, "started_at": 1.0,
                       "argv": ["x"], "vmm_argv": ["x"], "generation": 1,
                       "qmp": d.qmp_path("web-0"),
                       "spec": {"address": "127.0.0.1", "port": 1, "netns": ""}})
    info = d.info("web-0")
    assert info.state == EXITED
    assert info.exit_reason == "soda-initramfs: cannot mount /dev/vda (ext4) on /newroot"
    assert not d.is_ready("web-0")


def test_stop_asks_qmp_then_terminates_the_vmm(tmp_path, stand_ins):
    vmm = stand_ins(["sleep", "300"])
    d = driver_in(tmp_path, powerdown_grace=0.1, term_grace=2.0)
    plant_record(d, "web-0", vmm.pid, ["sleep", "300"])
    # QEMU answers but the guest ignores ACPI and "quit" is not obeyed (a
    # stand-in cannot exit): the driver goes on to SIGTERM.
    server = FakeQmp(d.qmp_path("web-0"), {"query-status": {"return": {"status": "running"}},
                                           "system_powerdown": {"return": {}},
                                           "quit": {"return": {}}})
    try:
        t = time.monotonic()
        d.stop("web-0", timeout=0.5)
        assert time.monotonic() - t < 3.0
        assert server.commands.count("system_powerdown") == 1 and "quit" in server.commands
    finally:
        server.close()
    assert vmm.wait(5) == -signal.SIGTERM
    assert d.list() == {} and os.listdir(d.dir) == []
    d.stop("web-0", timeout=1)


def test_readiness_is_a_tcp_connect(tmp_path, stand_ins):
    vmm = stand_ins(["sleep", "300"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    d = driver_in(tmp_path)
    plant_record(d, "web-0", vmm.pid, ["sleep", "300"])
    record_path = os.path.join(d.guest_dir("web-0"), "guest.json")
    with open(record_path) as f:
        record = json.load(f)
    record["spec"].update(port=port)
    write_json_atomic(record_path, record)
    assert not d.is_ready("web-0") and not d.list()["web-0"].ready
    listener.listen()
    assert d.is_ready("web-0")
    assert d.list()["web-0"].ready
    listener.close()
    assert d.is_ready("web-0"), "readiness latches once the guest served"
