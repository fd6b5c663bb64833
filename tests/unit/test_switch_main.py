"""soda-switch's command line and config, and its lifecycle in-process."""

import asyncio
import time

import pytest

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
