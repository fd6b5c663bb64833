"""sodactl against a fake Master client: parsing, output, errors, --wait.

The fake records every call and answers with soda.model objects; it is
handed to the CLI through Session(connect=...), so nothing is patched.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading
from dataclasses import replace

import click
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from soda import errors, model
from soda.cli import output, sodactl, specs
from soda.cli.progress import ByteProgress, StatusLine
from soda.cli.rollout import Rollout
from soda.cli.sodactl import Session, cli

DIGEST = "sha256:" + "ab" * 32


# ---- fakes -------------------------------------------------------------------

def make_service(spec: model.ServiceSpec, phases=None, reasons=None, deleting=False,
                 image_digest=DIGEST) -> model.Service:
    phases = phases or [model.Phase.PENDING] * spec.nodes
    reasons = reasons or [""] * spec.nodes
    vnodes = tuple(
        model.VirtualNode(
            name=model.vnode_name(spec.name, i), service=spec.name, index=i,
            resources=spec.resources[i], node=f"node-{i}", address=f"10.0.{i}.2",
            weight=spec.resources[i].cpu, image_digest=image_digest, hypervisor="fake",
            phase=phases[i], reason=reasons[i],
            boot_seconds=1.5 if phases[i] == model.Phase.RUNNING else 0.0,
            deleting=deleting)
        for i in range(spec.nodes))
    return model.Service(spec=spec, image_digest=image_digest, vnodes=vnodes, deleting=deleting,
                         created_at=1_700_000_000.0)


def web_spec(**fields) -> model.ServiceSpec:
    data = {"name": "web", "image": "busybox-httpd", "nodes": 2, "port": 80,
            "resources": {"cpu": [0.5, 1.0], "memory": 64, "bandwidth": 10, "disk": 64},
            "switch": {"listen": "127.0.0.1:8080"}}
    data.update(fields)
    return model.parse_spec(data)


class FakeClient:
    """Stands in for MasterClient: records calls, returns model objects,
    raises what a test puts in `fail`."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.services: dict[str, model.Service] = {}
        self.fail: dict[str, Exception] = {}
        self.watch_events: list = []
        self.watch_blocks = threading.Event()    # set() to release a blocking watch
        self.watch_stays_open = False
        self.nodes: list[model.Node] = []
        self.node_script: list[list[model.Node]] = []
        self.images: list[model.Image] = []
        self.closed = False

    def _record(self, method, *args, **kwargs):
        self.calls.append((method, args, kwargs))
        if method in self.fail:
            raise self.fail[method]

    def called(self, method):
        return [(args, kwargs) for name, args, kwargs in self.calls if name == method]

    def close(self):
        self.closed = True

    def create_service(self, spec):
        self._record("create_service", spec)
        self.services[spec.name] = make_service(spec)
        return self.services[spec.name]

    def get_service(self, name):
        self._record("get_service", name)
        if name not in self.services:
            raise errors.NotFound(f"service {name} not found")
        return self.services[name]

    def service_logs(self, service, vnode="", follow=False, tail=0):
        self._record("service_logs", service, vnode, follow, tail)
        yield "web-0", b"line one\n"
        yield "", b"line two\n"

    def list_services(self):
        self._record("list_services")
        return list(self.services.values())

    def delete_service(self, name):
        self._record("delete_service", name)
        service = self.get_service(name)
        return make_service(service.spec, deleting=True)

    def resize_service(self, name, nodes=None, resources=()):
        self._record("resize_service", name, nodes=nodes, resources=tuple(resources))
        return self.services[name]

    def watch_services(self, name=""):
        self._record("watch_services", name)
        events = list(self.watch_events)

        def stream():
            # Like the Master, what the watch says is what a read returns.
            for kind, payload in events:
                if kind == "UPSERT":
                    self.services[payload.name] = payload
                else:
                    self.services.pop(payload, None)
                yield kind, payload
            if self.watch_stays_open:
                self.watch_blocks.wait(10)
        return stream()

    def list_nodes(self):
        self._record("list_nodes")
        if self.node_script:            # one node list per read, the last one kept
            self.nodes = self.node_script.pop(0)
        return self.nodes

    def _node(self, name):
        found = next((n for n in self.nodes if n.name == name), None)
        if found is None:
            raise errors.NotFound(f"no physical node named {name!r}")
        return found

    def drain_node(self, name):
        self._record("drain_node", name)
        return replace(self._node(name), draining=True)

    def undrain_node(self, name):
        self._record("undrain_node", name)
        return replace(self._node(name), draining=False)

    def remove_node(self, name):
        self._record("remove_node", name)
        return self._node(name)

    def push_image(self, path, name="", init="", progress=None, digest=None, public=False, base="",
                   compress=True):
        self._record("push_image", path, name=name, init=init, digest=digest)
        with open(path, "rb") as f:
            data = f.read()
        if progress:
            progress(len(data), len(data), len(data))
        return model.Image(digest=digest, size=len(data), names=(name,) if name else ())

    def list_images(self):
        self._record("list_images")
        return self.images

    def delete_image(self, ref):
        self._record("delete_image", ref)
        return model.Image(digest=DIGEST, size=1 << 20, names=(ref,))


@pytest.fixture
def client():
    fake = FakeClient()
    yield fake
    fake.watch_blocks.set()


def run(client, *args, input=None):
    return CliRunner().invoke(cli, list(args), obj=Session(connect=lambda master: client), input=input)


def assert_one_line_error(result, code, *fragments):
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


# ---- service create ----------------------------------------------------------------

