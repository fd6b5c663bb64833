"""soda-switch as a real process in front of a Master and an Agent (fake
driver), driven by sodactl. The cluster range is put on loopback, so the
"virtual nodes" are plain servers on 127.78.x.y that the test runs itself:
every byte stays on this machine. Who answered is counted by the client."""

import signal
import socket
import socketserver
import threading
from collections import Counter

import pytest

from tests.support import free_port, make_ext4_image
from tests.system.cluster import wait_until

pytestmark = pytest.mark.cluster
LOOPBACK_CLUSTER = "127.78.0.0/16"


class NameServer(socketserver.ThreadingTCPServer):
    """Answers each HTTP-ish request with its name, then closes."""
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address, name):
        self.name = name
        super().__init__(address, NameHandler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()


class NameHandler(socketserver.StreamRequestHandler):
    def handle(self):
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        self.wfile.write(self.server.name.encode())


def request(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            chunks = []
            while data := s.recv(4096):
                chunks.append(data)
            return b"".join(chunks).decode()
    except OSError:
        return ""


def test_switch_process_spreads_one_to_two_and_stops_on_sigterm(cluster, tmp_path):
    c = cluster
    c.start_master("--cluster-cidr", LOOPBACK_CLUSTER)
    c.start_agent("node-a", "--address", "127.0.0.1")
    wait_until(lambda: c.ready_nodes() == ["node-a"], 30, what="the Agent to register")
    c.ctl("image", "push", make_ext4_image(str(tmp_path / "img")), "--name", "img")
    guest_port, listen_port = free_port(), free_port()
    c.ctl("service", "create", "web", "--image", "img", "--nodes", "2", "--cpu", "0.5,1.0",
          "--port", str(guest_port), "--switch", f"127.0.0.1:{listen_port}", "--wait", timeout=60)
    vnodes = c.json("service", "get", "web")["vnodes"]
    assert all(v["address"].startswith("127.78.") for v in vnodes)
    servers = [NameServer((v["address"], guest_port), v["name"]) for v in vnodes]
    try:
        switch = c.start_switch()
        wait_until(lambda: request(listen_port) or switch.poll() is not None, 30, what="the Switch to route")
        assert switch.poll() is None, c.log("switch")
        # READY=1 comes once the first endpoint lists have settled.
        wait_until(lambda: "switch ready" in c.log("switch"), 30, what="the Switch to say it is ready")

        got = Counter(request(listen_port) for _ in range(60))
        by_cpu = {v["resources"]["cpu"]: v["name"] for v in vnodes}
        assert got == {by_cpu[0.5]: 20, by_cpu[1.0]: 40}, c.log("switch")

        c.ctl("service", "delete", "web", "--wait", timeout=60)
        wait_until(lambda: request(listen_port) == "", 30, what="the listener to close")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", listen_port), timeout=5).close()

        switch.send_signal(signal.SIGTERM)
        assert switch.wait(timeout=20) == 0, c.log("switch")
        log = c.log("switch")
        assert "switch stopped" in log and "Traceback" not in log and " ERROR " not in log
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
