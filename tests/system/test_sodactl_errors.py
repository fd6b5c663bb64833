"""Bad input through the real sodactl command against a real Master process:
one clear line on stderr, the documented exit code, never a traceback, and
nothing created."""

import pytest

from tests.support import free_port, make_ext4_image

pytestmark = pytest.mark.cluster


@pytest.fixture
def master(cluster, tmp_path):
    cluster.start_master()
    cluster.ctl("image", "push", make_ext4_image(str(tmp_path / "img")), "--name", "img")
    return cluster


def one_line_error(result, code):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, code, words", [
    (["service", "create", "Bad_Name", "--image", "img"], 1, "invalid service name"),
    (["service", "create", "web", "--image", "img", "--cpu", "0"], 1, "cpu must be between"),
    (["service", "create", "web", "--image", "img", "--cpu", "-1"], 1, "cpu must be between"),
    (["service", "create", "web", "--image", "img", "--memory", "99999999999"], 1, "memory must be between"),
    (["service", "create", "web", "--image", "img", "--nodes", "2", "--cpu", "0.5,1,2"], 1,
     "3 values given for 2 virtual nodes"),
    (["service", "create", "web", "--image", "img", "--cpu", "lots"], 1, "not a number"),
    (["service", "create", "web", "--image", "nothere"], 1, "no image"),
    (["service", "get", "ghost"], 1, "no service named"),
    (["service", "delete", "ghost"], 1, "no service named"),
    (["image", "delete", "ghost"], 1, "no image"),
])
def test_bad_flags(master, args, code, words):
    line = one_line_error(master.ctl(*args, check=False), code)
    assert words in line
    assert master.json("service", "list") == []


def test_duplicate_name(master):
    master.ctl("service", "create", "web", "--image", "img", "--nodes", "0")
    line = one_line_error(master.ctl("service", "create", "web", "--image", "img", check=False), 1)
    assert "already exists" in line


@pytest.mark.parametrize("text, words", [
    ("name: web\nimage: [unclosed\n", "YAML"),
    ("- just\n- a list\n", "mapping"),
    ("name: web\nimage: img\nreplicas: 3\n", "unknown spec field"),
    ("name: web\nimage: img\nresources: {cpu: 0.5, gpu: 1}\n", "unknown resource field"),
])
def test_bad_spec_files(master, tmp_path, text, words):
    path = tmp_path / "service.yaml"
    path.write_text(text)
    line = one_line_error(master.ctl("service", "create", "-f", str(path), check=False), 1)
    assert words in line
    assert master.json("service", "list") == []


def test_missing_spec_file(master, tmp_path):
    line = one_line_error(master.ctl("service", "create", "-f", str(tmp_path / "nope.yaml"), check=False), 1)
    assert "nope.yaml" in line


def test_usage_error_exits_2(master):
    result = master.ctl("service", "create", "web", "--nodes", "two", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_dead_master(cluster):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "soda.cli.sodactl", "--master", f"127.0.0.1:{free_port()}",
                             "service", "list"], capture_output=True, text=True, timeout=60)
    line = one_line_error(result, 1)
    assert "cannot reach the SODA Master" in line
