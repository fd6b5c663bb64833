"""soda-switch: the Service Switch daemon's entry point.

Owns the command line, the config (`SwitchConfig`) and the wiring: one
event loop (uvloop when it is installed) runs the Proxy and the
EndpointSync; one thread (EndpointWatcher) follows the Master's endpoint
lists through MasterClient and hands them to the loop. Every
`report_seconds` the Switch sends the Master a report (per virtual node
counters and health, the hosts it may listen on, the TCP addresses other
processes listen on here: see soda.master.switches); the same counters are
served as Prometheus text at http://<metrics_listen>/metrics. Unless
`routes` is off, a RouteFollower (soda.routing) keeps this host's routes to
the nodes' guest subnets, following the node list on a channel of its own;
they stay when the Switch stops. SIGTERM/SIGINT close
every listener, give open connections `drain_seconds` to finish, and exit 0.
The balancing and relaying live in balancer.py and proxy.py; this is the
only Switch module that reaches grpc (through MasterClient).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import dataclasses
from dataclasses import dataclass, field

from soda.addresses import join_host_port, split_host_port
from soda.backoff import Backoff
from soda import pki
from soda.config import LOG_LEVELS, TlsConfig, effective
from soda.errors import InvalidSpec, SodaError
from soda.routing import HostRoutes, RouteFollower
from soda.rpc.client import DEFAULT_MASTER, MasterClient
from soda.rpc import tls as soda_tls
from soda.service import (MAIN_LOOP_TICK_SECONDS, EXIT_USAGE, Heartbeat, Watchdog, configure,
                          install_hang_hook, sd_notify)
from soda.switch import ondemand
from soda.switch.endpoints import BACKOFF_INITIAL, EndpointSync, EndpointWatcher
from soda.switch.nft import DEFAULT_TABLE, KernelPath, ModeDispatch, check_table_name
from soda.switch.metrics import MetricsServer, tcp_listeners, to_report
from soda.switch.proxy import Proxy

log = logging.getLogger("soda.switch")

# READY=1 waits at most this long for the first endpoint lists, so that a
# unit ordered after the Switch finds its listeners bound when the Master is up.
READY_WAIT_SECONDS = 5.0
# A report asked for soon (a virtual node let go) waits this long for more
# changes to come with it.
REPORT_SOON_SECONDS = 0.05


@dataclass(frozen=True)
class SwitchConfig:
    master: str = DEFAULT_MASTER
    # This Switch's certificate (sodactl pki issue switch NAME) and the CA;
    # its name at the Master is the certificate's.
    tls: TlsConfig = field(default_factory=TlsConfig)
    # Hosts a service may listen on; empty means any. Keeps a spec from
    # making the Switch bind an address it should not (0.0.0.0, say).
    listen_hosts: tuple[str, ...] = ()
    connect_timeout: float = 2.0        # seconds to connect to a virtual node
    fail_timeout: float = 5.0           # a node that failed a connect gets nothing this long
    drain_seconds: float = 5.0          # on SIGTERM, time left to open connections
    reconnect_max_seconds: float = 30.0  # cap of the Master reconnect backoff
    hold_seconds: float = 30.0          # a connection waits this long for a node deployed on demand
    # The nftables table of the kernel path (mode l4): one per Switch on a host.
    nft_table: str = DEFAULT_TABLE
    # Masquerade every connection the kernel path forwards (the virtual nodes'
    # replies then need no route back through this host); False: only those
    # from loopback clients.
    nft_masquerade_all: bool = True
    # Prometheus text at GET /metrics; "" = not served. Loopback by default:
    # the figures name every service and virtual node.
    metrics_listen: str = "127.0.0.1:9470"
    report_seconds: float = 2.0         # how often the Master gets this Switch's report
    name: str = ""                      # this Switch's name at the Master; "" = the host name
    # Route the nodes' guest subnets via their addresses in the Switch's
    # namespace (soda.routing, host-gw); off: something else routes them.
    routes: bool = True
    log_level: str = "INFO"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="soda-switch",
        description="SODA Service Switch: one listener per service, connections spread over its "
                    "ready virtual nodes in proportion to their shares.")
    parser.add_argument("--master", metavar="HOST:PORT", help=f"the SODA Master (default {DEFAULT_MASTER})")
    parser.add_argument("--config", metavar="FILE", help="YAML config; flags override it")
    soda_tls.add_flags(parser)
    parser.add_argument("--metrics-listen", metavar="HOST:PORT", help="where to serve /metrics (\"\" = nowhere)")
    parser.add_argument("--name", help="this Switch's name at the Master (default: the host name)")
    parser.add_argument("--no-routes", dest="routes", action="store_false", default=None,
                        help="do not route the nodes' guest subnets via their addresses "
                             "(config routes: false)")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS)
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> SwitchConfig:
    """The effective config: file, then flags; raises InvalidSpec."""
    return effective(SwitchConfig, args.config, lambda c: check_config(soda_tls.apply_flags(c, args)),
                     master=args.master,
                     log_level=args.log_level, metrics_listen=args.metrics_listen, name=args.name,
                     routes=args.routes)


def check_config(config: SwitchConfig) -> SwitchConfig:
    if not config.master:
        raise InvalidSpec("master: the Master's HOST:PORT is required")
    soda_tls.read(config.tls, "soda-switch")       # whole and readable, or refused now
    if config.tls.cert:
        config = dataclasses.replace(config, name=pki.own_name("switch", config.name, config.tls.cert,
                                                               lambda: ""))
    for name in ("connect_timeout", "fail_timeout", "reconnect_max_seconds", "hold_seconds",
                 "report_seconds"):
        if getattr(config, name) <= 0:
            raise InvalidSpec(f"{name} must be positive, got {getattr(config, name):g}")
    if config.drain_seconds < 0:
        raise InvalidSpec(f"drain_seconds must not be negative, got {config.drain_seconds:g}")
    for host in config.listen_hosts:
        if not isinstance(host, str) or not host:
            raise InvalidSpec(f"listen_hosts: {host!r} is not a host address")
    if config.metrics_listen:
        split_host_port(config.metrics_listen)
    check_table_name(config.nft_table)
    return config


def loop_factory():
    """uvloop's loop when it is installed (about 1.3x the relay throughput
    of the stock loop, measured), else None: asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


