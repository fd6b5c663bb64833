import dataclasses
import os

import pytest

from soda import config
from soda.errors import InvalidSpec

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from soda.daemon.config import DaemonConfig  # noqa: E402
from soda.daemon.cgroups import V2_DAEMON_LEAF  # noqa: E402
from soda.switch.main import SwitchConfig  # noqa: E402
from soda.agent.main import driver_configs  # noqa: E402
from soda.hypervisors.base import drivers  # noqa: E402


@pytest.mark.parametrize("cls, name", [(config.MasterConfig, "master.yaml"), (config.AgentConfig, "agent.yaml"),
                                       (DaemonConfig, "daemon.yaml"), (SwitchConfig, "switch.yaml")])
def test_shipped_configs_hold_the_defaults(cls, name):
    loaded = config.load(cls, os.path.join(TOP, "etc", "soda", name))
    if cls is config.AgentConfig:
        # Its driver sections are each driver's own dataclass, at its defaults.
        sections = driver_configs(loaded)
        assert {"fake", "uml", "qemu"} <= set(sections)
        assert sections == {n: drivers()[n].Config() for n in sections}
        loaded = dataclasses.replace(loaded, drivers={})
    if cls is DaemonConfig:
        # As soda-daemon.service runs it: below its delegated cgroup.
        assert loaded.delegated
        loaded = dataclasses.replace(loaded, delegated=False)
    assert loaded == cls()


def unit(name: str) -> dict[str, list[str]]:
    """A shipped unit's [Service] and [Unit] settings: key -> values."""
    out: dict[str, list[str]] = {}
    with open(os.path.join(TOP, "etc", "systemd", name)) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", "[")):
                key, _, value = line.partition("=")
                out.setdefault(key, []).append(value)
    return out


def test_units_agree_with_the_configs():
    etc = os.path.join(TOP, "etc", "soda")
    daemon = config.load(DaemonConfig, os.path.join(etc, "daemon.yaml"))
    agent = config.load(config.AgentConfig, os.path.join(etc, "agent.yaml"))
    master = config.load(config.MasterConfig, os.path.join(etc, "master.yaml"))
    units = {n: unit(f"soda-{n}.service") for n in ("daemon", "agent", "master", "switch")}
    for name, u in units.items():
        assert u["ExecStart"] == [f"/opt/soda/bin/soda-{name} --config /etc/soda/{name}.yaml"]
        assert u["Type"] == ["notify"] and u["Restart"] == ["on-failure"]
        assert int(u["WatchdogSec"][0]) >= 10
    assert units["daemon"]["Delegate"] == ["yes"] and daemon.delegated
    assert units["daemon"]["DelegateSubgroup"] == [V2_DAEMON_LEAF]
    # Guests outlive a restart of either node daemon.
    assert units["daemon"]["KillMode"] == units["agent"]["KillMode"] == ["process"]
    assert daemon.socket == agent.daemon_socket
    assert os.path.dirname(daemon.socket) == "/run/" + units["daemon"]["RuntimeDirectory"][0]
    assert agent.state_dir == "/var/lib/" + units["agent"]["StateDirectory"][0]
    assert master.state_dir == "/var/lib/" + units["master"]["StateDirectory"][0]
    for name in ("master", "switch"):
        assert units[name]["User"] == ["soda"] and units[name]["NoNewPrivileges"] == ["yes"]
        assert units[name]["ProtectSystem"] == ["strict"] and units[name]["PrivateTmp"] == ["yes"]


def test_unknown_keys_are_an_error(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("listen: 1.2.3.4:5\nlisen: typo\n")
    with pytest.raises(InvalidSpec, match="unknown key.*lisen"):
        config.load(config.MasterConfig, str(path))


def test_nested_and_types(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("capacity: {cpu: 4}\nhypervisors: [fake]\n")
    cfg = config.load(config.AgentConfig, str(path))
    assert cfg.capacity.cpu == 4.0 and cfg.hypervisors == ("fake",)
    path.write_text("capacity: {cpu: many}\n")
    with pytest.raises(InvalidSpec, match="capacity.cpu"):
        config.load(config.AgentConfig, str(path))
    path.write_text("capacity: {gpu: 1}\n")
    with pytest.raises(InvalidSpec, match="unknown key"):
        config.load(config.AgentConfig, str(path))


def test_bad_yaml_and_missing_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("listen: [unclosed\n")
    with pytest.raises(InvalidSpec, match="not valid YAML"):
        config.load(config.MasterConfig, str(path))
    with pytest.raises(InvalidSpec, match="cannot read config"):
        config.load(config.MasterConfig, str(tmp_path / "missing.yaml"))


def test_flags_override_only_when_given():
    cfg = config.with_overrides(config.MasterConfig(), listen="0.0.0.0:1", state_dir=None)
    assert cfg.listen == "0.0.0.0:1" and cfg.state_dir == config.MasterConfig().state_dir


@pytest.mark.parametrize("program", ["master", "daemon", "agent", "switch"])
def test_every_daemon_loads_and_refuses_its_config_the_same_way(program, tmp_path, capsys):
    import importlib
    main = importlib.import_module(f"soda.{program}.main").main
    path = tmp_path / f"{program}.yaml"
    for text, reason in [("log_level: loud\n", "log_level 'loud': use one of DEBUG, INFO"),
                         ("no_such_key: 1\n", f"{program}.yaml: unknown key(s) no_such_key")]:
        path.write_text(text)
        # A usage error (2) before anything starts, said on one line.
        assert main(["--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"soda-{program}: ") and reason in err and err.count("\n") == 1, err
