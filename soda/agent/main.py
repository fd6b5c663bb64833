"""soda-agent: the SODA Agent daemon's entry point.

Owns the command line and the wiring: flags over the config file, then the
MasterClient, hypervisor drivers, image cache, reconciler and Agent, and the
host routes to other nodes' guests (soda.routing) and the guests' network
policy (soda.agent.policy), each following the Master with a MasterClient
of its own, run until SIGTERM/SIGINT. Stopping the Agent never stops
guests and leaves the host routes and the policy in place. Domain logic
lives in agent.py, reconciler.py and images.py; this is the only Agent
module that reaches grpc (through MasterClient).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import sys
import threading
from typing import Any, Callable

from soda.agent.address import NodeAddress, find_node_address
from soda.agent.agent import Agent, StatusReporter, state_dir_problem
from soda.agent.moves import DiskSender
from soda.agent.capacity import measure_capacity
from soda.agent.images import ImageCache
from soda.agent.network import NodeNetwork
from soda.agent.policy import PolicyFollower
from soda.agent.plumbing import GuestPlumbing, NodePlumbing
from soda.agent.reconciler import Reconciler
from soda.agent.uids import GuestUids, parse_uid_range
from soda import pki
from soda.config import LOG_LEVELS, AgentConfig, build_section, effective
from soda.errors import InvalidSpec, SodaError
from soda.hypervisors.base import EXITED as GUEST_EXITED
from soda.hypervisors.base import HypervisorDriver, drivers, make_driver
from soda.model.labels import check_labels, format_labels, parse_label
from soda.model.names import NODE_NAME_MAX, check_dns_label
from soda.model.state import DriverCapabilities, Node
from soda.routing import HostRoutes, RouteFollower
from soda.rpc.client import MasterClient
from soda.rpc.daemon_client import DaemonClient
from soda.rpc import tls as soda_tls
from soda.service import (EXIT_FAILURE, EXIT_USAGE, Heartbeat, Watchdog, configure, forbid_fork,
                          install_hang_hook, refuse, run_main_loop, sd_notify, stop_event_on_signals)

log = logging.getLogger("soda.agent")
# The fewest open files a guest's VMM may be limited to (guest_open_files).
MIN_OPEN_FILES = 64



def _hypervisor_names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a hypervisor driver name")
    for name in names:
        if name not in drivers():
            raise argparse.ArgumentTypeError(
                f"unknown hypervisor driver {name!r} (available: {', '.join(sorted(drivers()))})")
    return names


def _label(text: str) -> tuple[str, str]:
    try:
        return parse_label(text)
    except InvalidSpec as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="soda-agent",
        description="SODA Agent: runs this physical node's virtual nodes as the Master asks.")
    parser.add_argument("--master", metavar="HOST:PORT", help="the SODA Master (default 127.0.0.1:7070)")
    parser.add_argument("--name", help="this node's name (default: the host name)")
    parser.add_argument("--address", metavar="ADDR",
                        help="where other hosts reach this node (default: the address of the "
                             "interface carrying the default route)")
    parser.add_argument("--label", action="append", type=_label, metavar="KEY=VALUE",
                        help="a label to register, e.g. zone=a (placement spreads over zones); "
                             "repeatable, added to the config file's labels")
    parser.add_argument("--state-dir", metavar="DIR", help="guest state and image cache")
    parser.add_argument("--hypervisor", action="append", type=_hypervisor_names, metavar="NAME[,NAME]",
                        help=f"hypervisor driver(s) to offer, repeatable (choices: "
                             f"{', '.join(sorted(drivers()))}; default: every one usable here but fake)")
    parser.add_argument("--netns", metavar="NAME",
                        help="network namespace for the bridge and TAPs (made if missing)")
    parser.add_argument("--daemon-socket", metavar="PATH",
                        help="Unix socket of the local soda-daemon ('' = no limits)")
    parser.add_argument("--no-routes", dest="routes", action="store_false", default=None,
                        help="do not route other nodes' guest subnets via their addresses "
                             "(config routes: false)")
    parser.add_argument("--no-policy", dest="policy", action="store_false", default=None,
                        help="no network policy for the guests: the bridge passes everything, "
                             "spoofed frames too (only to measure what the policy costs; config "
                             "policy: false)")
    parser.add_argument("--no-uid-drop", dest="guest_uid_drop", action="store_false", default=None,
                        help="run guests' VMMs as root (only to measure what the uid drop costs)")
    parser.add_argument("--config", metavar="FILE", help="YAML config; flags override it")
    soda_tls.add_flags(parser)
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS)
    parser.add_argument("--teardown", action="store_true",
                        help="do not run: remove what Agents of this config made on this host for "
                             "the node (its network namespace, or its bridge and SODA's nft "
                             "tables; the routes to other nodes' guests, unless --keep-routes), "
                             "after `sodactl node remove`; refused while any of its guests runs. "
                             "The state dir stays")
    parser.add_argument("--keep-routes", action="store_true",
                        help="with --teardown: leave the routes to other nodes' guests (a Switch "
                             "that stays on this host uses them)")
    return parser.parse_args(argv)


def default_node_name() -> str:
    return socket.gethostname().split(".")[0].lower()


def build_config(args: argparse.Namespace) -> AgentConfig:
    """The effective config: file, then flags; raises InvalidSpec."""
    hypervisors = None
    if args.hypervisor:
        hypervisors = tuple(dict.fromkeys(n for names in args.hypervisor for n in names))
    flag_labels = dict(args.label or ())

    def check(config: AgentConfig) -> AgentConfig:
        # --label adds to the file's labels (a key in both takes the flag's value).
        config = soda_tls.apply_flags(config, args)
        return check_config(dataclasses.replace(config, labels={**config.labels, **flag_labels}))
    return effective(AgentConfig, args.config, check, master=args.master, name=args.name,
                     address=args.address, state_dir=args.state_dir, hypervisors=hypervisors,
                     netns=args.netns, daemon_socket=args.daemon_socket, routes=args.routes,
                     policy=args.policy, guest_uid_drop=args.guest_uid_drop,
                     log_level=args.log_level)


def check_config(config: AgentConfig) -> AgentConfig:
    soda_tls.read(config.tls, "soda-agent")        # whole and readable, or refused now
    name = pki.own_name("agent", config.name, config.tls.cert, default_node_name)
    check_dns_label("node", name, NODE_NAME_MAX)
    labels = check_labels(config.labels)
    if not config.master:
        raise InvalidSpec("master: the Master's HOST:PORT is required")
    if not config.state_dir:
        raise InvalidSpec("state_dir is required")
    for hypervisor in config.hypervisors:
        if hypervisor not in drivers():
            raise InvalidSpec(f"unknown hypervisor driver {hypervisor!r} "
                              f"(available: {', '.join(sorted(drivers()))})")
    if config.image_cache_bytes < 0:
        raise InvalidSpec(f"image_cache_bytes must be 0 (no bound) or more, got {config.image_cache_bytes}")
    if config.max_parallel_boots < 1:
        raise InvalidSpec(f"max_parallel_boots must be at least 1, got {config.max_parallel_boots}")
    if config.reconcile_seconds <= 0:
        raise InvalidSpec(f"reconcile_seconds must be positive, got {config.reconcile_seconds:g}")
    parse_uid_range(config.guest_uids)
    if config.guest_open_files < MIN_OPEN_FILES:
        raise InvalidSpec(f"guest_open_files must be at least {MIN_OPEN_FILES} (a VMM opens its "
                          f"disk, TAP, sockets and consoles), got {config.guest_open_files}")
    driver_configs(config)
    return dataclasses.replace(config, name=name, labels=labels)


def driver_configs(config: AgentConfig) -> dict[str, Any]:
    """Each driver section of the config (`drivers: {uml: {...}}`) as the
    dataclass its driver owns (`Driver.Config`), for every configured
    hypervisor (defaults where there is no section). A section of a driver
    this node does not have, or with a key its driver does not know, is an
    error at load, not at first boot."""
    registry = drivers()
    unknown = sorted(set(config.drivers) - set(registry))
    if unknown:
        raise InvalidSpec(f"drivers: no hypervisor driver named {', '.join(unknown)} "
                          f"(available: {', '.join(sorted(registry))})")
    return {name: build_section(registry[name].Config, config.drivers.get(name), f"drivers.{name}")
            for name in dict.fromkeys((*candidate_hypervisors(config), *config.drivers))}


# A driver only for tests and benchmarks: never offered unless named.
TEST_ONLY_DRIVERS = ("fake",)


def candidate_hypervisors(config: AgentConfig) -> tuple[str, ...]:
    """The drivers to try: the configured ones, or with none configured
    every registered driver that runs real guests."""
    return config.hypervisors or tuple(n for n in drivers() if n not in TEST_ONLY_DRIVERS)


class DriverUnusable(SodaError):
    """A configured hypervisor driver cannot run guests on this host."""


@dataclasses.dataclass(frozen=True)
class Drivers:
    """The configured drivers, in the configured order (a virtual node that
    names no hypervisor gets the first), and what each declares, with its
    fingerprint's findings: what the Agent registers."""
    drivers: dict[str, HypervisorDriver]
    capabilities: dict[str, DriverCapabilities]


