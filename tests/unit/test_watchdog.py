"""systemd liveness: WATCHDOG=1 reaches a real notify socket only while
every heartbeat is fresh; the interval follows WATCHDOG_USEC/WATCHDOG_PID."""

import os
import socket
import threading

import pytest

from soda import service
from soda.service import Heartbeat, Watchdog, sd_notify, watchdog_interval


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A datagram socket standing where systemd's would; NOTIFY_SOCKET names it."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def received(sock) -> list[str]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2.0)
    return out


def test_interval_is_half_the_watchdog_and_only_for_our_pid():
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}) == 10.0
    assert watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_ping_only_while_every_heartbeat_is_fresh(notify_socket):
    clock = Clock()
    main, loop = Heartbeat("main loop", 10, clock), Heartbeat("reconcile loop", 60, clock)
    dog = Watchdog([main, loop], interval=5)
    assert dog.check()
    assert received(notify_socket) == ["WATCHDOG=1"]
    clock.now += 11                       # the main loop stopped ticking
    loop.tick()
    assert not dog.check()
    assert received(notify_socket) == []
    main.tick()                            # it goes round again
    assert dog.check()
    assert received(notify_socket) == ["WATCHDOG=1"]
    clock.now += 61
    main.tick()
    assert not dog.check()                 # the other loop hung
    assert received(notify_socket) == []


def test_thread_pings_and_stops(notify_socket):
    beat = Heartbeat("main loop", 10)
    dog = Watchdog([beat], interval=0.05)
    dog.start()
    try:
        assert notify_socket.recv(64) == b"WATCHDOG=1"
        assert notify_socket.recv(64) == b"WATCHDOG=1"
    finally:
        dog.stop()
    assert not dog._thread.is_alive()


def test_from_environment_none_outside_systemd(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert Watchdog.from_environment([Heartbeat("main loop")]) is None


def test_main_loop_ticks_until_stopped(monkeypatch):
    monkeypatch.setattr(service, "MAIN_LOOP_TICK_SECONDS", 0.01)
    clock = Clock()
    beat = Heartbeat("main loop", 10, clock)
    clock.now += 5
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    service.run_main_loop(beat, stop)
    assert beat.age() == 0


def test_sd_notify_abstract_and_missing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sd_notify("READY=1")
    name = f"soda-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("READY=1")
        assert sock.recv(64) == b"READY=1"


def test_hang_hook_only_when_asked(monkeypatch):
    installed = []
    monkeypatch.delenv(service.HANG_HOOK_ENV, raising=False)
    assert not service.install_hang_hook(lambda sig, fn: installed.append(sig))
    monkeypatch.setenv(service.HANG_HOOK_ENV, "1")
    assert service.install_hang_hook(lambda sig, fn: installed.append(sig))
    assert installed == [service.signal.SIGUSR2]