def test_create_flags_with_comma_lists_become_the_spec(client):
    result = run(client, "service", "create", "web", "--image", "busybox-httpd", "--nodes", "2",
                 "--cpu", "0.5,1.0", "--memory", "64", "--bandwidth", "10,20", "--disk", "128",
                 "--port", "8000", "--hypervisor", "uml", "--switch", "0.0.0.0:8080",
                 "--policy", "weighted-least-connections")
    assert result.exit_code == 0, result.output
    [(spec,), _] = client.called("create_service")[0]
    assert spec == model.ServiceSpec(
        name="web", image="busybox-httpd", nodes=2, hypervisor="uml", port=8000,
        resources=(model.Resources(0.5, 64, 10, 128), model.Resources(1.0, 64, 20, 128)),
        switch=model.SwitchSpec("0.0.0.0:8080", "weighted-least-connections"),
        template=model.Resources(1.0, 64, 20, 128))
    assert "web-1" in result.stdout        # the accepted service is shown


def test_create_from_file_with_overrides(client, tmp_path):
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump({
        "name": "web", "image": "busybox-httpd", "hypervisor": "uml", "nodes": 2,
        "resources": {"cpu": [0.5, 1.0], "memory": 64},
        "switch": {"listen": "127.0.0.1:8080"}}))
    result = run(client, "service", "create", "shop", "-f", str(path), "--nodes", "3",
                 "--cpu", "2", "--policy", "weighted-least-connections")
    assert result.exit_code == 0, result.output
    [(spec,), _] = client.called("create_service")[0]
    assert spec.name == "shop"
    assert spec.nodes == 3
    assert spec.hypervisor == "uml"
    assert [r.cpu for r in spec.resources] == [2.0, 2.0, 2.0]
    assert {r.memory for r in spec.resources} == {64}
    assert spec.switch == model.SwitchSpec("127.0.0.1:8080", "weighted-least-connections")


def test_create_from_stdin(client):
    result = run(client, "service", "create", "-f", "-",
                 input="name: web\nimage: busybox-httpd\nnodes: 1\n")
    assert result.exit_code == 0, result.output
    assert client.called("create_service")[0][0][0].name == "web"


def test_malformed_yaml_is_one_line_exit_1(client, tmp_path):
    path = tmp_path / "service.yaml"
    path.write_text("name: web\nimage: [busybox\nnodes: 2\n")
    result = run(client, "service", "create", "-f", str(path))
    assert_one_line_error(result, 1, f"{path}: not valid YAML", "line")
    assert client.calls == []


@pytest.mark.parametrize("text, fragment", [
    ("- name: web\n", "must be a mapping of fields, not a list"),
    ("", "empty"),
    ("name: web\nimage: busybox-httpd\nreplicas: 2\n", "unknown spec field(s): replicas"),
    ("name: web\nimage: busybox-httpd\nresources: {cpu: 0.5, gpu: 1}\n", "unknown resource field(s): gpu"),
    ("name: web\nimage: busybox-httpd\nnodes: 2\nresources: {cpu: [1, 2, 3]}\n",
     "cpu: 3 values given for 2 virtual nodes"),
])
def test_bad_spec_file_is_one_line_exit_1(client, tmp_path, text, fragment):
    path = tmp_path / "service.yaml"
    path.write_text(text)
    result = run(client, "service", "create", "-f", str(path))
    assert_one_line_error(result, 1, str(path), fragment)
    assert client.called("create_service") == []


def test_unreadable_spec_file(client, tmp_path):
    result = run(client, "service", "create", "-f", str(tmp_path / "missing.yaml"))
    assert_one_line_error(result, 1, "missing.yaml: cannot read: No such file or directory")


@pytest.mark.parametrize("flags, fragment", [
    (["--nodes", "2", "--cpu", "0.5,fast"], "cpu: 'fast' is not a number"),
    (["--nodes", "2", "--cpu", "0.5,"], "cpu: '' is not a number"),
    (["--nodes", "3", "--memory", "64,128"], "memory: 2 values given for 3 virtual nodes"),
    (["--memory", "0.5"], "memory must be between"),
    (["--switch", "8080"], "expected HOST:PORT"),
])
def test_bad_flag_values_are_one_line_exit_1(client, flags, fragment):
    result = run(client, "service", "create", "web", "--image", "busybox-httpd", *flags)
    assert_one_line_error(result, 1, fragment)
    assert client.called("create_service") == []


def test_no_capacity_exits_3(client):
    client.fail["create_service"] = errors.NoCapacity("no node has 64 cores free", resource="cpu")
    result = run(client, "service", "create", "web", "--image", "busybox-httpd", "--cpu", "64")
    assert_one_line_error(result, 3, "no node has 64 cores free")


def test_master_unreachable_exits_1_with_its_message(client):
    client.fail["list_services"] = errors.Unavailable("cannot reach the SODA Master at 127.0.0.1:7070")
    result = run(client, "service", "list")
    assert_one_line_error(result, 1, "cannot reach the SODA Master at 127.0.0.1:7070")


def test_multiline_server_message_is_printed_on_one_line(client):
    client.fail["get_service"] = errors.SodaError("first\nsecond")
    result = run(client, "service", "get", "web")
    assert_one_line_error(result, 1, "first; second")