def with_address(config: AgentConfig, find: Callable[[], NodeAddress] = find_node_address) -> AgentConfig:
    """`config` with the address it registers: the configured one, else the
    default route's interface's; loopback (and a warning) when there is none."""
    if config.address:
        return config
    found = find()
    if found.interface:
        log.info("registering address %s (%s, the default route's interface)", found.address,
                 found.interface)
    else:
        log.warning("no interface carries a default route: registering address %s, which only "
                    "this host reaches, so the whole cluster must run on this one host "
                    "(give --address to be reached from others)", found.address)
    return dataclasses.replace(config, address=found.address)


def build_drivers(config: AgentConfig) -> Drivers:
    """Raises OSError when the state dir cannot be used, DriverUnusable when
    a driver's fingerprint says it cannot work here."""
    os.makedirs(config.state_dir, exist_ok=True)
    made, capabilities, unusable = {}, {}, []
    sections = driver_configs(config)
    for name in candidate_hypervisors(config):
        driver = make_driver(name, config.state_dir, sections[name])
        found = driver.fingerprint()
        if not found.usable:
            if config.hypervisors:          # named: it must work
                raise DriverUnusable(f"hypervisor {name} cannot run guests here: {found.reason}")
            unusable.append(f"{name}: {found.reason}")
            continue
        made[name], capabilities[name] = driver, driver.capabilities(found)
    if not made:
        raise DriverUnusable("no hypervisor driver can run guests here (" + "; ".join(unusable) + ")")
    for reason in unusable:
        log.info("hypervisor %s, not offered", reason)
    return Drivers(made, capabilities)


