"""soda-master: load config, open the state, serve the Master API.

Wires the store, image store, controller and membership loop together and
runs the gRPC server (with the standard health and reflection services)
until SIGTERM: mutual TLS with every call checked by soda.master.access,
or, with --insecure and on loopback only, plaintext for development.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from soda import config as soda_config, pki
from soda.errors import InvalidSpec, SodaError
from soda.master.access import Authenticator
from soda.master.api import AccessInterceptor, MasterServicer
from soda.master.controller import Controller
from soda.master.images import ImageStore
from soda.master.membership import MembershipLoop
from soda.master.notifier import Notifier
from soda.master.store import open_store
from soda.proto.v1 import master_pb2, master_pb2_grpc
from soda.rpc import tls as soda_tls
from soda.rpc.streams import StreamLimit
from soda.service import EXIT_USAGE, configure, serve_grpc

log = logging.getLogger("soda.master")

SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.so_reuseport", 0),
]


class MasterServer:
    """The running Master: everything `main()` starts, stoppable in tests."""

    def __init__(self, cfg: soda_config.MasterConfig):
        self.cfg = cfg
        os.makedirs(cfg.state_dir, exist_ok=True)
        self.store = open_store(cfg.state_dir)
        self.notifier = Notifier()
        self.images = ImageStore(os.path.join(cfg.state_dir, "images"), self.store,
                                 max_bytes=cfg.image_max_bytes, reserve_bytes=cfg.image_reserve_bytes)
        self.controller = Controller(self.store, self.images, self.notifier, cfg)
        self.membership = MembershipLoop(self.controller, interval=min(1.0, cfg.node_lost_seconds / 4))
        try:
            files = check_transport(cfg)
            self.authenticator = Authenticator(files.ca if files else None, crl_path(cfg))
        except SodaError:
            self.store.close()
            raise
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.max_workers,
                                                             thread_name_prefix="master-rpc"),
                                  # Access first: a caller refused there takes no stream slot.
                                  interceptors=[AccessInterceptor(self.authenticator),
                                                StreamLimit(cfg.max_workers)],
                                  options=SERVER_OPTIONS)
        master_pb2_grpc.add_MasterServicer_to_server(
            MasterServicer(self.controller, cfg.heartbeat_seconds), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (master_pb2.DESCRIPTOR.services_by_name["Master"].full_name, reflection.SERVICE_NAME,
             health.SERVICE_NAME), self.server)
        # Several addresses, comma-separated: e.g. loopback for sodactl and
        # the fabric address the Agents of other hosts reach.
        self.port = 0
        for address in (a.strip() for a in cfg.listen.split(",") if a.strip()):
            try:
                port = (self.server.add_secure_port(address, soda_tls.server_credentials(files)) if files
                        else self.server.add_insecure_port(address))
            except RuntimeError:
                port = 0
            if not port:
                self.store.close()
                raise SodaError(f"cannot listen on {address} (address in use or not available here)")
            self.port = self.port or port

    def start(self) -> None:
        self.server.start()
        self.membership.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set("soda.proto.v1.Master", health_pb2.HealthCheckResponse.SERVING)
        log.info("SODA Master serving on %s (%s; state in %s)", self.cfg.listen,
                 "PLAINTEXT, every caller an operator: development only" if self.cfg.insecure
                 else "mutual TLS", self.cfg.state_dir)

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.membership.stop()
        self.notifier.close()
        self.server.stop(grace).wait()
        self.store.close()


def check_transport(cfg: soda_config.MasterConfig) -> soda_tls.TlsFiles | None:
    """The TLS files the Master serves with, or None for --insecure, which
    only loopback addresses may use. InvalidSpec with what to do otherwise."""
    listens = [a.strip() for a in cfg.listen.split(",") if a.strip()]
    if cfg.insecure:
        if cfg.tls.enabled:
            raise InvalidSpec("--insecure and TLS files together: choose one")
        outside = [a for a in listens if not soda_tls.is_loopback(a)]
        if outside:
            raise InvalidSpec(f"--insecure serves plaintext with every caller an operator, so only on "
                              f"loopback; {', '.join(outside)} is not (give --ca/--cert/--key instead)")
        return None
    if not cfg.tls.enabled:
        raise InvalidSpec("the Master serves mutual TLS: give tls.ca, tls.cert and tls.key (--ca, --cert, "
                          "--key; made by sodactl pki init and sodactl pki issue master NAME --host ...), "
                          "or --insecure on a loopback address for development")
    return soda_tls.read(cfg.tls, "soda-master")


def crl_path(cfg: soda_config.MasterConfig) -> str:
    """The revocation list to honour: the configured one, else crl.pem
    beside the CA's certificate when there is one (sodactl pki keeps it
    there), else none."""
    if cfg.insecure:
        return ""
    if cfg.crl:
        return cfg.crl
    beside = os.path.join(os.path.dirname(os.path.abspath(cfg.tls.ca)), pki.CRL)
    if os.path.exists(beside):
        return beside
    log.warning("no revocation list (crl.pem beside %s, or crl:): revoked certificates are still "
                "accepted", cfg.tls.ca)
    return ""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="soda-master", description="Run the SODA Master (control plane API).")
    p.add_argument("--config", help="YAML config file (see etc/soda/master.yaml)")
    p.add_argument("--listen", help="HOST:PORT to serve gRPC on, or several, comma-separated "
                                     "(default 127.0.0.1:7070)")
    p.add_argument("--state-dir", help="directory for the state store and images")
    p.add_argument("--cluster-cidr", help="address range split into one subnet per physical node")
    p.add_argument("--node-lost-seconds", type=float, help="silence after which a node is LOST")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    soda_tls.add_flags(p)
    p.add_argument("--crl", metavar="FILE", help="the CA's revocation list, reloaded when it changes "
                                                 "(default: crl.pem beside --ca)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="plaintext, every caller an operator: development only, loopback only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = configure("soda-master", lambda: soda_config.effective(
        soda_config.MasterConfig, args.config, listen=args.listen, state_dir=args.state_dir,
        cluster_cidr=args.cluster_cidr, node_lost_seconds=args.node_lost_seconds,
        log_level=args.log_level, crl=args.crl, insecure=args.insecure,
        check=lambda c: soda_tls.apply_flags(c, args)))
    if cfg is None:
        return EXIT_USAGE
    return serve_grpc("soda-master", lambda: MasterServer(cfg))


if __name__ == "__main__":
    sys.exit(main())