@pytest.mark.parametrize("args", [
    ["service", "create", "--image", "busybox-httpd"],         # no NAME and no -f
    ["service", "create", "web"],                              # no --image
    ["service", "create", "web", "--image", "x", "--nodes", "two"],
    ["service", "frobnicate"],
    ["--output", "xml", "service", "list"],
    ["service", "resize", "web"],                              # nothing to change
])
def test_usage_errors_exit_2(client, args):
    result = run(client, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert client.calls == []


def test_unexpected_exception_is_internal_error_not_traceback(client):
    client.fail["list_nodes"] = ZeroDivisionError("division by zero")
    result = run(client, "node", "list")
    assert_one_line_error(result, 1, "error: internal: ZeroDivisionError: division by zero")


def test_keyboard_interrupt_exits_130_quietly(client):
    client.fail["list_nodes"] = KeyboardInterrupt()
    result = run(client, "node", "list")
    assert result.exit_code == 130
    assert result.output == ""


def test_client_is_made_from_master_option_and_closed(client):
    targets = []

    def connect(master):
        targets.append(master)
        return client
    result = CliRunner().invoke(cli, ["--master", "10.1.1.1:7070", "service", "list"],
                                obj=Session(connect=connect))
    assert result.exit_code == 0, result.output
    assert targets == ["10.1.1.1:7070"]
    assert client.closed


def test_master_from_environment(client):
    targets = []
    CliRunner(env={"SODA_MASTER": "master.example:7070"}).invoke(
        cli, ["service", "list"], obj=Session(connect=lambda m: targets.append(m) or client))
    assert targets == ["master.example:7070"]


# ---- output --------------------------------------------------------------------------

def test_service_get_json_shape(client):
    client.services["web"] = make_service(web_spec(), phases=[model.Phase.RUNNING, model.Phase.FAILED],
                                          reasons=["", "kernel panic"])
    result = run(client, "-o", "json", "service", "get", "web")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "name": "web", "image": "busybox-httpd", "image_digest": DIGEST, "hypervisor": "",
        "nodes": 2, "port": 80, "cpu_cap": False, "boot_timeout": 0.0,
        "switch": model.SwitchSpec(listen="127.0.0.1:8080").as_dict(),
        "on_demand": None, "network": {"peers": True, "egress": []},
        "state": "FAILED", "deleting": False, "owner": "(operators)", "created_at": "2023-11-14T22:13:20Z",
        "vnodes": [
            {"name": "web-0", "node": "node-0", "address": "10.0.0.2", "phase": "RUNNING",
             "resources": {"cpu": 0.5, "memory": 64, "bandwidth": 10, "disk": 64},
             "weight": 0.5, "boot_seconds": 1.5, "reason": "", "hypervisor": "fake",
             "deleting": False, "frozen": False, "replaces": "", "moving_to": "", "usage": None, "switch": None, "last_move": None},
            {"name": "web-1", "node": "node-1", "address": "10.0.1.2", "phase": "FAILED",
             "resources": {"cpu": 1.0, "memory": 64, "bandwidth": 10, "disk": 64},
             "weight": 1.0, "boot_seconds": 0.0, "reason": "kernel panic", "hypervisor": "fake",
             "deleting": False, "frozen": False, "replaces": "", "moving_to": "", "usage": None, "switch": None, "last_move": None},
        ],
    }


def test_yaml_output_matches_json_and_command_level_o(client):
    client.services["web"] = make_service(web_spec())
    as_json = json.loads(run(client, "-o", "json", "service", "get", "web").stdout)
    as_yaml = yaml.safe_load(run(client, "service", "get", "web", "-o", "yaml").stdout)
    assert as_yaml == as_json


def test_service_get_table(client):
    client.services["web"] = make_service(web_spec(), phases=[model.Phase.RUNNING, model.Phase.BOOTING])
    result = run(client, "service", "get", "web")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "Switch:" in result.stdout and "127.0.0.1:8080 weighted-round-robin" in result.stdout
    assert "sha256:abababababab" in result.stdout
    assert "PENDING (1/2 running)" in result.stdout
    header = next(line for line in lines if line.startswith("NAME"))
    assert header.split() == ["NAME", "NODE", "ADDRESS", "PHASE", "CPU", "MEMORY", "BANDWIDTH",
                              "DISK", "WEIGHT", "BOOT", "CPU-S", "MEM", "MEM-PEAK", "IN", "OUT",
                              "DROPPED", "FORKS-REFUSED", "REASON"]
    row = next(line for line in lines if line.startswith("web-0"))
    assert row.split() == ["web-0", "node-0", "10.0.0.2", "RUNNING", "0.5", "64Mi", "10Mbit",
                           "64Mi", "0.5", "1.5s", "-", "-", "-", "-", "-", "-", "-", "-"]


def test_service_get_says_where_a_moved_virtual_node_came_from_and_why(client):
    service = make_service(web_spec(), phases=[model.Phase.RUNNING, model.Phase.RUNNING])
    move = model.VnodeMove("node-9", 1_700_000_100.0, "node node-9 lost: no heartbeat for 12 s")
    client.services["web"] = replace(service, vnodes=(service.vnodes[0],
                                                      replace(service.vnodes[1], last_move=move)))
    text = run(client, "service", "get", "web").stdout
    moved = text.split("Moved:\n", 1)[1].splitlines()
    assert moved[0].split() == ["NAME", "NOW", "ON", "FROM", "AT", "WHY"]
    assert moved[1].split() == ["web-1", "node-1", "node-9", "2023-11-14T22:15:00Z", "node", "node-9",
                                "lost:", "no", "heartbeat", "for", "12", "s"]
    assert len(moved) == 2 or not moved[2].startswith("web-0")
    as_json = json.loads(run(client, "-o", "json", "service", "get", "web").stdout)
    assert [v["last_move"] for v in as_json["vnodes"]] == [
        None, {"from_node": "node-9", "at": 1_700_000_100.0, "why": "node node-9 lost: no heartbeat for 12 s"}]
    # Never moved: no section at all.
    client.services["web"] = service
    assert "Moved:" not in run(client, "service", "get", "web").stdout


USAGE = model.Usage(cpu_seconds=12.34, memory_bytes=20 * 1024 * 1024,
                    memory_peak_bytes=31 * 1024 * 1024 + 512 * 1024, bytes_in=1536,
                    bytes_out=300, throttled_seconds=0.5, oom_kills=1, packets_refused=17,
                    pids_refused=3)


def test_service_get_shows_usage_in_table_json_and_yaml(client):
    service = make_service(web_spec(), phases=[model.Phase.RUNNING, model.Phase.RUNNING])
    client.services["web"] = replace(service, vnodes=(replace(service.vnodes[0], usage=USAGE),
                                                      service.vnodes[1]))
    lines = run(client, "service", "get", "web").stdout.splitlines()
    row = next(line for line in lines if line.startswith("web-0"))
    assert row.split()[10:17] == ["12.3", "20.0Mi", "31.5Mi", "1.5Ki", "300B", "17", "3"]
    other = next(line for line in lines if line.startswith("web-1"))
    assert other.split()[10:17] == ["-"] * 7
    as_json = json.loads(run(client, "-o", "json", "service", "get", "web").stdout)
    assert as_json["vnodes"][0]["usage"] == {
        "cpu_seconds": 12.34, "memory_bytes": 20971520, "memory_peak_bytes": 33030144,
        "bytes_in": 1536, "bytes_out": 300, "throttled_seconds": 0.5, "oom_kills": 1,
        "packets_refused": 17, "pids_refused": 3}
    assert as_json["vnodes"][1]["usage"] is None
    as_yaml = yaml.safe_load(run(client, "-o", "yaml", "service", "get", "web").stdout)
    assert as_yaml == as_json