def build_network(config: AgentConfig, drivers: Drivers) -> NodeNetwork | None:
    """Guest networking, for nodes whose drivers need it. Made before any
    gRPC channel: creating the namespace forks."""
    if not any(c.plumbing for c in drivers.capabilities.values()):
        return None
    if not config.policy:
        log.warning("policy: false: guests are not kept apart (no anti-spoofing, no network policy)")
    if not config.netns and not ip_forwarding():
        # The host's own stack is the node's: other hosts reach the guests
        # through it (the Switch's route "subnet via this node").
        log.warning("net.ipv4.ip_forward is 0: no other host (the Switch) can reach this node's "
                    "guests; scripts/install --role node sets it in %s", SYSCTL_FILE)
    return NodeNetwork(netns=config.netns, bridge=config.bridge, guarded=config.policy)


SYSCTL_FILE = "/etc/sysctl.d/60-soda-node.conf"


def ip_forwarding(path: str = "/proc/sys/net/ipv4/ip_forward") -> bool:
    try:
        with open(path) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def configure_network(network: NodeNetwork, node: Node) -> None:
    """Set the node's network up with the addresses the Master handed it."""
    if not (node.subnet and node.gateway and node.uplink):
        raise SodaError(f"the Master handed node {node.name} no complete set of addresses "
                        f"(subnet {node.subnet or '-'}, gateway {node.gateway or '-'}, "
                        f"uplink {node.uplink or '-'})")
    network.configure_node(node.subnet, node.gateway, node.uplink)


