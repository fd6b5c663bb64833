"""`service logs` end to end over real gRPC: sodactl's client asks the
Master, the Master orders the console from the node's Agent side
(soda.agent.consoles, here with a stand-in for the reconciler) and relays
what it sends back."""

import threading
import time

import pytest

from soda import model
from soda.agent.consoles import MAX_STREAMS, ConsoleShipper
from soda.backoff import Backoff
from soda.errors import NoCapacity, NotFound, Unavailable, WrongState
from soda.hypervisors import console
from tests.support import master_client

CAP = model.Resources(2, 4096, 1000, 100_000)


class Consoles:
    """What the reconciler's console_of answers, from the test."""

    def __init__(self, running: dict, kept: dict):
        self.running, self.kept = running, kept

    def console_of(self, name):
        if name in self.running:
            return self.running[name], ""
        if name in self.kept:
            return "", self.kept[name]
        raise NotFound(f"virtual node {name} is not on this node")


@pytest.fixture
def node(master, image_file, tmp_path):
    client = master_client(master[1])
    client.register_node("n0", "127.0.0.1", CAP, ["fake"], [model.DriverCapabilities("fake")])
    client.push_image(image_file, name="busybox")
    client.create_service(model.parse_spec({"name": "web", "image": "busybox", "nodes": 2,
                                            "resources": {"cpu": 0.5, "memory": 64}}))
    path = tmp_path / "web-0.console"
    path.write_text("".join(f"boot line {i}\n" for i in range(300)) + "\x1b[31mred\x1b[0m alert\n")
    consoles = Consoles({"web-0": str(path)}, {"web-1": "kernel panic: out of memory\nend\n"})
    agent = master_client(master[1], role="agent", name="n0")
    stop = threading.Event()
    shipper = ConsoleShipper(agent, "n0", consoles, stop, Backoff(first=0.05, cap=0.2))
    thread = threading.Thread(target=shipper.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while True:                      # until the Master knows the Agent listens
        try:
            list(client.service_logs("web", "web-1"))
            break
        except Unavailable:
            assert time.monotonic() < deadline, "the shipper never connected"
            time.sleep(0.05)
    yield client, path, shipper, master[1]
    stop.set()
    agent.close()
    thread.join(5)
    client.close()


def text(chunks):
    return b"".join(data for _, data in chunks).decode()


def test_the_tail_of_a_running_guests_console_cleaned(node):
    client = node[0]
    chunks = list(client.service_logs("web", "0", tail=3))
    assert chunks[0][0] == "web-0"
    assert text(chunks) == "boot line 298\nboot line 299\nred alert\n"
    assert text(client.service_logs("web")).count("\n") == console.DEFAULT_TAIL


def test_a_failed_guests_kept_console(node):
    client = node[0]
    assert text(client.service_logs("web", "web-1", tail=-1)) == "kernel panic: out of memory\nend\n"


def test_unknown_names_are_clear_errors(node):
    client = node[0]
    with pytest.raises(NotFound, match="no virtual node '7'.*web-0, web-1"):
        list(client.service_logs("web", "7"))
    with pytest.raises(NotFound):
        list(client.service_logs("nope"))


def test_follow_streams_new_lines_and_ends_when_the_reader_goes(node):
    _, path, shipper, target = node
    reader_client = master_client(target)
    stream = reader_client.service_logs("web", "web-0", follow=True, tail=1)
    got = []
    reader = threading.Thread(target=lambda: [got.append(d) for _, d in stream], daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while b"red alert" not in b"".join(got):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with open(path, "a") as f:
        f.write("nginx: started\nhalf a li")
    while b"nginx: started\n" not in b"".join(got):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert b"half" not in b"".join(got)              # only whole lines
    with open(path, "a") as f:
        f.write("ne\n")
    while b"half a line\n" not in b"".join(got):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    busy = lambda: MAX_STREAMS - shipper._slots._value     # noqa: E731
    assert busy() == 1
    reader_client.close()                             # the reader goes away (Ctrl-C)
    reader.join(5)
    # The Agent's stream ends at its next keepalive: its slot comes back.
    deadline = time.monotonic() + console.KEEPALIVE_SECONDS + 5
    while busy():
        assert time.monotonic() < deadline, "the Agent kept following a console nobody reads"
        time.sleep(0.05)


def test_a_node_streaming_all_it_may_says_so_as_no_capacity(node):
    client, _, shipper, _ = node
    for _ in range(MAX_STREAMS):
        # The streams of earlier tests give their slots back as they end.
        assert shipper._slots.acquire(timeout=10)
    try:
        with pytest.raises(NoCapacity, match=f"already streams {MAX_STREAMS} consoles"):
            list(client.service_logs("web", "0", tail=1))
    finally:
        for _ in range(MAX_STREAMS):
            shipper._slots.release()
    assert "red alert" in text(client.service_logs("web", "0", tail=1))


def test_a_node_without_its_agent_is_unavailable(master, image_file):
    client = master_client(master[1])
    client.register_node("n1", "127.0.0.2", CAP, ["fake"], [model.DriverCapabilities("fake")])
    client.push_image(image_file, name="busybox")
    client.create_service(model.parse_spec({"name": "api", "image": "busybox", "nodes": 0}))
    with pytest.raises(WrongState, match="no virtual node"):
        list(client.service_logs("api"))
    client.create_service(model.parse_spec({"name": "db", "image": "busybox"}))
    with pytest.raises(Unavailable, match="Agent of node n1 is not connected"):
        list(client.service_logs("db"))
    client.close()
