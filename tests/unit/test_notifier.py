import threading
import time

from soda.master.notifier import Notifier


def test_wait_returns_at_once_when_already_past():
    n = Notifier()
    n.publish("a")
    assert n.wait("a", 0, timeout=5) == 1


def test_publish_wakes_only_its_topic():
    n = Notifier()
    woke = {}

    def watch(topic):
        woke[topic] = n.wait(topic, 0, timeout=2)
    threads = [threading.Thread(target=watch, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    time.sleep(0.1)
    n.publish("a")
    threads[0].join(1)
    assert woke == {"a": 1}
    threads[1].join(3)
    assert woke["b"] == 0            # timed out, never woken


def test_close_wakes_everyone():
    n = Notifier()
    t = threading.Thread(target=n.wait, args=("a", 0, 30))
    t.start()
    time.sleep(0.05)
    n.close()
    t.join(2)
    assert not t.is_alive() and n.closed
