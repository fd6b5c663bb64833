"""soda-devcluster: a local SODA cluster (soda.devcluster.cluster) from the
command line, for people and for scripts/demo.

    soda-devcluster [--state-dir DIR] up [options]   start it under a detached supervisor,
                                                     return once every part serves
    soda-devcluster [--state-dir DIR] run [options]  the same in the foreground (Ctrl-C: down)
    soda-devcluster [--state-dir DIR] status         what runs, what died and how, what was given up
    soda-devcluster [--state-dir DIR] down           take it all down; the logs stay in DIR/logs

Owns the command's words and exit statuses and the detached supervisor
process (`supervise`, started by `up`, stopped by `down` with SIGTERM after
checking its recorded identity). `status` exits 0 when every part and the
supervisor run, 1 when something is down, 3 when nothing of a cluster runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time

from soda import service
from soda.devcluster import credentials
from soda.devcluster.cluster import (LOG_DIR, STATE_FILE, SUPERVISOR_LOG, ClusterConfig, ClusterError,
                                     LocalCluster, is_live, layout_of, load_state, part_names, recorded,
                                     supervisor_of, teardown)
from soda.devcluster.supervisor import EXITED, FAILED, RESTARTING, RUNNING, describe_exit

NOT_UP = 3
UP_TIMEOUT = 300.0
DOWN_TIMEOUT = 300.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="soda-devcluster", description="A local SODA cluster: Master, "
                                "physical nodes (Daemon + Agent; one by default, with its guests' network "
                                "in a namespace; with --nodes N, each node a namespace acting as a host on "
                                "a shared fabric bridge) and a Switch, supervised (restart on failure, "
                                "with backoff).")
    p.add_argument("--state-dir", default=os.environ.get("SODA_DEVCLUSTER_DIR", ".devcluster"),
                   help="where the record, the logs and the parts' state live (default .devcluster)")
    sub = p.add_subparsers(dest="command", required=True, metavar="{up,run,status,env,down}")
    for name, what in (("up", "start in the background and wait until every part serves"),
                       ("run", "start in the foreground; SIGTERM or Ctrl-C takes it down"),
                       ("supervise", None)):          # what `up` runs in the background
        s = sub.add_parser(name, **({"help": what} if what else {}))
        s.add_argument("--master", default="127.0.0.1:7070", metavar="HOST:PORT",
                       help="the Master's address (default 127.0.0.1:7070)")
        s.add_argument("--node", default="dev-node-1",
                       help="the physical node's name (with --nodes: the first's; the others count on)")
        s.add_argument("--nodes", type=int, default=1, metavar="N",
                       help="physical nodes, each a network namespace acting as a host (default 1)")
        s.add_argument("--fabric-cidr", default=ClusterConfig.fabric_cidr,
                       help=f"the fabric's addresses with --nodes (default {ClusterConfig.fabric_cidr})")
        s.add_argument("--netns", default="soda-dev",
                       help="network namespace of the guests (with --nodes: prefix of the hosts' ones)")
        s.add_argument("--cgroup-parent", default="soda-dev",
                       help="cgroup below which guests are fenced (with --nodes: prefix, one per node)")
        s.add_argument("--hypervisor", default="uml", help="the Agent's hypervisor driver(s)")
        s.add_argument("--cluster-cidr", default="", help="range the Master splits into node subnets")
        s.add_argument("--switch-metrics", default=None, metavar="HOST:PORT",
                       help="where the Switch serves /metrics (default: the Switch's; \"\": nowhere)")
        s.add_argument("--timeout", type=float, default=UP_TIMEOUT, help=argparse.SUPPRESS
                       if name == "supervise" else "seconds to wait for every part (default 300)")
        s.add_argument("--insecure", action="store_true",
                       help="no TLS: the Master serves plaintext on loopback, every caller an operator")
    sub.add_parser("status", help="what runs, what died (with its exit status), what was given up")
    sub.add_parser("env", help="print the shell exports that point sodactl at the cluster as its "
                   "operator: eval \"$(soda-devcluster env)\"")
    d = sub.add_parser("down", help="delete the services, stop every part and guest, remove the "
                       "namespace and cgroups; the logs stay")
    d.add_argument("--timeout", type=float, default=DOWN_TIMEOUT,
                   help="seconds to give the supervisor to take it down (default 300)")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> ClusterConfig:
    return ClusterConfig(state_dir=os.path.abspath(args.state_dir), master_addr=args.master, node=args.node,
                         netns=args.netns, cgroup_parent=args.cgroup_parent, hypervisor=args.hypervisor,
                         cluster_cidr=args.cluster_cidr, switch_metrics=args.switch_metrics,
                         ready_timeout=args.timeout, nodes=args.nodes, fabric_cidr=args.fabric_cidr,
                         tls=not args.insecure)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    service.setup_logging("INFO", "soda-devcluster")
    return {"up": up, "run": run, "supervise": supervise, "status": status, "env": env,
            "down": down}[args.command](args)


# ---- up / run / supervise ----------------------------------------------------------

def up(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        print("soda-devcluster: --nodes must be at least 1", file=sys.stderr)
        return service.EXIT_USAGE
    config = config_from(args)
    try:
        cluster = LocalCluster(config)
    except ValueError as exc:
        print(f"soda-devcluster: {exc}", file=sys.stderr)
        return service.EXIT_USAGE
    try:
        cluster.prepare()
    except ClusterError:
        print(f"the cluster in {config.state_dir} is already up")
        return status(args)
    log_path = os.path.join(cluster.log_dir, SUPERVISOR_LOG)
    argv = [sys.executable, "-m", "soda.devcluster.main", "--state-dir", config.state_dir, "supervise",
            "--master", args.master, "--node", args.node, "--netns", args.netns,
            "--cgroup-parent", args.cgroup_parent, "--hypervisor", args.hypervisor,
            "--cluster-cidr", args.cluster_cidr, "--timeout", str(args.timeout),
            "--nodes", str(args.nodes), "--fabric-cidr", args.fabric_cidr,
            *([] if args.switch_metrics is None else ["--switch-metrics", args.switch_metrics]),
            *(["--insecure"] if args.insecure else [])]
    with open(log_path, "ab") as out:
        # Its own session: the terminal's Ctrl-C and hangup do not reach the cluster.
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    deadline = time.monotonic() + args.timeout * len(cluster.parts)
    while True:
        state = load_state(config.state_dir) or {}
        if state.get("phase") == "up":
            print(f"cluster up (supervisor pid {child.pid}; its log: {log_path})")
            return status(args)
        if child.poll() is not None:
            print(f"soda-devcluster: the cluster did not start (supervisor "
                  f"{describe_exit(child.returncode)}); the end of {log_path}:\n{_tail(log_path)}",
                  file=sys.stderr)
            teardown(config.state_dir)      # whatever it had not taken down itself
            return 1
        if time.monotonic() > deadline:
            print(f"soda-devcluster: the cluster did not start within {args.timeout * len(cluster.parts):g} s; "
                  f"taking it down (see {cluster.log_dir})", file=sys.stderr)
            args.timeout = DOWN_TIMEOUT
            down(args)
            return 1
        time.sleep(0.1)


def supervise(args: argparse.Namespace) -> int:
    """The detached supervisor: start the prepared cluster, keep it running
    until SIGTERM, then take it down."""
    stop = service.stop_event_on_signals()
    cluster = LocalCluster(config_from(args))
    try:
        # Its stderr is logs/supervisor.log already (see `up`).
        cluster.start(by_command=True, events_to_file=False)
    except ClusterError as exc:
        print(f"soda-devcluster: {exc}", file=sys.stderr)
        return 1
    print("soda-devcluster: cluster up; supervising", file=sys.stderr, flush=True)
    stop.wait()
    took = cluster.down()
    print(f"soda-devcluster: cluster taken down in {took:.1f} s", file=sys.stderr, flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    stop = service.stop_event_on_signals()
    cluster = LocalCluster(config_from(args))
    try:
        cluster.prepare()
        cluster.start(by_command=True)
    except ClusterError as exc:
        print(f"soda-devcluster: {exc}", file=sys.stderr)
        return 1
    status(args)
    stop.wait()
    took = cluster.down()
    print(f"cluster taken down in {took:.1f} s; logs in {cluster.log_dir}")
    return 0


# ---- env ---------------------------------------------------------------------------

def env(args: argparse.Namespace) -> int:
    """Shell exports for sodactl: the cluster's Master, and its operator's
    certificate unless the cluster runs without TLS."""
    state_dir = os.path.abspath(args.state_dir)
    state = load_state(state_dir)
    if state is None:
        print(f"soda-devcluster: no cluster is up in {state_dir}", file=sys.stderr)
        return NOT_UP
    config = state.get("config", {})
    exports = {"SODA_MASTER": config.get("master_addr", "")}
    if config.get("tls", True):
        exports.update(credentials.operator_env(state_dir))
    for key, value in exports.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


# ---- status ------------------------------------------------------------------------

def status(args: argparse.Namespace) -> int:
    state_dir = os.path.abspath(args.state_dir)
    state = load_state(state_dir)
    if state is None:
        last = os.path.join(state_dir, LOG_DIR)
        print("no cluster is up" + (f" (the last one's logs are in {last})"
                                    if os.path.exists(os.path.join(last, STATE_FILE)) else ""))
        return NOT_UP
    lines, healthy = describe(state, state_dir)
    print("\n".join(lines))
    if not is_live(state):
        print("nothing of this cluster runs any more: `down` (or the next `up`) removes what it left")
        return NOT_UP
    return 0 if healthy else 1


def describe(state: dict, state_dir: str, now: float | None = None) -> tuple[list[str], bool]:
    """One line for the supervisor and one per part, checked against /proc
    (the record says what was started; only /proc says what still runs)."""
    now = time.time() if now is None else now
    sup = supervisor_of(state)
    supervised = sup is not None and sup.matches()
    healthy = supervised
    lines = []
    if sup is None:
        lines.append("supervisor: none recorded (the cluster is still starting or stopping)")
    elif supervised:
        rec = state["supervisor"]
        kind = "" if rec.get("command") else ", a program using soda.devcluster"
        lines.append(f"supervisor: pid {sup.pid}{kind}; "
                     f"log {os.path.join(state_dir, LOG_DIR, SUPERVISOR_LOG)}")
    else:
        lines.append(f"supervisor: DIED (pid {sup.pid} is gone): nothing restarts the parts; "
                     f"see {os.path.join(state_dir, LOG_DIR, SUPERVISOR_LOG)}")
    if state.get("phase") != "up":
        lines.append(f"cluster: {state.get('phase', 'unknown')}")
        healthy = False
    for name in part_names(layout_of(state.get("config", {}))):
        rec = state.get("parts", {}).get(name)
        if rec is None:
            continue
        line, ok = _part_line(name, rec, recorded(state, name), supervised, state_dir, now)
        lines.append(line)
        healthy = healthy and ok
    return lines, healthy


def _part_line(name, rec, pid, supervised, state_dir, now) -> tuple[str, bool]:
    logfile = os.path.join(state_dir, rec.get("log", ""))
    last = ""
    if rec.get("last_exit_at"):
        last = (f"last: pid {rec.get('last_exit_pid')} {describe_exit(rec.get('last_exit'))} "
                f"{_ago(now - rec['last_exit_at'])} ago")
    if pid is not None and pid.matches():
        line = f"{name}: running (pid {pid.pid}, up {_ago(now - rec.get('started_at', now))}"
        if rec.get("restarts"):
            times = "time" if rec["restarts"] == 1 else "times"
            line += f"; restarted {rec['restarts']} {times}, {last}"
        return line + ")", True
    state = rec.get("state")
    if state == RUNNING:
        gone = f"{name}: DIED (pid {pid.pid if pid else '?'} is gone; "
        if supervised:
            return gone + "the supervisor restarts it in a moment)", False
        return gone + f"nothing restarts it: the supervisor is not running); see {logfile}", False
    if state == RESTARTING:
        return f"{name}: DIED (pid {rec.get('last_exit_pid')} {rec.get('reason')}); see {logfile}", False
    if state == FAILED:
        return f"{name}: FAILED (pid {rec.get('last_exit_pid')} {rec.get('reason')}); see {logfile}", False
    if state == EXITED:
        return f"{name}: stopped (pid {rec.get('last_exit_pid')} {rec.get('reason')}); see {logfile}", False
    return f"{name}: {state}", False


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# ---- down --------------------------------------------------------------------------

def down(args: argparse.Namespace) -> int:
    state_dir = os.path.abspath(args.state_dir)
    state = load_state(state_dir)
    if state is None:
        print(f"no cluster is up in {state_dir}")
        return 0
    began = time.monotonic()
    sup = supervisor_of(state)
    if sup is not None and sup.matches():
        if not state["supervisor"].get("command"):
            print(f"soda-devcluster: the cluster in {state_dir} is supervised by pid {sup.pid}, a program "
                  f"using soda.devcluster: take it down there", file=sys.stderr)
            return 1
        # The supervisor takes the cluster down itself (it reaps its children);
        # then whatever is left is swept from the record below.
        sup.signal(signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while sup.matches() and time.monotonic() < deadline:
            time.sleep(0.1)
        if sup.signal(signal.SIGKILL):
            print(f"soda-devcluster: the supervisor did not finish within {args.timeout:g} s: killed it",
                  file=sys.stderr)
    teardown(state_dir)
    left = load_state(state_dir)
    if left is not None and is_live(left):
        print("soda-devcluster: something recorded still runs; see `soda-devcluster status`", file=sys.stderr)
        return 1
    print(f"cluster taken down in {time.monotonic() - began:.1f} s; "
          f"logs kept in {os.path.join(state_dir, LOG_DIR)} until the next up")
    return 0


if __name__ == "__main__":
    sys.exit(main())
