"""soda-switch's command line and config, and its lifecycle in-process."""

import asyncio
import socket
import threading
import time

import pytest

from soda import model
from soda.errors import InvalidSpec
from soda.switch import main as switch_main
from soda.switch.main import SwitchConfig, build_config, check_config, parse_args, serve
from tests.support import free_port


def write(tmp_path, text):
    path = tmp_path / "switch.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_and_flags_over_file(tmp_path):
    assert build_config(parse_args([])) == SwitchConfig()
    path = write(tmp_path, "master: 10.0.0.1:7070\nlisten_hosts: [127.0.0.1]\nconnect_timeout: 1\n"
                           "log_level: DEBUG\n")
    config = build_config(parse_args(["--config", path, "--master", "10.0.0.2:7070", "--log-level", "warning"]))
    assert config == SwitchConfig(master="10.0.0.2:7070", listen_hosts=("127.0.0.1",), connect_timeout=1.0,
                                  log_level="WARNING")


@pytest.mark.parametrize("text, message", [
    ("masters: x\n", "unknown key(s) masters"),
    ("connect_timeout: 0\n", "connect_timeout must be positive"),
    ("drain_seconds: -1\n", "drain_seconds must not be negative"),
    ("listen_hosts: ['']\n", "listen_hosts"),
    ("log_level: LOUD\n", "log_level"),
    ("connect_timeout: soon\n", "expected a number"),
])
def test_bad_config_is_a_usage_error(tmp_path, capsys, text, message):
    assert switch_main.main(["--config", write(tmp_path, text)]) == 2
    assert message in capsys.readouterr().err


def test_check_config_rejects_an_empty_master():
    with pytest.raises(InvalidSpec, match="master"):
        check_config(SwitchConfig(master=""))


def test_serve_without_a_master_keeps_running_and_stops_cleanly():
    config = SwitchConfig(master=f"127.0.0.1:{free_port()}", reconnect_max_seconds=0.2, drain_seconds=0)

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, stop=stop))
        await asyncio.sleep(1.0)
        assert not task.done()
        started = time.monotonic()
        stop.set()
        assert await asyncio.wait_for(task, 10) == 0
        return time.monotonic() - started
    assert asyncio.run(main()) < 5


class ReportingClient:
    """A Master that answers nothing but takes reports."""

    def __init__(self):
        self.reports = []

    def watch_endpoints(self):
        return iter(())

    def list_services(self):
        return []

    def report_switch_stats(self, report):
        self.reports.append(report)

    def close(self):
        pass


def test_reports_reach_the_master_with_busy_addresses_but_not_its_own(tmp_path):
    metrics_port, listen_port = free_port(), free_port()
    config = SwitchConfig(master="127.0.0.1:1", report_seconds=0.05, name="sw-test",
                          listen_hosts=("127.0.0.1",), metrics_listen=f"127.0.0.1:{metrics_port}",
                          drain_seconds=0)
    client = ReportingClient()

    async def main():
        switch = switch_main.Switch(config, client)
        await switch.start()
        with socket.socket() as other:
            other.bind(("127.0.0.1", 0))
            other.listen()
            await switch.proxy.apply(model.EndpointSet(
                service="web", switch=model.SwitchSpec(listen=f"127.0.0.1:{listen_port}"),
                endpoints=(model.Endpoint("web-0", "127.0.0.1", free_port(), 1.0, True),)))
            client.reports.clear()
            for _ in range(100):
                if client.reports:
                    break
                await asyncio.sleep(0.05)
            report = client.reports[-1]
            assert f"127.0.0.1:{other.getsockname()[1]}" in report.busy
        await switch.stop()
        return report
    report = asyncio.run(main())
    assert report.switch == "sw-test" and report.listen_hosts == ("127.0.0.1",)
    # Its own listeners are not "busy": the service's and the metrics one.
    assert f"127.0.0.1:{listen_port}" not in report.busy and f"127.0.0.1:{metrics_port}" not in report.busy
    (svc,) = report.services
    assert (svc.service, svc.listen, svc.listening) == ("web", f"127.0.0.1:{listen_port}", True)
    assert [(v.vnode, v.routable, v.healthy) for v in svc.vnodes] == [("web-0", True, True)]


def test_metrics_listen_must_be_host_port():
    with pytest.raises(InvalidSpec, match="HOST:PORT"):
        check_config(SwitchConfig(metrics_listen="9470"))
    check_config(SwitchConfig(metrics_listen=""))       # off


class StreamingClient(ReportingClient):
    """A Master whose endpoint stream sends `sets` and then stays open."""

    def __init__(self, sets):
        super().__init__()
        self.sets = sets
        self.closed = threading.Event()

    def watch_endpoints(self):
        yield from self.sets
        self.closed.wait()

    def close(self):
        self.closed.set()


def test_a_restarted_switch_keeps_the_nft_table_it_finds_until_the_endpoints_are_known():
    """A Switch killed and started again finds its table left behind: it
    keeps forwarding, untouched, while the Master's snapshot arrives, and is
    replaced whole in one transaction once that snapshot has settled."""
    from tests.unit.test_switch_nft import LEFT_BY_A_DEAD_SWITCH, FakeRunner

    listen = f"127.0.0.1:{free_port()}"
    web = model.EndpointSet(service="web", switch=model.SwitchSpec(listen=listen, mode="l4"),
                            endpoints=(model.Endpoint("web-0", "10.233.1.2", 80, 1.0, True),))
    runner = FakeRunner(listing_error=False, listing=LEFT_BY_A_DEAD_SWITCH)
    client = StreamingClient([web])
    config = SwitchConfig(master="127.0.0.1:1", nft_table="t1", drain_seconds=0, report_seconds=60)

    async def until(predicate):
        for _ in range(200):
            if predicate():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("condition not reached in time")

    async def main():
        switch = switch_main.Switch(config, client)
        switch.kernel.runner = runner
        switch.sync.settle_seconds = 0.3
        await switch.start()
        try:
            await until(lambda: switch.kernel.services() == {"web"})
            assert runner.scripts() == []            # not settled yet: the old table forwards
            await until(lambda: switch.sync.synced.is_set() and runner.scripts())
        finally:
            await switch.stop()
    asyncio.run(main())
    scripts = runner.scripts()
    assert scripts[0].startswith("add table ip t1\ndelete table ip t1\ntable ip t1 {")
    assert 'comment "web"' in scripts[0]
    assert scripts[1:] == ["add table ip t1\ndelete table ip t1\n"]     # stop() removes it
