"""A node VM for system tests: scripts/node-vm's cached Debian image booted
under UML with SODA's node kernel (systemd as PID 1, cgroup v2), on a TAP
of its own with a /30 of 10.250.0.0/16 not in use on this host. The test
logs in over SSH with the image's key, over one multiplexed connection
(a new SSH connection costs the VM a second of key exchange and sshd
startup; a session on an open one, a fifth of that). Everything it made
(the VM's processes, by the process group it started, the SSH master,
the TAP, the COW file) is removed by `close()`, whatever happened."""

from __future__ import annotations

import os
import random
import shlex
import signal
import subprocess
import tempfile
import time

from tests.system.guests import TOP

NODE_VM = os.path.join(TOP, "scripts", "node-vm")
CACHE = os.environ.get("SODA_NODE_VM_CACHE", "/var/cache/soda/node-vm")
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", "-o", "ServerAliveInterval=5"]


def build() -> str:
    """The image's directory: built once, then cached (scripts/node-vm build)."""
    result = subprocess.run([NODE_VM, "build"], capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/node-vm build failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def _used_addresses() -> str:
    return subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout


class NodeVM:
    def __init__(self, image_dir: str, prefix: str):
        self.image_dir = image_dir
        self.key = os.path.join(image_dir, "id_ed25519")
        self.work = tempfile.mkdtemp(prefix=f"{prefix}-vm-")
        self.tap = f"{prefix}vm"[:15]
        used = _used_addresses()
        while True:
            a, b = random.randrange(0, 256), random.randrange(0, 64) * 4
            if f" 10.250.{a}." not in used:
                break
        self.host_ip, self.ip = f"10.250.{a}.{b + 1}", f"10.250.{a}.{b + 2}"
        self.console = os.path.join(self.work, "console.log")
        # The multiplexing master's socket: ssh starts the master with the
        # first call and close() tells it to exit (it would after 60 s idle).
        self.control = ["-o", "ControlMaster=auto", "-o", f"ControlPath={self.work}/ssh-%C",
                        "-o", "ControlPersist=60"]
        self.proc: subprocess.Popen | None = None
        self._tap_made = False

    # ---- life -----------------------------------------------------------
    def boot(self, timeout: float = 120.0) -> float:
        """Boot and wait for SSH; the seconds it took."""
        subprocess.run(["ip", "tuntap", "add", "dev", self.tap, "mode", "tap"], check=True)
        self._tap_made = True
        subprocess.run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.tap], check=True)
        subprocess.run(["ip", "link", "set", self.tap, "up"], check=True)
        start = time.monotonic()
        with open(self.console, "wb") as console:
            # A session of its own: UML's host processes share its group,
            # which close() kills whole.
            self.proc = subprocess.Popen(
                [NODE_VM, "boot", "--tap", self.tap, "--ip", f"{self.ip}/30", "--gw", self.host_ip,
                 "--cow", os.path.join(self.work, "root.cow"), "--mem", "1536M",
                 "--umid", os.path.basename(self.work), "--uml-dir", self.work],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, "TMPDIR": self.work})
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node VM exited ({self.proc.returncode}):\n{self.console_tail()}")
            if self.ssh("true", check=False, timeout=10).returncode == 0:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"no SSH on the node VM after {timeout:.0f} s:\n{self.console_tail()}")
            time.sleep(1.0)

    def console_tail(self, lines: int = 40) -> str:
        try:
            with open(self.console, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        running = self.proc is not None and self.proc.poll() is None
        if running:
            self.ssh("systemctl --no-block poweroff", check=False, timeout=10)
        subprocess.run(["ssh", *self.control, "-O", "exit", f"root@{self.ip}"], capture_output=True,
                       timeout=10, check=False)
        if running:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=20)
        if self._tap_made:
            subprocess.run(["ip", "link", "del", self.tap], capture_output=True)
        subprocess.run(["rm", "-rf", self.work])

    # ---- inside ---------------------------------------------------------
    def ssh(self, command: str, check: bool = True, timeout: float = 120,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(["ssh", "-i", self.key, *SSH_OPTIONS, *self.control, f"root@{self.ip}", command],
                                input=input, capture_output=True, timeout=timeout,
                                stdin=None if input is not None else subprocess.DEVNULL)
        result.stdout, result.stderr = (result.stdout.decode(errors="replace"),
                                        result.stderr.decode(errors="replace"))
        if check and result.returncode != 0:
            raise AssertionError(f"in the node VM, `{command}` exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def copy_in(self, source_dir: str, dest: str, *exclude: str) -> None:
        """`source_dir`'s tree into `dest` in the VM."""
        tar = subprocess.run(["tar", "-C", source_dir, "-cf", "-", *(f"--exclude={e}" for e in exclude), "."],
                             capture_output=True, check=True)
        self.ssh(f"mkdir -p {shlex.quote(dest)} && tar -xf - -C {shlex.quote(dest)}", input=tar.stdout)

    def write(self, path: str, text: str, mode: str = "644") -> None:
        self.ssh(f"install -D -m {mode} /dev/stdin {shlex.quote(path)}", input=text.encode())

    def main_pid(self, unit: str) -> int:
        return int(self.ssh(f"systemctl show -p MainPID --value {unit}").stdout.strip())

    def unit_property(self, unit: str, prop: str) -> str:
        return self.ssh(f"systemctl show -p {prop} --value {unit}").stdout.strip()