def follow_routes(config: AgentConfig, routes: HostRoutes | None) -> RouteFollower | None:
    """Route other nodes' guest subnets in the Agent's namespace, following
    the Master's node list on a channel of its own (stopping the follower
    closes it; the Agent's session closes its own)."""
    if routes is None:
        return None
    follower = RouteFollower(MasterClient(config.master, tls=config.tls), routes)
    follower.start()
    return follower


def follow_policy(config: AgentConfig, network: NodeNetwork | None) -> PolicyFollower | None:
    """Keep the guests' network policy in step with the Master's endpoint
    sets, on a channel of its own (stopping the follower closes it)."""
    if network is None or network.policy is None:
        return None
    follower = PolicyFollower(MasterClient(config.master, tls=config.tls), network.policy, network.policy_scope)
    follower.start()
    return follower


def build_plumbing(config: AgentConfig, network: NodeNetwork | None,
                   capabilities: dict[str, DriverCapabilities]) -> GuestPlumbing:
    if network is None:
        return GuestPlumbing()
    daemon = None
    if config.daemon_socket:
        daemon = DaemonClient(config.daemon_socket)
    else:
        log.warning("no daemon_socket configured: real guests run without limits")
    uids = None
    if config.guest_uid_drop:
        uids = GuestUids(config.state_dir, parse_uid_range(config.guest_uids))
    else:
        log.warning("guest_uid_drop is off: guests' VMMs run as root")
    return NodePlumbing(network, daemon, capabilities, uids=uids,
                        open_files=config.guest_open_files)


def build_agent(config: AgentConfig, client: MasterClient, stop: threading.Event,
                network: NodeNetwork | None = None, drivers: Drivers | None = None) -> Agent:
    """An Agent and its collaborators for `config`; raises OSError when the
    state dir cannot be used."""
    drivers = drivers or build_drivers(config)
    images = ImageCache(os.path.join(config.state_dir, "images"), client, limit_bytes=config.image_cache_bytes)
    capacity = measure_capacity(config.capacity, config.state_dir)
    reporter = StatusReporter(client, config.name)
    plumbing = build_plumbing(config, network, drivers.capabilities)
    for hypervisor, driver in drivers.drivers.items():
        # Drivers whose VMM cannot pause itself freeze the guest's fence.
        driver.freezer = lambda vnode, frozen, h=hypervisor: plumbing.freeze(vnode, h, frozen)
    reconciler = Reconciler(drivers.drivers, reporter, images,
                            max_parallel_boots=config.max_parallel_boots,
                            interval=config.reconcile_seconds, plumbing=plumbing,
                            disks=DiskSender(os.path.join(config.state_dir, "moves"), client))
    images.in_use = reconciler.images_wanted
    on_registered = (lambda node: configure_network(network, node)) if network else None
    return Agent(client, reconciler, reporter, config.name, config.address, capacity.resources,
                 tuple(drivers.drivers), stop=stop, on_registered=on_registered, labels=config.labels,
                 limits=tuple(drivers.capabilities.values()),
                 health_check=lambda: state_dir_problem(config.state_dir), images=images,
                 assumed=capacity.assumed)


