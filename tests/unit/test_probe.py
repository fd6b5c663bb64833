"""The readiness probe against real sockets on loopback: an answer is seen
at once, a refusal is False at once, and a SYN that got no answer is sent
again within tens of milliseconds instead of after the kernel's one-second
retransmission."""

import socket
import threading
import time

from soda.hypervisors.probe import RESEND_SECONDS, probe_tcp


def test_an_open_port_answers_at_once_and_a_closed_one_is_refused_at_once():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        began = time.monotonic()
        assert probe_tcp("127.0.0.1", port, timeout=1.0)
    assert time.monotonic() - began < 0.1
    began = time.monotonic()
    assert not probe_tcp("127.0.0.1", port, timeout=1.0)        # closed now: refused
    assert time.monotonic() - began < 0.1


def test_a_syn_that_was_dropped_is_sent_again_soon():
    # A listener whose accept queue is full drops SYNs without answering,
    # as a guest whose network is not up yet does. It starts accepting
    # after 0.3 s: a single connect would retry only after 1 s.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        for _ in range(4):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            fillers.append(sock)
        time.sleep(0.05)

        def drain():
            time.sleep(0.3)
            server.settimeout(0.05)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                try:
                    server.accept()[0].close()
                except OSError:
                    pass

        threading.Thread(target=drain, daemon=True).start()
        began = time.monotonic()
        assert probe_tcp("127.0.0.1", port, timeout=2.0)
        took = time.monotonic() - began
        for sock in fillers:
            sock.close()
    assert 0.25 < took < 0.3 + 10 * RESEND_SECONDS + 0.2, took
