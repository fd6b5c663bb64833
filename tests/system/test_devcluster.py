"""The local-cluster launcher (soda.devcluster) supervises and tears down a
whole cluster: an Agent killed with SIGKILL is started again and adopts its
running guests (same processes, service still RUNNING, still served through
the Switch); `down` leaves no namespace, uplink, cgroup or guest process,
only the logs; and a pid in the record whose start time is not the recorded
one is never signalled. Results are read from /proc, `ip`, the cgroup tree
and HTTP, not from the launcher's own words."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from soda.agent.network import short_name
from soda.devcluster import ClusterConfig, LocalCluster, teardown
from soda.devcluster.credentials import sodactl_env
from soda.procid import ProcessId
from tests.support import free_port, reachable_tmp_dir, traversable
from tests.system.cluster import wait_until
from tests.system.cgroupfs import VnodeCgroups
from tests.system.guests import _sweep_cgroups, alive, fetch, require_guest_support

pytestmark = [pytest.mark.cluster, pytest.mark.root, pytest.mark.guest]

require_guest_support()


def config_for(state_dir) -> ClusterConfig:
    tag = uuid.uuid4().hex[:6]
    # A cluster range of its own: two clusters routing the same /24 through
    # their uplinks would steal each other's guest traffic.
    return ClusterConfig(state_dir=traversable(str(state_dir)), master_addr=f"127.0.0.1:{free_port()}", node="node-a",
                         netns=f"sodac-{tag}", cgroup_parent=f"soda-dc-{tag}",
                         cluster_cidr=f"10.{100 + int(tag, 16) % 100}.0.0/16",
                         switch_metrics=f"127.0.0.1:{free_port()}")


def ctl(config, *args, timeout=180) -> str:
    result = subprocess.run([sys.executable, "-m", "soda.cli.sodactl", "--master", config.master_addr, *args],
                            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                            env=sodactl_env(config.state_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def guest_pids(state_dir) -> dict[str, int]:
    root = os.path.join(state_dir, "agent", "uml")
    found = {}
    for name in os.listdir(root) if os.path.isdir(root) else ():
        path = os.path.join(root, name, "guest.json")
        if os.path.exists(path):
            with open(path) as f:
                found[name] = json.load(f)["pid"]
    return found


def leftovers(config, pids=()) -> list[str]:
    """What the cluster made and still exists, read from the kernel."""
    left = []
    if os.path.exists(os.path.join("/run/netns", config.netns)):
        left.append(f"namespace {config.netns}")
    uplink = short_name("su", config.netns)
    if subprocess.run(["ip", "link", "show", "dev", uplink], capture_output=True).returncode == 0:
        left.append(f"link {uplink}")
    left += [f"cgroup {d}" for d in VnodeCgroups(config.cgroup_parent).leftovers()]
    left += [f"guest process {p}" for p in pids if alive(p)]
    return left


def last_resort(config, pids=()) -> None:
    """Whatever a failed `down` left, removed without the code under test."""
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    _sweep_cgroups(config.cgroup_parent)
    subprocess.run(["ip", "link", "del", short_name("su", config.netns)], capture_output=True)
    subprocess.run(["ip", "netns", "del", config.netns], capture_output=True)


def new_agent_log(config) -> str:
    """The Agent's log since the launcher last started it."""
    with open(os.path.join(config.state_dir, "logs", "agent.log"), errors="replace") as f:
        return f.read().rsplit("starting agent\n", 1)[-1]


def answers(url) -> bool:
    try:
        return "SODA virtual node" in fetch(url, timeout=2)
    except OSError:
        return False


@pytest.fixture
def state_dir():
    """The cluster's state: guests' uids must reach it."""
    with reachable_tmp_dir("soda-test-devcluster-") as path:
        yield os.path.join(path, "cluster")


