"""The UML driver without root and without booting: golden command lines,
spec refusals, the launcher, and how records, identity checks, adoption and
stop behave against ordinary processes standing in for a VMM; the mconsole
client against a socket that speaks UML's side of the protocol."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from soda.errors import InvalidSpec, NotFound
from soda.files import write_json_atomic
from soda.hypervisors import launch
from soda.hypervisors.base import DRIVERS, EXITED, RUNNING, GuestSpec, make_driver, spec_as_dict
from soda.hypervisors.recorded import LAUNCHER
from soda.hypervisors.uml import (UML_READS, UmlDriver, _proc_starttime, linked_files, mconsole,
                                 parse_meminfo)
from soda.model.spec import Resources
from tests.support import free_port

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
# SODA_UPDATE_GOLDEN=1 rewrites the golden files from the code (then review the diff).
UPDATE = os.environ.get("SODA_UPDATE_GOLDEN") == "1"
GOLDEN_LAUNCHER = "soda/hypervisors/launch.py"


def spec(name="web-0", memory=64, image="/var/lib/soda/agent/images/sha256-ab12/rootfs.img", **kw):
    return GuestSpec(name=name, service="web", image_path=image, image_digest="sha256:" + "ab" * 32,
                     resources=Resources(cpu=0.5, memory=memory, bandwidth=10, disk=64),
                     address="10.233.1.2", prefix_length=24, gateway="10.233.1.1", port=80,
                     hypervisor="uml", generation=3, **kw)


def golden_driver(state_dir="/var/lib/soda/agent", **kw):
    kw.setdefault("python", "/opt/soda/venv/bin/python")
    # Explicit: "auto" would pick whatever kernel this machine has built.
    kw.setdefault("kernel", "/usr/bin/linux.uml")
    driver = UmlDriver(state_dir, confine_files=False, **kw)
    return driver


def confined(driver):
    """`driver` as it runs on a host with Landlock, whatever this one has."""
    driver.kernel_files = ("/usr/bin/linux.uml", "/lib64/ld-linux-x86-64.so.2",
                           "/lib/x86_64-linux-gnu/libc.so.6", *UML_READS)
    return driver


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
    check_golden("uml-plain", golden_driver().build_argv(spec()))


def test_argv_with_netns_cgroups_and_tap():
    s = spec(name="web-1", memory=32, tap="sv-web-1", netns="soda-node",
             cgroups=("/sys/fs/cgroup/cpu/soda/web-1", "/sys/fs/cgroup/memory/soda/web-1"),
             init="/init", uid=200007, open_files=1024)
    # min_memory: this golden argv boots at 32 MiB, below Debian's default minimum.
    check_golden("uml-full", confined(golden_driver(min_memory=32)).build_argv(s))


def test_argv_moves_the_control_socket_when_its_path_is_too_long():
    deep = "/var/lib/" + "/".join(["very-long-directory-name"] * 4)
    argv = golden_driver(deep, short_dir="/run/soda-uml").build_argv(spec(tap="t0"))
    check_golden("uml-long-state-dir", argv)
    uml_dir = next(a for a in argv if a.startswith("uml_dir="))[len("uml_dir="):]
    assert uml_dir.startswith("/run/soda-uml/")
    assert len(os.path.join(uml_dir, "web-0", "mconsole")) < 108


def test_argv_is_pure_and_uses_the_agents_interpreter():
    d = UmlDriver("/srv/state", kernel="/opt/uml/linux")
    assert d.build_argv(spec()) == d.build_argv(spec())
    argv = d.build_argv(spec())
    # The launcher runs as a script without the site machinery: it starts fast.
    assert argv[:4] == [sys.executable, "-I", "-S", LAUNCHER]
    assert LAUNCHER == os.path.abspath(launch.__file__)
    kernel = argv[argv.index("--") + 1:]
    assert kernel[0] == "/opt/uml/linux"
    assert "--no-aslr" in argv[:argv.index("--")]
    assert f"ubd0=/srv/state/uml/web-0/vmm/cow.img,{spec().image_path}" in kernel
    assert "uml_dir=/srv/state/uml/web-0/vmm/" in kernel
    assert not os.path.exists("/srv/state/uml"), "build_argv must not touch the disk"


def test_boot_options_go_before_the_contract():
    argv = golden_driver(boot_options=["quiet"]).build_argv(spec())
    assert argv.index("quiet") < argv.index("soda.ip=10.233.1.2/24")
    assert argv[-4:] == ["soda.ip=10.233.1.2/24", "soda.gw=10.233.1.1", "soda.name=web-0",
                         "soda.service=web"]


# ---- refusals --------------------------------------------------------------------

@pytest.mark.parametrize("memory", [0, 16, 31])
def test_too_little_memory_is_refused(memory):
    # Debian's kernel needs 32 (soda.hypervisors.kernels); SODA's 16: tests/unit/test_kernels.py.
    with pytest.raises(InvalidSpec, match="below the 32 MiB"):
        golden_driver().build_argv(spec(memory=memory))


def test_memory_minimum_is_a_driver_option():
    golden_driver(min_memory=12).build_argv(spec(memory=16))
    with pytest.raises(InvalidSpec):
        golden_driver(min_memory=48).build_argv(spec(memory=32))


@pytest.mark.parametrize("field, value", [("image", "/images/a,b.img"), ("image", "/images/a b.img"),
                                          ("init", "sbin/init"), ("tap", "t,0"), ("netns", "../x")])
def test_values_that_would_break_the_command_line_are_refused(field, value):
    s = spec(image=value) if field == "image" else spec(**{field: value})
    with pytest.raises(InvalidSpec):
        golden_driver().build_argv(s)


def test_bad_names_are_refused():
    with pytest.raises(InvalidSpec):
        golden_driver().build_argv(spec(name="../etc"))


def test_start_checks_the_host_first(tmp_path):
    image = tmp_path / "base.img"
    image.write_bytes(b"x")
    d = UmlDriver(str(tmp_path / "state"), kernel=str(tmp_path / "no-kernel"))
    with pytest.raises(NotFound, match="kernel"):
        d.start(spec(image=str(image)))
    d = UmlDriver(str(tmp_path / "state"), kernel="/bin/true")
    with pytest.raises(NotFound, match="image"):
        d.start(spec(image=str(tmp_path / "missing.img")))
    with pytest.raises(NotFound, match="network namespace"):
        d.start(spec(image=str(image), netns="sodau-does-not-exist"))
    with pytest.raises(NotFound, match="cgroup"):
        d.start(spec(image=str(image), cgroups=(str(tmp_path / "no-cgroup"),)))
    assert d.list() == {}


def test_registry_knows_uml(tmp_path):
    assert DRIVERS["uml"] is UmlDriver
    d = make_driver("uml", str(tmp_path), UmlDriver.Config(kernel="/opt/linux"))
    assert isinstance(d, UmlDriver) and d.kernel == "/opt/linux"


# ---- the launcher ------------------------------------------------------------------

def test_launcher_parses_its_options():
    opts = launch.parse(["--hold", "--netns", "n1", "--cgroup", "/a", "--cgroup=/b", "--no-aslr",
                         "--log", "/l", "--", "/bin/k", "--netns", "x"])
    assert opts == {"netns": "n1", "cgroups": ["/a", "/b"], "no_aslr": True, "hold": True,
                    "log": "/l", "argv": ["/bin/k", "--netns", "x"], "nofile": None,
                    "user": None, "group": None, "fs_read": [], "fs_write": []}
    for bad in ([], ["--", ], ["--bogus", "--", "x"], ["--netns"], ["--netns", "a/b", "--", "x"]):
        with pytest.raises(launch.LaunchError):
            launch.parse(bad)


def test_launcher_keeps_its_pid_sets_the_personality_and_logs(tmp_path):
    log = tmp_path / "console.log"
    child = subprocess.Popen([sys.executable, "-m", "soda.hypervisors.launch", "--no-aslr",
                              "--log", str(log), "--", "/bin/sh", "-c",
                              "echo pid=$$; cat /proc/self/personality; read x; echo read=$x"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, _ = child.communicate(b"from-stdin\n", timeout=10)
    assert child.returncode == 0
    assert out == b""                                    # stdout went to the log
    lines = log.read_text().split()
    assert lines[0] == f"pid={child.pid}"                # exec, not fork
    assert int(lines[1], 16) & launch.ADDR_NO_RANDOMIZE
    assert lines[2] == "read="                           # stdin is /dev/null


def test_launcher_runs_as_the_drivers_run_it(tmp_path):
    # As a script without the site machinery (-I -S): it must not need SODA's imports.
    log = tmp_path / "console.log"
    r = subprocess.run([sys.executable, "-I", "-S", LAUNCHER, "--no-aslr", "--log", str(log), "--",
                        "/bin/sh", "-c", "cat /proc/self/personality"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert int(log.read_text(), 16) & launch.ADDR_NO_RANDOMIZE
    r = subprocess.run([sys.executable, "-I", "-S", LAUNCHER, "--netns", "sodau-does-not-exist",
                        "--", "/bin/true"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "soda-launch: cannot enter network namespace sodau-does-not-exist: "
        "network namespace sodau-does-not-exist does not exist"]


def test_launcher_fails_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "soda.hypervisors.launch", "--netns",
                        "sodau-does-not-exist", "--", "/bin/true"], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "soda-launch: cannot enter network namespace sodau-does-not-exist: "
        "network namespace sodau-does-not-exist does not exist"]
    marker = tmp_path / "ran"
    r = subprocess.run([sys.executable, "-m", "soda.hypervisors.launch", "--cgroup",
                        str(tmp_path / "no-such-cgroup"), "--", "/bin/touch", str(marker)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("soda-launch: cannot join cgroup ")
    assert not marker.exists(), "nothing runs outside its cgroup"
    r = subprocess.run([sys.executable, "-m", "soda.hypervisors.launch", "--", "/nonexistent/vmm"],
                       capture_output=True, text=True)
    assert r.returncode == 127 and "cannot execute /nonexistent/vmm" in r.stderr


# ---- records, identity, adoption, stop (ordinary processes as the VMM) --------------

@pytest.fixture
def stand_ins():
    """Processes the tests start in sessions of their own; killed after."""
    started = []

    def spawn(argv, becomes=None):
        p = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)
        started.append(p)
        # Wait until it shows the command line the record will hold.
        want = [a.encode() for a in (becomes or argv)]
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


def plant_record(driver, name, pid, kernel_argv, **spec_kw):
    """A record as start() writes it, for a process started by the test.
    Its guest "listens" on a closed loopback port: readiness probes made by
    list() must not leave the host."""
    s = dataclasses.replace(spec(name=name, **spec_kw), address="127.0.0.1", port=free_port())
    directory = driver.guest_dir(name)
    os.makedirs(directory, exist_ok=True)
    for entry in ("cow.img", "console.log"):
        open(os.path.join(directory, entry), "w").close()
    argv = [sys.executable, "-m", "soda.hypervisors.launch", "--"] + kernel_argv
    record = {"name": name, "pid": pid, "starttime": _proc_starttime(pid), "started_at": 1234.5,
              "argv": argv, "kernel_argv": kernel_argv, "generation": 3,
              "uml_dir": driver.uml_dir(name), "spec": spec_as_dict(s)}
    write_json_atomic(os.path.join(directory, "guest.json"), record)
    return record


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_recorded_process_is_running_and_adopted(tmp_path, stand_ins):
    vmm = stand_ins(["sleep", "300"])
    d = UmlDriver(str(tmp_path / "state"), short_dir=str(tmp_path / "run"))
    plant_record(d, "web-0", vmm.pid, ["sleep", "300"])
    fresh = UmlDriver(str(tmp_path / "state"), short_dir=str(tmp_path / "run"))
    info = fresh.info("web-0")
    assert info.state == RUNNING and info.pid == vmm.pid and info.generation == 3
    assert info.started_at == 1234.5
    assert fresh.list() == {"web-0": info}
    # Starting it again returns it untouched.
    assert fresh.start(spec(image="/bin/sh")).pid == vmm.pid


def test_a_recorded_pid_with_another_start_time_or_cmdline_is_not_ours(tmp_path, stand_ins):
    vmm = stand_ins(["sleep", "300"])
    d = UmlDriver(str(tmp_path / "state"), short_dir=str(tmp_path / "run"))
    record = plant_record(d, "web-0", vmm.pid, ["sleep", "301"])
    info = d.info("web-0")
    assert info.state == EXITED and "belongs to another process" in info.exit_reason
    record["kernel_argv"] = ["sleep", "300"]
    record["starttime"] -= 1
    write_json_atomic(os.path.join(d.guest_dir("web-0"), "guest.json"), record)
    assert d.info("web-0").state == EXITED
    # Stop forgets the guest but must not touch a process it cannot prove is its own.
    d.stop("web-0", timeout=0.1)
    assert vmm.poll() is None
    assert d.list() == {} and os.listdir(d.dir) == []


def test_exit_reason_comes_from_the_console(tmp_path):
    d = UmlDriver(str(tmp_path / "state"), short_dir=str(tmp_path / "run"))
    p = subprocess.Popen(["true"])
    p.wait()
    os.makedirs(d.guest_dir("web-0"))
    with open(d.console_path("web-0"), "w") as f:
        f.write("booting\nKernel panic - not syncing: VFS: Unable to mount root fs\nend trace\n")
    write_json_atomic(os.path.join(d.guest_dir("web-0"), "guest.json"),
                      {"name": "web-0", "pid": p.pid, "starttime": 1, "started_at": 1.0, "argv": ["x"],
                       "kernel_argv": ["x"], "generation": 1, "uml_dir": d.uml_dir("web-0"),
                       "spec": {"address": "127.0.0.1", "port": 1, "netns": ""}})
    info = d.info("web-0")
    assert info.state == EXITED
    assert info.exit_reason == "Kernel panic - not syncing: VFS: Unable to mount root fs"
    assert not d.is_ready("web-0")


def test_stop_terminates_the_vmm_and_sweeps_its_session(tmp_path, stand_ins):
    # A "VMM" with a helper left in its session, as UML leaves them when
    # its main process is killed.
    vmm = stand_ins(["/bin/sh", "-c", "sleep 300 & exec sleep 300"], becomes=["sleep", "300"])
    kernel_argv = ["sleep", "300"]
    d = UmlDriver(str(tmp_path / "state"), short_dir=str(tmp_path / "run"), term_grace=2.0)
    plant_record(d, "web-0", vmm.pid, kernel_argv)
    deadline = time.monotonic() + 5
    helpers = []
    while not helpers and time.monotonic() < deadline:
        helpers = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != vmm.pid
                   and _session(int(p)) == vmm.pid]
        time.sleep(0.01)
    assert helpers
    t = time.monotonic()
    d.stop("web-0", timeout=0.3)        # no mconsole socket: straight to SIGTERM
    assert time.monotonic() - t < 2.0
    assert vmm.wait(5) == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while not all(gone(h) for h in helpers) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(gone(h) for h in helpers)
    assert d.list() == {} and os.listdir(d.dir) == []
    d.stop("web-0", timeout=1)           # stopping an absent guest succeeds


def _session(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[3])
    except (FileNotFoundError, ProcessLookupError):
        return None


def test_readiness_is_a_tcp_connect(tmp_path, stand_ins):
    vmm = stand_ins(["sleep", "300"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    d = UmlDriver(str(tmp_path / "state"), short_dir=str(tmp_path / "run"))
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
    assert not d.is_ready("web-1")


CALIBRATED = b"Linux version 6.1.192\nCalibrating delay loop... 2315.05 BogoMIPS (lpj=11575296)\n"


def test_guests_are_told_the_delay_loop_a_served_guest_measured(tmp_path, stand_ins):
    # A kernel measures its delay loop at boot unless told the figure (lpj=).
    vmm = stand_ins(["sleep", "300"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    d = UmlDriver(str(tmp_path / "state"), short_dir=str(tmp_path / "run"))
    assert not [a for a in d.build_argv(spec(name="web-1")) if a.startswith("lpj=")]
    record = plant_record(d, "web-0", vmm.pid, ["sleep", "300"])
    record["spec"].update(port=listener.getsockname()[1])
    write_json_atomic(os.path.join(d.guest_dir("web-0"), "guest.json"), record)
    with open(d.console_path("web-0"), "wb") as f:
        f.write(CALIBRATED)
    assert d.is_ready("web-0")
    listener.close()
    argv = d.build_argv(spec(name="web-1"))
    # Before the operator's boot options: of two lpj= the kernel takes the last.
    assert argv.index("lpj=11575296") < argv.index("soda.ip=10.233.1.2/24")
    told = UmlDriver(str(tmp_path / "state"), boot_options=["lpj=4000000"])
    told.lpj = 11575296
    argv = told.build_argv(spec())
    assert argv.index("lpj=11575296") < argv.index("lpj=4000000")


def test_a_stopped_guest_leaves_the_delay_loop_it_measured(tmp_path, stand_ins):
    vmm = stand_ins(["sleep", "300"])
    d = UmlDriver(str(tmp_path / "state"), short_dir=str(tmp_path / "run"), term_grace=2.0)
    plant_record(d, "web-0", vmm.pid, ["sleep", "300"])
    with open(d.console_path("web-0"), "wb") as f:
        f.write(CALIBRATED)
    d.stop("web-0", timeout=0)
    assert "lpj=11575296" in d.build_argv(spec(name="web-1"))


def serve_mconsole_once(path: str, reply) -> threading.Thread:
    """A UML mconsole socket at `path` that takes one request and answers
    with the parts `reply(request_text)` returns (all but the last marked
    "more", as UML splits a long reply); the socket is gone afterwards."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)

    def answer():
        try:
            data, peer = server.recvfrom(1024)
            magic, version, length = struct.unpack_from("=III", data)
            assert (magic, version, len(data)) == (0xCAFEBABE, 2, 12 + 512)
            parts = reply(data[12:12 + length])
            for i, part in enumerate(parts):
                more = int(i < len(parts) - 1)
                server.sendto(struct.pack("=III512s", 0, more, len(part), part), peer)
        finally:
            server.close()

    t = threading.Thread(target=answer)
    t.start()
    return t


