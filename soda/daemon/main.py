"""soda-daemon: load config, probe cgroups, open netlink, serve on a Unix socket.

Wires the cgroup backend, the netlink shaper and the LimitManager together
and runs the gRPC server (Daemon API plus the standard health and
reflection services) on `unix:<socket>` until SIGTERM; removes its socket
file on the way out. The netlink socket (and its network namespace) is
opened before the gRPC server starts, because pyroute2 forks to enter a
namespace and a started gRPC server must not fork.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import stat
import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from soda import config as soda_config
from soda.daemon.api import DaemonServicer
from soda.daemon.cgroups import CgroupV2, open_backend
from soda.daemon.config import DaemonConfig
from soda.daemon.limits import LimitManager
from soda.daemon.tc import NetlinkShaper, NetlinkThread
from soda.errors import InvalidSpec, WrongState
from soda.proto.v1 import daemon_pb2, daemon_pb2_grpc
from soda.service import EXIT_USAGE, configure, serve_grpc

log = logging.getLogger("soda.daemon")

SERVICE_NAME = daemon_pb2.DESCRIPTOR.services_by_name["Daemon"].full_name
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
SOCKET_MODE = 0o600           # the Agent runs as root; nobody else may fence


def build_manager(cfg: DaemonConfig) -> LimitManager:
    """The real LimitManager: probed cgroup backend, netlink in cfg.netns."""
    cgroups = open_backend(cfg.cgroup_root, cfg.cgroup_parent, delegated=cfg.delegated,
                           cpuset=cfg.cpuset)
    if cfg.delegated and isinstance(cgroups, CgroupV2):
        # v2 lets only a cgroup without processes hand controllers down.
        log.info("moved the Daemon into %s", cgroups.evacuate(os.getpid()))
    cgroups.prepare()
    netlink = NetlinkThread(cfg.netns)
    return LimitManager(cgroups, NetlinkShaper(netlink, scope=cfg.cgroup_parent), cfg)


def claim_socket_path(path: str) -> None:
    """Make room for our socket: create its directory, remove a stale socket
    left by a Daemon that died, refuse if a live one still answers there."""
    if not path or len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise InvalidSpec(f"socket path {path!r} must be 1..{MAX_SOCKET_PATH} bytes long")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise WrongState(f"{path} exists and is not a socket; remove it or choose another --socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
            log.info("removed stale socket %s", path)
            return
        except OSError as exc:
            raise WrongState(f"cannot check socket {path}: {exc.strerror or exc}") from None
    raise WrongState(f"another process is serving on {path} (a soda-daemon already running?)")


class DaemonServer:
    """The running Daemon: everything `main()` starts, stoppable in tests."""

    def __init__(self, cfg: DaemonConfig, manager: LimitManager | None = None):
        self.cfg = cfg
        self.socket_path = os.path.abspath(cfg.socket)
        claim_socket_path(self.socket_path)
        self.manager = manager if manager is not None else build_manager(cfg)
        self._socket_ino: int | None = None
        try:
            self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.max_workers,
                                                                 thread_name_prefix="daemon-rpc"))
            daemon_pb2_grpc.add_DaemonServicer_to_server(DaemonServicer(self.manager), self.server)
            self.health = health.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
            reflection.enable_server_reflection(
                (SERVICE_NAME, reflection.SERVICE_NAME, health.SERVICE_NAME), self.server)
            try:
                bound = self.server.add_insecure_port(f"unix:{self.socket_path}")
            except RuntimeError:
                bound = 0
            if not bound:
                raise WrongState(f"cannot listen on unix:{self.socket_path}")
        except BaseException:
            self._close_manager()
            raise

    @property
    def target(self) -> str:
        return f"unix:{self.socket_path}"

    def start(self) -> None:
        self.server.start()
        try:
            os.chmod(self.socket_path, SOCKET_MODE)
            self._socket_ino = os.lstat(self.socket_path).st_ino
        except OSError as exc:
            log.warning("cannot restrict socket %s: %s", self.socket_path, exc)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("SODA Daemon serving on %s (cgroup %s under %s/*/%s, netns %s)", self.target,
                 self.manager.cgroups.version, self.cfg.cgroup_root, self.cfg.cgroup_parent,
                 self.cfg.netns or "(own)")

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self._close_manager()
        self._remove_socket()

    def _close_manager(self) -> None:
        if self.manager.shaper is not None:
            self.manager.shaper.close()

    def _remove_socket(self) -> None:
        # Only our own socket: a successor may already have bound the path.
        try:
            if self._socket_ino is None or os.lstat(self.socket_path).st_ino == self._socket_ino:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass


def parse_args(argv):
    p = argparse.ArgumentParser(prog="soda-daemon",
                                description="Run the SODA Daemon (isolation: cgroups, tc).")
    p.add_argument("--config", help="YAML config file (see etc/soda/daemon.yaml)")
    p.add_argument("--socket", help="Unix socket to serve gRPC on (default /run/soda/daemon.sock)")
    p.add_argument("--cgroup-parent", help="cgroup below which every virtual node gets its own "
                                           "(default soda)")
    p.add_argument("--netns", help="network namespace of the TAPs (default: the Daemon's own)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = configure("soda-daemon", lambda: soda_config.effective(
        DaemonConfig, args.config, socket=args.socket, cgroup_parent=args.cgroup_parent,
        netns=args.netns, log_level=args.log_level))
    if cfg is None:
        return EXIT_USAGE
    return serve_grpc("soda-daemon", lambda: DaemonServer(cfg),
                      no_fork="soda-daemon serves gRPC; netlink runs on its own thread (soda.netlink)")


if __name__ == "__main__":
    sys.exit(main())