def test_node_list_shows_usage_sums(client):
    client.nodes = [model.Node(name="node-a", address="192.0.2.10", capacity=model.Resources(4, 4096, 1000, 10240),
                               hypervisors=("uml",), vnodes=2, usage=USAGE + USAGE)]
    table = run(client, "node", "list").stdout.splitlines()
    assert table[0].split()[-7:] == ["CPU-S", "MEM", "MEM-PEAK", "IN", "OUT", "DROPPED", "FORKS-REFUSED"]
    assert table[1].split()[-7:] == ["24.7", "40.0Mi", "63.0Mi", "3.0Ki", "600B", "34", "6"]
    [listed] = json.loads(run(client, "-o", "json", "node", "list").stdout)
    assert listed["usage"]["cpu_seconds"] == 24.68 and listed["usage"]["oom_kills"] == 2


def test_service_list_table_and_json(client):
    client.services["web"] = make_service(web_spec(), phases=[model.Phase.RUNNING, model.Phase.PENDING])
    table = run(client, "service", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "NODES", "IMAGE", "STATE", "OWNER"]
    assert table[1].split() == ["web", "1/2", "busybox-httpd", "PENDING", "(operators)"]
    listed = json.loads(run(client, "-o", "json", "service", "list").stdout)
    assert [s["name"] for s in listed] == ["web"] and listed[0]["vnodes"][0]["phase"] == "RUNNING"


def test_node_list(client):
    client.nodes = [model.Node(name="node-a", address="192.0.2.10", subnet="10.0.1.0/24",
                               capacity=model.Resources(4, 4096, 1000, 10240),
                               allocated=model.Resources(1.5, 128, 20, 128),
                               hypervisors=("uml", "qemu"), vnodes=2,
                               labels={"zone": "a", "rack": "r1"})]
    table = run(client, "node", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "ADDRESS", "STATE", "SUBNET", "CPU", "MEMORY", "BANDWIDTH",
                                "DISK", "VNODES", "HYPERVISORS", "LABELS", "CPU-S", "MEM", "MEM-PEAK",
                                "IN", "OUT", "DROPPED", "FORKS-REFUSED"]
    assert table[1].split() == ["node-a", "192.0.2.10", "READY", "10.0.1.0/24", "1.5/4",
                                "128/4096Mi", "20/1000Mbit", "128/10240Mi", "2", "uml,qemu",
                                "rack=r1,zone=a", "-", "-", "-", "-", "-", "-", "-"]
    [listed] = json.loads(run(client, "-o", "json", "node", "list").stdout)
    assert listed["capacity"] == {"cpu": 4, "memory": 4096, "bandwidth": 1000, "disk": 10240}
    assert listed["hypervisors"] == ["uml", "qemu"]
    assert listed["labels"] == {"rack": "r1", "zone": "a"}
    [in_yaml] = yaml.safe_load(run(client, "-o", "yaml", "node", "list").stdout)
    assert in_yaml["labels"] == {"rack": "r1", "zone": "a"}


def test_node_get_shows_one_node_with_its_image_cache(client):
    cache = model.ImageCacheState(bytes=3 << 30, limit=16 << 30, images=(DIGEST,))
    client.nodes = [model.Node(name="node-b", address="192.0.2.11", capacity=model.Resources(4, 4096, 1000, 10240),
                               hypervisors=("fake",), image_cache=cache)]
    shown = run(client, "node", "get", "node-b").stdout
    assert "Image cache:" in shown and "3.0 GiB of 16.0 GiB (19 %), 1 image(s)" in shown, shown
    got = json.loads(run(client, "-o", "json", "node", "get", "node-b").stdout)
    assert got["image_cache"] == {"bytes": 3 << 30, "limit": 16 << 30, "images": [DIGEST]}
    assert_one_line_error(run(client, "node", "get", "node-z"), 1, "no physical node named 'node-z'")


def test_node_list_shows_a_node_without_labels_as_such(client):
    client.nodes = [model.Node(name="node-b", address="192.0.2.11", capacity=model.Resources(4, 4096, 1000, 10240),
                               hypervisors=("fake",))]
    header, row = run(client, "node", "list").stdout.splitlines()
    assert row.split()[header.split().index("LABELS")] == "-"
    [listed] = json.loads(run(client, "-o", "json", "node", "list").stdout)
    assert listed["labels"] == {}


def test_image_list_and_delete(client):
    client.images = [model.Image(digest=DIGEST, size=3 * 1024 * 1024, names=("busybox-httpd",))]
    table = run(client, "image", "list").stdout.splitlines()
    assert table[0].split() == ["DIGEST", "NAMES", "SIZE", "STORED", "PARENT", "CREATED", "OWNERS", "PUBLIC"]
    assert table[1].split() == ["sha256:abababababab", "busybox-httpd", "3.0", "MiB", "3.0", "MiB", "-", "-",
                                "(operators)", "no"]
    result = run(client, "image", "delete", "busybox-httpd")
    assert result.exit_code == 0 and client.called("delete_image") == [(("busybox-httpd",), {})]