def test_mconsole_speaks_the_uml_protocol(tmp_path):
    server_path = str(tmp_path / "mconsole")
    t = serve_mconsole_once(server_path, lambda text: [b"ok " + text])
    assert mconsole(server_path, "version", client_dir=str(tmp_path)) == (0, "ok version")
    t.join()
    assert sorted(os.listdir(tmp_path)) == ["mconsole"]      # the client socket is gone


def test_mconsole_joins_a_reply_in_several_parts(tmp_path):
    server_path = str(tmp_path / "mconsole")
    parts = [b"\n", b"MemTotal:  58688 kB\n", b"MemFree:   52964 kB\n", b""]
    t = serve_mconsole_once(server_path, lambda text: parts)
    err, text = mconsole(server_path, "proc meminfo", client_dir=str(tmp_path))
    t.join()
    assert err == 0
    assert parse_meminfo(text) == {"MemTotal": 58688 * 1024, "MemFree": 52964 * 1024}


def test_linked_files_are_the_loader_and_libraries_of_a_dynamic_binary():
    files = linked_files("/bin/sh")
    assert files and all(os.path.isabs(f) and os.path.exists(f) for f in files)
    assert any("/libc.so" in f for f in files) and any("ld-linux" in f for f in files)
    if os.path.exists("/bin/busybox"):                     # busybox-static: links nothing
        assert linked_files("/bin/busybox") == []
    assert linked_files("/nonexistent") == []


def test_confinement_follows_the_guest_and_can_be_turned_off():
    driver = confined(golden_driver())
    argv = driver.build_argv(spec(name="web-2", tap="t2", image="/images/a.img"))
    reads = [a.split("=", 1)[1] for a in argv if a.startswith("--fs-read=")]
    writes = [a.split("=", 1)[1] for a in argv if a.startswith("--fs-write=")]
    assert "/images/a.img" in reads and "/usr/bin/linux.uml" in reads
    assert driver.vmm_dir("web-2") in writes and "/dev/net/tun" in writes
    assert not any(w.startswith("/var/lib/soda/agent/uml/web-0") for w in writes)
    # No TAP, no tun device.
    argv = driver.build_argv(spec(name="web-3"))
    assert "--fs-write=/dev/net/tun" not in argv
    assert not any(a.startswith("--fs-") for a in golden_driver().build_argv(spec()))