class Switch:
    """The running parts on the current event loop: Proxy, EndpointSync and
    the EndpointWatcher thread that feeds it; and, when given, the
    RouteFollower that keeps the host routes (serve() makes it unless
    `routes` is off)."""

    def __init__(self, config: SwitchConfig, client=None, route_follower: RouteFollower | None = None):
        self.config = config
        self.client = client or MasterClient(config.master, tls=config.tls)
        self.route_follower = route_follower
        self.proxy = Proxy(connect_timeout=config.connect_timeout, fail_timeout=config.fail_timeout,
                           listen_hosts=config.listen_hosts)
        self.ondemand = ondemand.attach(self.proxy, self.client, hold_seconds=config.hold_seconds)
        self.kernel = KernelPath(table=config.nft_table, masquerade_all=config.nft_masquerade_all,
                                 listen_hosts=config.listen_hosts, health=self.proxy.health)
        self.sync = EndpointSync(ModeDispatch(self.ondemand, self.kernel))
        self.name = config.name or socket.gethostname()
        self.metrics = MetricsServer(self.proxy.views)
        self._sync_task: asyncio.Task | None = None
        self._report_task: asyncio.Task | None = None
        self._take_over_task: asyncio.Task | None = None
        self._watcher: EndpointWatcher | None = None
        self._report_soon: asyncio.Event | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.kernel.start()
        self._sync_task = asyncio.create_task(self.sync.run(), name="endpoint-sync")
        self._take_over_task = asyncio.create_task(self._take_over_kernel_path(), name="nft-take-over")
        self.ondemand.start()
        self._watcher = EndpointWatcher(
            self.client, loop, self.sync.handle, probe=self.client.list_services,
            backoff=Backoff(BACKOFF_INITIAL, self.config.reconnect_max_seconds))
        self._watcher.start()
        if self.config.metrics_listen:
            try:
                await self.metrics.start(*split_host_port(self.config.metrics_listen))
                log.info("metrics at http://%s/metrics", self.config.metrics_listen)
            except OSError as exc:
                # Counters still reach the Master; a busy port must not stop routing.
                log.warning("cannot serve metrics on %s: %s", self.config.metrics_listen, exc.strerror or exc)
        self._report_soon = asyncio.Event()
        self.proxy.let_go = self._report_soon.set
        self._report_task = asyncio.create_task(self._report_loop(), name="switch-report")
        if self.route_follower is not None:
            self.route_follower.start()

    async def _take_over_kernel_path(self) -> None:
        """A table the previous Switch left forwards until the Master's
        endpoints are all known, then is replaced in one transaction."""
        await self.sync.synced.wait()
        try:
            await self.kernel.take_over()
        except SodaError as exc:
            # The userspace listeners serve; the next endpoint update tries again.
            log.error("cannot take the kernel path's nft table over: %s", exc)

    def report(self):
        """This Switch's report for the Master, as of now."""
        views = self.proxy.views()
        own = {split_host_port(v.listen) for v in views if v.listening}
        if self.metrics.server is not None:
            own.update(sock.getsockname()[:2] for sock in self.metrics.server.sockets)
        busy = sorted(join_host_port(h, p) for h, p in tcp_listeners() - own)
        return to_report(self.name, self.config.listen_hosts, tuple(busy), views)

    async def _report_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            try:
                await loop.run_in_executor(None, self.client.report_switch_stats, self.report())
                if failing:
                    log.info("reporting to the Master again")
                failing = False
            except SodaError as exc:
                if not failing:
                    log.warning("cannot report to the Master: %s (retrying every %g s)", exc,
                                self.config.report_seconds)
                failing = True
            except Exception:       # a report bug must not stop routing
                log.exception("switch report failed")
            # Every report_seconds, or soon after a virtual node may have
            # been let go (the Master holds its guest until a report says so).
            soon = self._report_soon
            if soon is None or failing:
                await asyncio.sleep(self.config.report_seconds)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.report_seconds):
                    await soon.wait()
            await asyncio.sleep(REPORT_SOON_SECONDS)        # one report for a burst of changes
            soon.clear()

    async def stop(self) -> None:
        """Stop following the Master (closes the client), then close the proxy:
        listeners at once, connections after `drain_seconds`."""
        if self._watcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._watcher.stop)
        if self.route_follower is not None:
            # The routes stay: guest traffic must not depend on the Switch.
            await asyncio.get_running_loop().run_in_executor(None, self.route_follower.stop)
            self.route_follower.routes.close()
        for task in (self._sync_task, self._report_task, self._take_over_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.metrics.close()
        await self.ondemand.stop()
        await asyncio.gather(self.proxy.close(self.config.drain_seconds),
                             self.kernel.close(self.config.drain_seconds))


async def serve(config: SwitchConfig, client=None, stop: asyncio.Event | None = None) -> int:
    """Run the Switch until `stop` is set (by default SIGTERM/SIGINT set it)."""
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _stop_on_signal, stop, sig)
        install_hang_hook(loop.add_signal_handler)
    switch = Switch(config, client, route_follower(config))
    await switch.start()
    log.info("switch starting: master %s, event loop %s", config.master, type(loop).__module__)
    waiters = [asyncio.ensure_future(switch.sync.synced.wait()), asyncio.ensure_future(stop.wait())]
    await asyncio.wait(waiters, timeout=READY_WAIT_SECONDS, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    watchdog = None
    if not stop.is_set():
        # The event loop is the Switch's main loop: a task that ticks shows
        # it still runs callbacks (a blocked loop routes nothing).
        event_loop = Heartbeat("event loop")
        ticker = asyncio.ensure_future(_tick(event_loop, stop))
        watchdog = Watchdog.from_environment([event_loop])
        sd_notify("READY=1")
        log.info("switch ready: %d service(s)%s", len(switch.proxy.services()),
                 "" if switch.sync.synced.is_set() else " (the Master has not answered yet)")
        await stop.wait()
        ticker.cancel()
    sd_notify("STOPPING=1")
    if watchdog is not None:
        await loop.run_in_executor(None, watchdog.stop)
    await switch.stop()
    log.info("switch stopped")
    return 0


def route_follower(config: SwitchConfig) -> RouteFollower | None:
    """The follower of this host's routes to the nodes' guest subnets (in the
    Switch's own namespace; a Switch host is no node), or None when `routes`
    is off."""
    if not config.routes:
        return None
    try:
        routes = HostRoutes(own_node="")
    except (SodaError, OSError) as exc:
        # Balancing does not need it: say so and serve.
        log.error("cannot open the routing table (%s): guest subnets of other hosts are not "
                  "routed by this Switch", exc)
        return None
    return RouteFollower(MasterClient(config.master, tls=config.tls), routes)


async def _tick(heartbeat: Heartbeat, stop: asyncio.Event) -> None:
    while not stop.is_set():
        heartbeat.tick()
        await asyncio.sleep(MAIN_LOOP_TICK_SECONDS)


def _stop_on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    log.info("received %s, stopping", signal.Signals(sig).name)
    stop.set()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)          # exits 2 on a usage error
    config = configure("soda-switch", lambda: build_config(args))
    if config is None:
        return EXIT_USAGE
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