def test_a_killed_agent_is_restarted_its_guests_kept_and_down_leaves_nothing(state_dir, rootfs):
    config = config_for(state_dir)
    cluster = LocalCluster(config)
    seen: set[int] = set()
    try:
        cluster.up()
        assert [part.state for part in map(cluster.part, ("master", "daemon", "agent", "switch"))] == \
            ["running"] * 4
        ctl(config, "image", "push", rootfs, "--name", "busybox-httpd")
        port = free_port()
        ctl(config, "service", "create", "web", "--image", "busybox-httpd", "--hypervisor", "uml",
            "--nodes", "2", "--cpu", "0.5,1.0", "--memory", "64", "--switch", f"127.0.0.1:{port}",
            "--wait", "--timeout", "120")
        before = guest_pids(config.state_dir)
        seen.update(before.values())
        assert set(before) == {"web-0", "web-1"} and all(alive(p) for p in before.values())
        url = f"http://127.0.0.1:{port}/"
        wait_until(lambda: answers(url), 30, what="the Switch to serve web")

        old = cluster.kill("agent")
        killed_at = time.monotonic()
        new = cluster.wait_restarted("agent", old, timeout=10)
        delay = time.monotonic() - killed_at
        print(f"agent restarted {delay:.2f} s after SIGKILL")
        assert new.pid != old.pid and not old.matches() and new.matches()
        part = cluster.part("agent")
        assert part.restarts == 1 and part.last_exit == -signal.SIGKILL
        with open(os.path.join(config.state_dir, "cluster.json")) as f:
            record = json.load(f)["parts"]["agent"]
        assert (record["pid"], record["starttime"]) == (new.pid, new.starttime)
        assert record["last_exit_pid"] == old.pid and record["last_exit"] == -signal.SIGKILL

        # The new Agent takes its assignments and adopts the running guests
        # instead of booting them again.
        wait_until(lambda: "desired set from the Master: 2 virtual node(s)" in new_agent_log(config), 30,
                   what="the restarted Agent to reconcile")
        time.sleep(3)
        assert "booted in" not in new_agent_log(config)
        service = json.loads(ctl(config, "-o", "json", "service", "get", "web"))
        assert [v["phase"] for v in service["vnodes"]] == ["RUNNING", "RUNNING"]
        assert guest_pids(config.state_dir) == before and all(alive(p) for p in before.values())
        assert answers(url)
    finally:
        seen.update(guest_pids(config.state_dir).values())
        try:
            print(f"down took {cluster.down():.1f} s")
        finally:
            left = leftovers(config, seen)
            if left:
                last_resort(config, seen)
    assert left == []
    assert sorted(os.listdir(config.state_dir)) == ["logs"]
    logs = sorted(os.listdir(os.path.join(config.state_dir, "logs")))
    assert logs == ["agent.log", "cluster.json", "daemon.log", "master.log", "supervisor.log", "switch.log"]
    with open(os.path.join(config.state_dir, "logs", "supervisor.log")) as f:
        events = f.read()
    assert f"agent (pid {old.pid}) died: killed by signal 9 (SIGKILL); restarting in 0.2 s" in events
    assert f"agent started again as pid {new.pid} (restart 1)" in events


def devcluster(config, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soda.devcluster.main", "--state-dir", config.state_dir,
                           *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_the_command_says_what_died_and_down_signals_recorded_identities_only(state_dir):
    config = config_for(state_dir)
    decoy = None
    try:
        up = devcluster(config, "up", "--master", config.master_addr, "--node", config.node,
                        "--netns", config.netns, "--cgroup-parent", config.cgroup_parent,
                        "--cluster-cidr", config.cluster_cidr, "--switch-metrics", config.switch_metrics)
        assert up.returncode == 0, up.stdout + up.stderr
        status = devcluster(config, "status")
        assert status.returncode == 0 and status.stdout.count("running (pid") == 4, status.stdout

        with open(os.path.join(config.state_dir, "cluster.json")) as f:
            state = json.load(f)
        agent = ProcessId.from_dict(state["parts"]["agent"])
        os.kill(agent.pid, signal.SIGKILL)
        wait_until(lambda: "restarted 1 time, last: pid %d killed by signal 9 (SIGKILL)" % agent.pid
                   in devcluster(config, "status").stdout, 10, what="status to tell the Agent's restart")
        with open(os.path.join(config.state_dir, "logs", "supervisor.log")) as f:
            assert (f"agent (pid {agent.pid}) died: killed by signal 9 (SIGKILL); restarting in 0.2 s"
                    in f.read())

        # Without its supervisor the cluster stays up, and status says so.
        supervisor = ProcessId.from_dict(state["supervisor"])
        assert supervisor.signal(signal.SIGKILL)
        wait_until(lambda: not supervisor.matches(), 10, what="the supervisor to die")
        status = devcluster(config, "status")
        assert status.returncode == 1 and "supervisor: DIED" in status.stdout, status.stdout

        # The Switch dies and its pid goes to another program: the record
        # names the decoy's pid and command line with another start time, as
        # a reused pid would look. `down` must not touch the decoy.
        with open(os.path.join(config.state_dir, "cluster.json")) as f:
            state = json.load(f)
        switch = ProcessId.from_dict(state["parts"]["switch"])
        assert switch.signal(signal.SIGKILL)
        wait_until(lambda: not switch.matches(), 10, what="the Switch to die")
        decoy = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL)
        decoy_id = ProcessId.of_child(decoy.pid, ["sleep", "300"])
        state["parts"]["switch"].update(pid=decoy.pid, starttime=decoy_id.starttime + 1,
                                        argv=list(decoy_id.argv))
        with open(os.path.join(config.state_dir, "cluster.json"), "w") as f:
            json.dump(state, f)

        down = devcluster(config, "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert decoy.poll() is None, "down killed a process it did not start"
    finally:
        if decoy is not None:
            decoy.kill()
            decoy.wait()
        try:
            if os.path.exists(os.path.join(config.state_dir, "cluster.json")):
                teardown(config.state_dir)
        finally:
            left = leftovers(config)
            if left:
                last_resort(config)
    assert left == []
    assert sorted(os.listdir(config.state_dir)) == ["logs"]
