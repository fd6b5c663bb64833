"""Taking a local cluster down from its record signals a recorded process
only while pid, start time and command line all still match /proc, and
`status` says in words what runs and what died. Real sleepers of this test's
own, no root: the record names no namespace and no cgroup parent."""

import json
import signal
import subprocess
import time

from soda.devcluster.cluster import LOG_DIR, STATE_FILE, load_state, teardown
from soda.devcluster.main import describe
from soda.procid import ProcessId

SLEEPER = ["sleep", "300"]


def sleeper():
    child = subprocess.Popen(SLEEPER, stdin=subprocess.DEVNULL)
    pid = ProcessId.of_child(child.pid, SLEEPER)
    assert pid is not None and pid.matches()
    return child, pid


def write_record(state_dir, parts, supervisor=None, phase="up"):
    state = {"phase": phase, "config": {"master_addr": "127.0.0.1:1", "netns": "", "cgroup_parent": ""},
             "supervisor": supervisor, "parts": parts}
    (state_dir / STATE_FILE).write_text(json.dumps(state))
    return state


def test_down_kills_recorded_processes_only_while_their_identity_holds(tmp_path):
    children = []
    try:
        (same, same_id), (recycled, recycled_id), (other_cmd, other_id) = [sleeper() for _ in range(3)]
        children += [same, recycled, other_cmd]
        parts = {
            "switch": {**same_id.as_dict(), "state": "running"},
            # The pid was recorded, but for a process that started at another
            # time: the pid now belongs to someone else.
            "agent": {**recycled_id.as_dict(), "starttime": recycled_id.starttime + 1, "state": "running"},
            # Same pid and start time, another command line.
            "daemon": {**other_id.as_dict(), "argv": ["soda-daemon"], "state": "running"},
            "master": {"pid": None, "state": "failed"},
        }
        (tmp_path / "master").mkdir()
        (tmp_path / "rootfs.img").write_text("not the cluster's")
        write_record(tmp_path, parts)
        assert teardown(str(tmp_path))
        assert same.wait(timeout=10) == -signal.SIGTERM
        time.sleep(0.2)
        assert recycled.poll() is None and other_cmd.poll() is None
        # Only what the cluster owns is gone; the last record waits beside the logs.
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOG_DIR, "rootfs.img"]
        assert load_state(str(tmp_path / LOG_DIR))["phase"] == "down"
        assert not teardown(str(tmp_path))          # nothing recorded any more
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait()


def test_status_words(tmp_path):
    child, pid = sleeper()
    try:
        now = time.time()
        parts = {
            "master": {**pid.as_dict(), "state": "running", "started_at": now - 75, "restarts": 0,
                       "log": "logs/master.log"},
            "daemon": {"pid": None, "state": "failed", "last_exit_pid": 41, "last_exit": 1,
                       "reason": "exited with status 1; restarted 5 times within 30 s: given up",
                       "log": "logs/daemon.log"},
            "agent": {**pid.as_dict(), "state": "running", "started_at": now - 5, "restarts": 1,
                      "last_exit": -9, "last_exit_pid": 40, "last_exit_at": now - 5, "log": "logs/agent.log"},
            "switch": {"pid": None, "state": "restarting", "last_exit_pid": 42, "last_exit": -9,
                       "reason": "killed by signal 9 (SIGKILL); restarting in 0.4 s",
                       "log": "logs/switch.log"},
        }
        state = write_record(tmp_path, parts, supervisor={**pid.as_dict(), "command": True})
        lines, healthy = describe(state, str(tmp_path), now=now)
        assert not healthy
        assert lines[0].startswith(f"supervisor: pid {pid.pid}; log ")
        assert lines[1] == f"master: running (pid {pid.pid}, up 1m15s)"
        assert lines[2] == (f"daemon: FAILED (pid 41 exited with status 1; restarted 5 times within 30 s: "
                            f"given up); see {tmp_path}/logs/daemon.log")
        assert lines[3] == (f"agent: running (pid {pid.pid}, up 5s; restarted 1 time, "
                            f"last: pid 40 killed by signal 9 (SIGKILL) 5s ago)")
        assert lines[4].startswith("switch: DIED (pid 42 killed by signal 9 (SIGKILL); restarting in 0.4 s)")

        # The supervisor gone: a dead part is said to stay dead.
        child.kill()
        child.wait()
        state["parts"] = {"agent": parts["agent"]}
        lines, healthy = describe(state, str(tmp_path), now=now)
        assert not healthy
        assert lines[0].startswith(f"supervisor: DIED (pid {pid.pid} is gone): nothing restarts the parts")
        assert lines[1].startswith(f"agent: DIED (pid {pid.pid} is gone; nothing restarts it")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