def test_image_push_hashes_then_uploads(client, tmp_path):
    path = tmp_path / "rootfs.ext4"
    path.write_bytes(b"\0" * 4096)
    result = run(client, "image", "push", str(path), "--name", "busybox-httpd", "--init", "/init")
    assert result.exit_code == 0, result.output
    digest = "sha256:" + hashlib.sha256(b"\0" * 4096).hexdigest()
    assert client.called("push_image") == [
        ((str(path),), {"name": "busybox-httpd", "init": "/init", "digest": digest})]
    assert result.stdout.strip() == f"busybox-httpd {digest}"
    # Not a terminal: no redrawn bars, just the final line of each step.
    assert "hashed" in result.stderr and "uploaded" in result.stderr and "\r" not in result.stderr


def test_image_push_missing_file_and_bad_name(client, tmp_path):
    result = run(client, "image", "push", str(tmp_path / "nope.ext4"))
    assert_one_line_error(result, 1, "nope.ext4: cannot read")
    (tmp_path / "rootfs.ext4").write_bytes(b"x")
    result = run(client, "image", "push", str(tmp_path / "rootfs.ext4"), "--name", "Bad Name")
    assert_one_line_error(result, 1, "invalid image name")
    assert client.called("push_image") == []


# ---- --wait ---------------------------------------------------------------------------

def upsert(spec, *phases, reasons=None):
    return ("UPSERT", make_service(spec, phases=list(phases), reasons=reasons))


def test_create_wait_until_running(client):
    spec = web_spec()
    client.watch_events = [upsert(spec, model.Phase.PENDING, model.Phase.PENDING),
                           upsert(spec, model.Phase.RUNNING, model.Phase.BOOTING),
                           upsert(spec, model.Phase.RUNNING, model.Phase.RUNNING)]
    result = run(client, "-o", "json", "service", "create", "web", "--image", "busybox-httpd",
                 "--nodes", "2", "--cpu", "0.5,1.0", "--wait")
    assert result.exit_code == 0, result.output
    assert client.called("watch_services") == [(("web",), {})]
    assert result.stderr.splitlines() == ["web: 0/2 running", "web: 1/2 running", "web: 2/2 running"]
    assert [v["phase"] for v in json.loads(result.stdout)["vnodes"]] == ["RUNNING", "RUNNING"]


def test_create_wait_fails_naming_the_failed_vnode(client):
    spec = web_spec()
    client.watch_events = [upsert(spec, model.Phase.PENDING, model.Phase.PENDING),
                           upsert(spec, model.Phase.RUNNING, model.Phase.FAILED,
                                  reasons=["", "image digest mismatch"])]
    client.watch_stays_open = True
    result = run(client, "service", "create", "web", "--image", "busybox-httpd", "--nodes", "2",
                 "--cpu", "0.5,1.0", "--wait")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == \
        "error: web: web-1 failed on node-1: image digest mismatch"


def test_create_wait_waits_for_a_vnode_retried_after_a_temporary_failure(client):
    # The Daemon restarting: the Agent could not fence web-1, says the cause
    # is temporary and starts it again a moment later.
    spec = web_spec()
    daemon_down = ("starting: cannot reach the SODA Daemon at /run/soda/daemon.sock: connection "
                   "refused " + model.retry_note(1, temporary=True))
    client.watch_events = [upsert(spec, model.Phase.PENDING, model.Phase.PENDING),
                           upsert(spec, model.Phase.RUNNING, model.Phase.FAILED,
                                  reasons=["", daemon_down]),
                           upsert(spec, model.Phase.RUNNING, model.Phase.BOOTING),
                           upsert(spec, model.Phase.RUNNING, model.Phase.RUNNING)]
    result = run(client, "service", "create", "web", "--image", "busybox-httpd", "--nodes", "2",
                 "--cpu", "0.5,1.0", "--wait")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["web: 0/2 running", "web: 1/2 running, 1 retrying",
                                          "web: 1/2 running", "web: 2/2 running"]


def test_create_wait_fails_at_once_for_a_guest_that_cannot_boot(client):
    # Retried too, but it fails the same way every time: no reason to wait.
    spec = web_spec()
    panic = ("booting: guest exited while booting: Kernel panic - not syncing: VFS: Unable to "
             "mount root fs " + model.retry_note(1))
    client.watch_events = [upsert(spec, model.Phase.RUNNING, model.Phase.FAILED, reasons=["", panic])]
    client.watch_stays_open = True
    result = run(client, "service", "create", "web", "--image", "busybox-httpd", "--nodes", "2",
                 "--cpu", "0.5,1.0", "--wait")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == f"error: web: web-1 failed on node-1: {panic}"


def test_create_wait_times_out_naming_a_vnode_still_retried(client):
    spec = web_spec()
    daemon_down = "starting: cannot reach the SODA Daemon " + model.retry_note(4, temporary=True)
    client.watch_events = [upsert(spec, model.Phase.RUNNING, model.Phase.FAILED,
                                  reasons=["", daemon_down])]
    client.watch_stays_open = True
    result = run(client, "service", "create", "web", "--image", "busybox-httpd", "--nodes", "2",
                 "--cpu", "0.5,1.0", "--wait", "--timeout", "0.3")
    assert result.exit_code == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: timed out after 0.3s waiting for web: 1/2 running, 1 retrying")
    assert f"web-1 (FAILED on node-1: {daemon_down})" in last


def test_create_wait_times_out_naming_what_is_not_running(client):
    spec = web_spec()
    client.watch_events = [upsert(spec, model.Phase.RUNNING, model.Phase.BOOTING)]
    client.watch_stays_open = True
    result = run(client, "service", "create", "web", "--image", "busybox-httpd", "--nodes", "2",
                 "--cpu", "0.5,1.0", "--wait", "--timeout", "0.3")
    assert result.exit_code == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: timed out after 0.3s waiting for web: 1/2 running")
    assert "web-1 (BOOTING on node-1)" in last


def test_create_wait_when_service_is_deleted_meanwhile(client):
    client.watch_events = [upsert(web_spec(), model.Phase.PENDING, model.Phase.PENDING),
                           ("DELETED", "web")]
    result = run(client, "service", "create", "web", "--image", "busybox-httpd", "--wait")
    assert_one_line_error_tail(result, "service web was deleted while waiting")