def teardown(config: AgentConfig, keep_routes: bool = False) -> int:
    """soda-agent --teardown: remove the node's network and (unless
    `keep_routes`) the routes from this host, once no guest of its drivers
    runs; safe to repeat."""
    try:
        made = build_drivers(config)
    except (SodaError, OSError) as exc:
        return refuse("soda-agent", f"cannot look for running guests, so nothing was removed: {exc}",
                      EXIT_FAILURE)
    # An exited guest's record is no guest: its driver tidies it later.
    running = sorted(f"{name} ({driver.name})" for driver in made.drivers.values()
                     for name, info in driver.list().items() if info.state != GUEST_EXITED)
    if running:
        return refuse("soda-agent", f"{len(running)} guest(s) still on this node: "
                      f"{', '.join(running[:5])}{', ...' if len(running) > 5 else ''}; drain it "
                      f"first (sodactl node drain {config.name} --wait), then remove it (sodactl "
                      f"node remove {config.name}); nothing was removed", EXIT_FAILURE)
    # The routes first: they lead through the node's links.
    removed, problems = [], []
    if not keep_routes:
        routes = HostRoutes(own_node=config.name)
        try:
            count = len(routes.ours())
            problems = routes.clear()
        except SodaError as exc:
            count, problems = 0, [str(exc)]
        finally:
            routes.close()
        if count > len(problems):
            removed.append(f"{count - len(problems)} route(s) to other nodes' guests")
    try:
        removed += NodeNetwork.remove_node(netns=config.netns, bridge=config.bridge)
    except (SodaError, OSError) as exc:
        problems.append(f"cannot remove the node's network: {exc}")
    for line in removed:
        print(f"removed {line}")
    if not removed:
        print(f"nothing of node {config.name} left on this host")
    if problems:
        return refuse("soda-agent", "; ".join(problems), EXIT_FAILURE)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)          # exits 2 on a usage error
    config = configure("soda-agent", lambda: build_config(args))
    if config is None:
        return EXIT_USAGE
    if args.keep_routes and not args.teardown:
        return refuse("soda-agent", "--keep-routes goes with --teardown")
    if args.teardown:
        return teardown(config, keep_routes=args.keep_routes)
    stop = stop_event_on_signals()
    install_hang_hook()
    config = with_address(config)
    try:
        drivers = build_drivers(config)
    except DriverUnusable as exc:
        return refuse("soda-agent", exc, EXIT_FAILURE)
    except (SodaError, OSError) as exc:
        return refuse("soda-agent", f"cannot set up hypervisor drivers: {exc}", EXIT_FAILURE)
    try:
        network = build_network(config, drivers)
    except (SodaError, OSError) as exc:
        return refuse("soda-agent", f"cannot set up guest networking: {exc}", EXIT_FAILURE)
    try:
        # Routes in the Agent's own namespace: where the host's other
        # processes, and the uplinks of its namespaced nodes, are.
        routes = HostRoutes(own_node=config.name) if config.routes else None
    except (SodaError, OSError) as exc:
        return refuse("soda-agent", f"cannot open the routing table: {exc}", EXIT_FAILURE)
    # From here on gRPC threads may be alive: a fork (pyroute2 entering a
    # namespace from a new thread did this) could abort the child and the Agent.
    forbid_fork("soda-agent talks gRPC; netlink runs on its own threads (soda.netlink)")
    client = MasterClient(config.master, tls=config.tls)
    try:
        agent = build_agent(config, client, stop, network, drivers)
    except OSError as exc:
        client.close()
        return refuse("soda-agent", f"cannot use state dir {config.state_dir}: "
                                    f"{exc.strerror or exc}", EXIT_FAILURE)
    except SodaError as exc:             # a guest uid table it cannot trust
        client.close()
        return refuse("soda-agent", str(exc), EXIT_FAILURE)
    log.info("agent %s starting: master %s, address %s, labels %s, hypervisors %s, capacity %s, "
             "state dir %s", config.name, config.master, config.address,
             format_labels(config.labels) or "none", ",".join(agent.hypervisors),
             agent.capacity.as_dict(), config.state_dir)
    agent.start()
    follower = follow_routes(config, routes)
    policy = follow_policy(config, network)
    # Ready once the loops run: guests are adopted and looked after even
    # while the Master is unreachable.
    main_loop = Heartbeat("main loop")
    watchdog = Watchdog.from_environment([main_loop, *agent.heartbeats])
    sd_notify("READY=1")
    run_main_loop(main_loop, stop)
    sd_notify("STOPPING=1")
    if watchdog is not None:
        watchdog.stop()
    agent.stop()
    if follower is not None:
        # The routes stay: other nodes' guests must stay reachable without us.
        follower.stop()
    if policy is not None:
        policy.stop()           # the policy stays: guests stay fenced without us
    if routes is not None:
        routes.close()
    if agent.failure is not None:
        return refuse("soda-agent", f"stopped: {agent.failure}", EXIT_FAILURE)
    log.info("agent %s stopped; guests left running", config.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
