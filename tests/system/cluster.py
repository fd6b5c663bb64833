"""A SODA cluster of real processes for system tests: a Master and Agents
started as separate programs, sodactl run as a command. Every process is
recorded and killed by its own pid at teardown, whatever happened. The
parts speak mutual TLS with the cluster's own CA (soda.pki under
ROOT/pki), each with a certificate of its role and name, sodactl as the
operator `tests`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from soda import pki
from soda.config import TlsConfig
from soda.rpc import tls as soda_tls
from tests.support import free_port, reachable_dir


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Cluster:
    def __init__(self, root: str, master_host: str = "127.0.0.1"):
        """`master_host`: the address the Master listens on (and its
        certificate names), e.g. a TAP's towards a node VM."""
        self.root = root
        self.master_host = master_host
        # Agents' state dirs, where guests' VMMs (each service's uid of its
        # own, soda.agent.uids) must reach their files: a dir open to traversal,
        # outside pytest's, which pytest makes 0700 again at every session
        # start (another run's would close it under this one's guests).
        self.agents_root = reachable_dir("soda-test-agents-")
        self.port = free_port()
        self.master_addr = f"{master_host}:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs = []
        self._addresses: dict[str, str] = {}
        self.ca = pki.CertificateAuthority(os.path.join(root, "pki"))
        self.ca.init("tests")
        self._issued: set[tuple[str, str]] = set()

    # ---- certificates -------------------------------------------------
    def tls(self, role: str, name: str) -> TlsConfig:
        """The TLS files of ROLE NAME, issued on first use."""
        if (role, name) not in self._issued:
            hosts = sorted({"127.0.0.1", "localhost", self.master_host})
            self.ca.issue(role, name, hosts=hosts if role == "master" else ())
            self._issued.add((role, name))
        return self.ca.tls(role, name)

    def tls_flags(self, role: str, name: str) -> list[str]:
        return soda_tls.flags(self.tls(role, name))

    def client(self, role: str = "operator", name: str = "tests", **kwargs):
        """A MasterClient as ROLE NAME."""
        from soda.rpc.client import MasterClient
        return MasterClient(self.master_addr, tls=self.tls(role, name), **kwargs)

    def ctl_env(self, role: str = "operator", name: str = "tests") -> dict[str, str]:
        """The environment sodactl runs in as ROLE NAME."""
        tls = self.tls(role, name)
        return {**os.environ, soda_tls.ENV["ca"]: tls.ca, soda_tls.ENV["cert"]: tls.cert,
                soda_tls.ENV["key"]: tls.key}

    # ---- processes ----------------------------------------------------
    def _spawn(self, key: str, argv: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.root, f"{key}.log"), "ab")
        self._logs.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs[key] = proc
        return proc

    def start_master(self, *extra: str) -> subprocess.Popen:
        proc = self._spawn("master", [sys.executable, "-m", "soda.master.main", "--listen", self.master_addr,
                                      "--state-dir", os.path.join(self.root, "master"),
                                      *self.tls_flags("master", "master"), *extra])
        wait_until(lambda: self.ctl("node", "list", check=False).returncode == 0 or proc.poll() is not None,
                   20, what="the Master to serve")
        assert proc.poll() is None, self.log("master")
        return proc

    def agent_address(self, name: str) -> str:
        """The address node `name` registers: one loopback address per node
        (kept across its restarts), since the Master refuses an address two
        READY nodes share and every Agent here runs on this one host."""
        return self._addresses.setdefault(name, f"127.0.1.{len(self._addresses) + 1}")

    def start_agent(self, name: str, *extra: str) -> subprocess.Popen:
        # A later --address in `extra` wins over the node's own.
        return self._spawn(name, [sys.executable, "-m", "soda.agent.main", "--master", self.master_addr,
                                  "--name", name, "--state-dir", self.agent_dir(name),
                                  "--hypervisor", "fake", "--address", self.agent_address(name),
                                  *self.tls_flags("agent", name), *extra])

    def start_daemon(self, name: str, netns: str, cgroup_parent: str, *extra: str) -> str:
        """A soda-daemon for node `name`; returns its socket path. A Daemon
        started again for the same node replaces the old one's socket."""
        socket_path = os.path.join(self.root, f"{name}-daemon.sock")
        proc = self._spawn(f"{name}-daemon", [
            sys.executable, "-m", "soda.daemon.main", "--socket", socket_path, "--netns", netns,
            "--cgroup-parent", cgroup_parent, *extra])
        wait_until(lambda: os.path.exists(socket_path) or proc.poll() is not None, 20,
                   what="the Daemon's socket")
        assert proc.poll() is None, self.log(f"{name}-daemon")
        return socket_path

    def start_real_agent(self, name: str, netns: str, daemon_socket: str, *extra: str) -> subprocess.Popen:
        return self._spawn(name, [sys.executable, "-m", "soda.agent.main", "--master", self.master_addr,
                                  "--name", name, "--state-dir", self.agent_dir(name), "--hypervisor", "uml",
                                  "--address", self.agent_address(name),
                                  "--netns", netns, "--daemon-socket", daemon_socket,
                                  *self.tls_flags("agent", name), *extra])

    def start_switch(self, *extra: str, name: str = "switch") -> subprocess.Popen:
        return self._spawn("switch", [sys.executable, "-m", "soda.switch.main", "--master", self.master_addr,
                                      *self.tls_flags("switch", name), *extra])

    def agent_dir(self, name: str) -> str:
        return os.path.join(self.agents_root, name)

    def kill(self, key: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(key)
        if proc.poll() is None:
            proc.send_signal(sig)
        proc.wait(timeout=20)

    def log(self, key: str) -> str:
        with open(os.path.join(self.root, f"{key}.log"), errors="replace") as f:
            return f.read()

    def close(self) -> None:
        for key in list(self.procs):
            proc = self.procs[key]
            if proc.poll() is None:
                proc.terminate()
        for key in list(self.procs):
            try:
                self.procs[key].wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.procs[key].kill()
                self.procs[key].wait()
        self.procs.clear()
        for log in self._logs:
            log.close()
        shutil.rmtree(self.agents_root, ignore_errors=True)

    # ---- sodactl ------------------------------------------------------
    def ctl(self, *args: str, check: bool = True, timeout: float = 120,
            as_: tuple[str, str] = ("operator", "tests")) -> subprocess.CompletedProcess:
        """sodactl ARGS as `as_` (ROLE, NAME)."""
        result = subprocess.run([sys.executable, "-m", "soda.cli.sodactl", "--master", self.master_addr, *args],
                                capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                env=self.ctl_env(*as_))
        if check and result.returncode != 0:
            raise AssertionError(f"sodactl {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def json(self, *args: str):
        return json.loads(self.ctl("-o", "json", *args).stdout)

    def ready_nodes(self) -> list[str]:
        return [n["name"] for n in self.json("node", "list") if n["state"] == "READY"]