def test_delete_wait_until_deleted_event(client):
    spec = web_spec()
    client.services["web"] = make_service(spec, phases=[model.Phase.RUNNING] * 2)
    client.watch_events = [("UPSERT", make_service(spec, phases=[model.Phase.STOPPING] * 2, deleting=True)),
                           ("DELETED", "web")]
    result = run(client, "service", "delete", "web", "--wait")
    assert result.exit_code == 0, result.output
    assert client.called("delete_service") == [(("web",), {})]
    assert result.stdout.strip() == "service web deleted"
    assert result.stderr.splitlines()[-1] == "web: deleted"


def test_delete_wait_notices_a_service_gone_before_the_watch_began(client):
    # The DELETED event fell before the watch started: the quiet watch is
    # followed by a direct read, which finds the service gone.
    spec = web_spec()
    client.services["web"] = make_service(spec)
    client.watch_stays_open = True
    original_delete = client.delete_service

    def delete_and_vanish(name):
        answer = original_delete(name)
        del client.services[name]
        return answer
    client.delete_service = delete_and_vanish
    result = run(client, "service", "delete", "web", "--wait", "--timeout", "0.2")
    assert result.exit_code == 0, result.output


def test_delete_without_wait_and_json(client):
    client.services["web"] = make_service(web_spec())
    assert run(client, "service", "delete", "web").stdout.strip() == "service web deleting"
    assert json.loads(run(client, "-o", "json", "service", "delete", "web").stdout)["deleting"] is True
    assert client.called("watch_services") == []


def assert_one_line_error_tail(result, fragment):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].startswith("error: ")
    assert fragment in result.stderr.splitlines()[-1]


# ---- resize ---------------------------------------------------------------------------

def test_resize_applies_flags_over_current_resources(client):
    client.services["web"] = make_service(web_spec())
    result = run(client, "service", "resize", "web", "--nodes", "3", "--memory", "128")
    assert result.exit_code == 0, result.output
    [(args, kwargs)] = client.called("resize_service")
    assert args == ("web",)
    assert kwargs["nodes"] == 3
    # cpu kept per node; the new third node starts from the last node's values.
    assert kwargs["resources"] == (model.Resources(0.5, 128, 10, 64), model.Resources(1.0, 128, 10, 64),
                                   model.Resources(1.0, 128, 10, 64))


def test_resize_nodes_only_leaves_resources_to_the_master(client):
    client.services["web"] = make_service(web_spec())
    result = run(client, "service", "resize", "web", "--nodes", "5")
    assert result.exit_code == 0, result.output
    assert client.called("resize_service") == [(("web",), {"nodes": 5, "resources": ()})]


@pytest.mark.parametrize("flags, fragment", [
    (["--nodes", "-1"], "nodes must be between 0 and"),
    (["--cpu", "1,2,3"], "cpu: 3 values given for 2 virtual nodes"),
])
def test_resize_bad_values(client, flags, fragment):
    client.services["web"] = make_service(web_spec())
    assert_one_line_error(run(client, "service", "resize", "web", *flags), 1, fragment)
    assert client.called("resize_service") == []


def test_resize_refused_by_the_master(client):
    client.services["web"] = make_service(web_spec())
    client.fail["resize_service"] = errors.WrongState("service web is being deleted")
    assert_one_line_error(run(client, "service", "resize", "web", "--nodes", "3"), 1,
                          "service web is being deleted")


def test_resize_wait(client):
    spec = web_spec()
    client.services["web"] = make_service(spec, phases=[model.Phase.RUNNING] * 2)
    client.watch_events = [upsert(spec, model.Phase.RUNNING, model.Phase.RUNNING)]
    result = run(client, "service", "resize", "web", "--cpu", "1", "--wait")
    assert result.exit_code == 0, result.output


# ---- node drain, undrain, remove ------------------------------------------------------

def make_node(name="node-a", vnodes=2, draining=False, state="READY"):
    return model.Node(name=name, address="192.0.2.10", subnet="10.0.1.0/24", state=state,
                      capacity=model.Resources(4, 4096, 1000, 10240),
                      allocated=model.Resources(0.5 * vnodes, 64 * vnodes, 10 * vnodes, 64 * vnodes),
                      hypervisors=("fake",), vnodes=vnodes, draining=draining)


def moving_service(*vnodes):
    """web with the given (name, node, phase, reason, deleting) virtual nodes."""
    spec = web_spec(nodes=2, resources={"cpu": 0.5})
    return model.Service(spec=spec, image_digest=DIGEST, vnodes=tuple(
        model.VirtualNode(name=name, service="web", index=int(name.split("-")[1]), resources=spec.resources[0],
                          node=node, phase=phase, reason=reason, deleting=deleting)
        for name, node, phase, reason, deleting in vnodes))


def test_node_list_shows_draining_and_drained_nodes_aligned(client):
    client.nodes = [make_node("node-a", vnodes=0, draining=True), make_node("node-b", vnodes=3, draining=True),
                    make_node("node-c", vnodes=1), make_node("node-d", vnodes=0, state="LOST", draining=True)]
    header, *rows = run(client, "node", "list").stdout.splitlines()
    column = header.index("SUBNET")
    assert [row.split()[2] for row in rows] == ["READY,DRAINED", "READY,DRAINING", "READY", "LOST,DRAINED"]
    assert all(row[column:].startswith("10.0.1.0/24") for row in rows)       # columns stay aligned
    listed = json.loads(run(client, "-o", "json", "node", "list").stdout)
    assert [(n["state"], n["draining"], n["vnodes"]) for n in listed] == [
        ("READY", True, 0), ("READY", True, 3), ("READY", False, 1), ("LOST", True, 0)]
    assert [n["draining"] for n in yaml.safe_load(run(client, "-o", "yaml", "node", "list").stdout)] == \
        [True, True, False, True]


