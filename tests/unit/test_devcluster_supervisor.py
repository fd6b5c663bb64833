"""The local cluster's supervisor decides like systemd's Restart=on-failure:
restart after a doubling delay, give up past the start limit, leave a clean
exit alone. Fake processes and a fake clock: nothing is spawned or slept."""

import signal

import pytest

from soda.devcluster.supervisor import (EXITED, FAILED, RESTARTING, RUNNING, RestartPolicy, Supervisor,
                                        describe_exit, is_clean_exit)
from tests.fakes import FakeClock


class FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.status = None

    def poll(self):
        return self.status


class Harness:
    def __init__(self, policy=RestartPolicy(), fail_spawns=0):
        self.clock = FakeClock()
        self.spawned = []
        self.events = []
        self.fail_spawns = fail_spawns
        self.sup = Supervisor(self.spawn, policy, self.clock, lambda part, msg: self.events.append(msg))

    def spawn(self, name):
        if self.fail_spawns:
            self.fail_spawns -= 1
            raise FileNotFoundError(2, "No such file or directory")
        proc = FakeProcess(100 + len(self.spawned))
        self.spawned.append(proc)
        return proc

    def current(self, name="agent"):
        return self.sup.parts[name].handle

    def kill(self, status=-signal.SIGKILL, name="agent"):
        self.current(name).status = status

    def advance(self, seconds):
        self.clock.now += seconds
        return self.sup.step()

    def restart_delays(self, deaths, name="agent"):
        """Kill the part `deaths` times, each time as soon as it is back; the
        delay the supervisor chose each time."""
        delays = []
        for _ in range(deaths):
            self.kill(name=name)
            self.sup.step()
            part = self.sup.parts[name]
            if part.state != RESTARTING:
                break
            delays.append(round(part.next_start - self.clock.now, 6))
            self.advance(part.next_start - self.clock.now)
            assert part.state == RUNNING
        return delays


def test_a_killed_part_comes_back_after_the_first_delay_not_before():
    h = Harness()
    h.sup.start("agent")
    first = h.current()
    h.kill()
    assert h.advance(0.0) == pytest.approx(0.2)
    part = h.sup.parts["agent"]
    assert part.state == RESTARTING and part.last_exit == -signal.SIGKILL
    assert "agent (pid 100) died: killed by signal 9 (SIGKILL); restarting in 0.2 s" in h.events
    h.advance(0.19)
    assert h.current() is first and part.state == RESTARTING
    assert h.advance(0.01) is None
    assert part.state == RUNNING and h.current() is not first and part.restarts == 1
    assert h.events[-1] == "agent started again as pid 101 (restart 1)"


def test_the_delay_doubles_up_to_the_cap():
    h = Harness(RestartPolicy(first_delay=0.2, factor=2, max_delay=5, burst=100, interval=30))
    h.sup.start("agent")
    assert h.restart_delays(8) == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]


def test_past_the_start_limit_it_gives_up_and_says_how_it_died():
    h = Harness(RestartPolicy(first_delay=0.2, max_delay=5, burst=5, interval=30))
    h.sup.start("agent")
    assert h.restart_delays(10) == [0.2, 0.4, 0.8, 1.6, 3.2]
    part = h.sup.parts["agent"]
    assert part.state == FAILED and part.restarts == 5
    assert part.reason == "killed by signal 9 (SIGKILL); restarted 5 times within 30 s: given up"
    assert h.events[-1] == f"agent (pid {part.pid}) died: {part.reason}"
    # Given up means given up: no more spawns, whatever time passes.
    spawned = len(h.spawned)
    assert h.advance(3600) is None
    assert len(h.spawned) == spawned and part.state == FAILED


def test_restarts_spread_wider_than_the_interval_never_hit_the_limit():
    h = Harness(RestartPolicy(first_delay=0.2, burst=3, interval=10, stable_after=60))
    h.sup.start("agent")
    for _ in range(10):
        h.advance(11)             # each death more than `interval` after the last restart
        h.kill(status=1)
        h.sup.step()
        part = h.sup.parts["agent"]
        assert part.state == RESTARTING, part.reason
        h.advance(part.next_start - h.clock.now)
    assert part.restarts == 10


def test_a_run_longer_than_stable_after_starts_the_backoff_again():
    h = Harness(RestartPolicy(first_delay=0.2, max_delay=5, burst=100, interval=30, stable_after=10))
    h.sup.start("agent")
    assert h.restart_delays(4) == [0.2, 0.4, 0.8, 1.6]
    h.advance(10)
    assert h.restart_delays(2) == [0.2, 0.4]


def test_a_clean_exit_is_not_restarted():
    for status in (0, -signal.SIGTERM):
        h = Harness()
        h.sup.start("switch")
        h.kill(status=status, name="switch")
        assert h.advance(0.0) is None
        part = h.sup.parts["switch"]
        assert part.state == EXITED and "a clean exit, not restarted" in part.reason
        h.advance(60)
        assert len(h.spawned) == 1


def test_a_part_that_cannot_be_spawned_again_counts_towards_the_limit():
    h = Harness(RestartPolicy(first_delay=0.2, burst=2, interval=30))
    h.sup.start("agent")
    h.fail_spawns = 10
    h.kill(status=1)
    h.sup.step()
    h.advance(0.2)
    part = h.sup.parts["agent"]
    assert part.state == RESTARTING and part.reason.startswith("could not be started: [Errno 2]")
    h.advance(0.4)
    assert part.state == FAILED and "given up" in part.reason


def test_only_parts_due_are_restarted_and_step_says_when_the_next_is_due():
    h = Harness()
    for name in ("master", "agent"):
        h.sup.start(name)
    h.kill(name="agent")
    h.advance(0.0)
    h.kill(status=2, name="master")
    assert h.advance(0.1) == pytest.approx(0.1)       # the agent's restart, 0.1 s on
    assert h.sup.parts["master"].state == RESTARTING
    assert h.advance(0.1) == pytest.approx(0.1)       # the master's, 0.2 s after its death
    assert h.sup.parts["agent"].state == RUNNING
    h.sup.stop("master")
    assert h.advance(1) is None and h.sup.parts["master"].state == "stopped"


def test_exit_words():
    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(3) == "exited with status 3"
    assert describe_exit(None) == "exit status unknown"
    assert is_clean_exit(0) and is_clean_exit(-signal.SIGTERM)
    assert not is_clean_exit(1) and not is_clean_exit(-signal.SIGKILL) and not is_clean_exit(None)