def test_node_drain_without_wait(client):
    client.nodes = [make_node(vnodes=2)]
    result = run(client, "node", "drain", "node-a")
    assert result.exit_code == 0, result.output
    assert client.called("drain_node") == [(("node-a",), {})]
    assert result.stdout.strip() == "node node-a draining: 2 virtual node(s) to move " \
                                    "(sodactl node list shows its state)"
    as_json = json.loads(run(client, "-o", "json", "node", "drain", "node-a").stdout)
    assert as_json["name"] == "node-a" and as_json["draining"] is True


def test_node_drain_wait_shows_each_move_until_the_node_holds_nothing(client, monkeypatch):
    monkeypatch.setattr("soda.cli.wait.NODE_POLL_INTERVAL", 0.001)
    client.nodes = [make_node(vnodes=2)]
    client.node_script = [[make_node(vnodes=2, draining=True)], [make_node(vnodes=2, draining=True)],
                          [make_node(vnodes=1, draining=True)], [make_node(vnodes=0, draining=True)]]
    services = iter([
        moving_service(("web-0", "node-a", model.Phase.RUNNING,
                        "node node-a is draining: moving to web-2 on node-b, waiting for it to run", False),
                       ("web-1", "node-a", model.Phase.RUNNING,
                        "node node-a is draining: waiting for its turn to move", False),
                       ("web-2", "node-b", model.Phase.BOOTING, "replaces web-0 (node node-a is draining)",
                        False)),
        moving_service(("web-0", "node-a", model.Phase.RUNNING, "", True),
                       ("web-1", "node-a", model.Phase.RUNNING,
                        "node node-a is draining: moving to web-3 on node-c, waiting for it to run", False),
                       ("web-2", "node-b", model.Phase.RUNNING, "", False)),
        moving_service(("web-2", "node-b", model.Phase.RUNNING, "", False),
                       ("web-3", "node-c", model.Phase.RUNNING, "", False)),
    ])
    client.list_services = lambda: [next(services)]
    result = run(client, "node", "drain", "node-a", "--wait")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [
        "node-a: draining, 2 virtual node(s) to move; web-0: moving to web-2 on node-b, waiting for it to run",
        "node-a: draining, 1 virtual node(s) to move, 1 stopping; web-1: moving to web-3 on node-c, "
        "waiting for it to run",
        "node-a: draining, 0 virtual node(s) to move",
        "node-a: drained"]
    assert result.stdout.strip() == "node node-a drained: it holds no virtual node"


def test_node_drain_wait_times_out_with_exit_3_when_a_virtual_node_waits_for_room(client, monkeypatch):
    monkeypatch.setattr("soda.cli.wait.NODE_POLL_INTERVAL", 0.001)
    client.nodes = [make_node(vnodes=1, draining=True)]
    client.services["web"] = moving_service(
        ("web-0", "node-a", model.Phase.RUNNING,
         "node node-a is draining: waiting for room elsewhere: not enough cpu: web-0 needs 0.5 cores", False))
    result = run(client, "node", "drain", "node-a", "--wait", "--timeout", "0.05")
    assert_one_line_error_tail_code(result, 3, "timed out after 0.05s waiting for node node-a to drain: "
                                               "web-0 (waiting for room elsewhere: not enough cpu")


def test_node_drain_wait_fails_when_the_node_is_undrained_meanwhile(client, monkeypatch):
    monkeypatch.setattr("soda.cli.wait.NODE_POLL_INTERVAL", 0.001)
    client.nodes = [make_node(vnodes=1)]
    result = run(client, "node", "drain", "node-a", "--wait")
    assert_one_line_error_tail(result, "node node-a was undrained while waiting for it to drain")


def test_node_drain_refused_for_room_exits_3_naming_the_resource(client):
    client.nodes = [make_node()]
    client.fail["drain_node"] = errors.NoCapacity("cannot drain node node-a: not enough cpu: web-0 needs "
                                                  "1 cores, the most free on any node is 0.5 cores (node-b)")
    assert_one_line_error(run(client, "node", "drain", "node-a", "--wait"), 3, "not enough cpu")
    assert client.called("list_nodes") == []


@pytest.mark.parametrize("command", ["drain", "undrain", "remove"])
def test_node_commands_on_an_unknown_node_say_so(client, command):
    assert_one_line_error(run(client, "node", command, "nope"), 1, "no physical node named 'nope'")


def test_node_undrain_and_remove(client):
    client.nodes = [make_node(vnodes=0, draining=True)]
    assert run(client, "node", "undrain", "node-a").stdout.strip() == "node node-a takes new virtual nodes again"
    assert json.loads(run(client, "-o", "json", "node", "undrain", "node-a").stdout)["draining"] is False
    assert run(client, "node", "remove", "node-a").stdout.strip() == (
        "node node-a removed (subnet 10.0.1.0/24 is free); on its host, soda-agent --teardown "
        "removes its network and routes")
    client.fail["remove_node"] = errors.WrongState("node node-a is READY: drain it first")
    assert_one_line_error(run(client, "node", "remove", "node-a"), 1, "drain it first")


def test_rollout_of_a_service_mid_move():
    service = moving_service(("web-0", "node-a", model.Phase.RUNNING, "", False),
                             ("web-1", "node-b", model.Phase.RUNNING, "", False),
                             ("web-2", "node-c", model.Phase.BOOTING, "", False))
    rollout = Rollout.of(service)
    assert rollout.state == "MOVING" and not rollout.done
    assert rollout.progress() == "web: 2/2 running, 1 moving"


def assert_one_line_error_tail_code(result, code, fragment):
    assert result.exit_code == code, result.output
    assert result.stderr.splitlines()[-1].startswith("error: ")
    assert fragment in result.stderr.splitlines()[-1], result.stderr


# ---- help and entry point -----------------------------------------------------------

def test_help_lists_commands_and_everything_has_help():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for group in ("node", "image", "service"):
        assert group in result.output

    def walk(command, path):
        assert command.help, f"{path} has no help"
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{path} {param.opts} has no help"
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")
    walk(cli, "sodactl")


def test_run_returns_the_exit_code(capsys):
    assert sodactl.run(["--help"]) == 0
    assert sodactl.run(["--no-such-flag"]) == 2
    assert "No such option" in capsys.readouterr().err


def test_the_sodactl_process_ends_with_its_exit_code_and_all_its_output():
    # main() ends the process without the interpreter's teardown: whatever
    # sodactl wrote must still come out, to a pipe (block-buffered) too.
    help_run = subprocess.run([sys.executable, "-m", "soda.cli.sodactl", "--help"],
                              capture_output=True, text=True, timeout=60)
    assert help_run.returncode == 0
    # All of it: the last command listed is the last line.
    assert help_run.stdout.rstrip().splitlines()[-1].split()[0] == "tenant"
    failed = subprocess.run([sys.executable, "-m", "soda.cli.sodactl", "--master", "127.0.0.1:1",
                             "node", "list"], capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and failed.stderr.startswith("error: cannot reach the SODA Master")


def test_sodactl_starts_without_yaml():
    # Its import is ~15 ms of every command: only -f FILE and -o yaml need it.
    r = subprocess.run([sys.executable, "-c", "import sys, soda.cli.sodactl; print(sorted(sys.modules))"],
                       capture_output=True, text=True, timeout=60)
    assert "'yaml'" not in r.stdout


# ---- pure helpers ---------------------------------------------------------------------

def test_format_table_aligns_columns():
    text = output.format_table(("A", "LONGER"), [("wide cell", 1), ("x", None)])
    assert text.splitlines() == ["A           LONGER",
                                 "wide cell   1",
                                 "x           -"]


def test_per_node_values():
    assert specs.per_node_values("0.5") == "0.5"
    assert specs.per_node_values("0.5, 1.0") == ["0.5", "1.0"]


def test_rollout_counts_vnodes_marked_for_removal_as_unfinished():
    spec = web_spec(nodes=1, resources={"cpu": 1})
    service = make_service(web_spec(), phases=[model.Phase.RUNNING, model.Phase.STOPPING])
    leaving = model.Service(spec=spec, image_digest=DIGEST, vnodes=(
        service.vnodes[0], model.VirtualNode(**{**service.vnodes[1].__dict__, "deleting": True})))
    rollout = Rollout.of(leaving)
    assert not rollout.done and rollout.state == "SCALING"
    assert rollout.progress() == "web: 1/1 running, 1 stopping"


@given(st.lists(st.lists(st.text(alphabet="abc-.:/0123456789", max_size=12), min_size=3, max_size=3),
                max_size=6))
def test_format_table_columns_start_at_the_same_offset(rows):
    lines = output.format_table(("NAME", "X", "LAST"), rows).splitlines()
    assert len(lines) == len(rows) + 1
    starts = [lines[0].index("X"), lines[0].index("LAST")]
    for line, row in zip(lines[1:], rows):
        cells = [cell or "-" for cell in row]
        assert line.startswith(cells[0])
        assert line[starts[0]:].startswith(cells[1]) and line[starts[1]:] == cells[2]


def test_lists_are_sorted_the_same_in_every_format(client):
    for name in ("zeta", "alpha", "mid"):
        client.services[name] = make_service(web_spec(name=name))
    assert [s["name"] for s in json.loads(run(client, "-o", "json", "service", "list").stdout)] == \
        ["alpha", "mid", "zeta"]
    assert [line.split()[0] for line in run(client, "service", "list").stdout.splitlines()[1:]] == \
        ["alpha", "mid", "zeta"]


def test_status_line_redraws_on_a_terminal_and_logs_milestones_elsewhere():
    terminal, log = io.StringIO(), io.StringIO()
    for stream, interactive in ((terminal, True), (log, False)):
        with StatusLine(stream, interactive=interactive) as status:
            bar = ByteProgress(status, "uploading")
            bar(50, 100)
            status.finish("uploaded")
            status.update("web: 0/1 running", milestone=True)
            status.update("web: 1/1 running", milestone=True)
    assert terminal.getvalue().count("\r") == 4 and terminal.getvalue().endswith("web: 1/1 running\n")
    assert log.getvalue() == "uploaded\nweb: 0/1 running\nweb: 1/1 running\n"


def test_create_with_mode_and_health_flags(client):
    result = run(client, "service", "create", "web", "--image", "busybox-httpd",
                 "--mode", "l4", "--health", "/healthz")
    assert result.exit_code == 0, result.output
    [(spec,), _] = client.called("create_service")[0]
    assert spec.switch.mode == "l4"
    assert spec.switch.health == model.HealthCheck(kind="http", path="/healthz")
    result = run(client, "service", "create", "web2", "--image", "busybox-httpd", "--health", "none")
    assert result.exit_code == 0, result.output
    assert client.called("create_service")[1][0][0].switch.health.kind == "none"


def test_bad_health_flag_is_one_line_exit_1(client):
    result = run(client, "service", "create", "web", "--image", "busybox-httpd",
                 "--health", "healthz")
    assert_one_line_error(result, 1, "--health 'healthz'", "/healthz")
    assert client.calls == []


def test_service_logs_prints_the_relayed_lines_and_passes_the_flags(client):
    result = run(client, "service", "logs", "web", "web-1", "--tail", "20", "-f")
    assert result.exit_code == 0, result.output
    assert result.stdout == "line one\nline two\n"
    assert client.called("service_logs") == [(("web", "web-1", True, 20), {})]
    run(client, "service", "logs", "web")
    assert client.called("service_logs")[-1] == (("web", "", False, 100), {})


def test_service_logs_refuses_a_negative_tail_and_reports_errors_on_one_line(client):
    result = run(client, "service", "logs", "web", "--tail", "-5")
    assert result.exit_code == 2 and "--tail" in result.output
    client.fail["service_logs"] = errors.Unavailable("the Agent of node n1 is not connected to this Master")
    assert_one_line_error(run(client, "service", "logs", "web"), 1, "Agent of node n1 is not connected")
