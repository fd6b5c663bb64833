"""An ASP's own image, end to end with real guests: a stock Debian bookworm
image (scripts/build-rootfs --debian: Debian's packages only, systemd and
nginx with its default site, whose listen line includes [::]:80, and no
SODA file) boots and serves through the Switch on UML and on QEMU; a guest
whose service never opens its port is FAILED within its boot_timeout with
a reason that names the port and quotes its console, which `service logs`
shows; and the README's recipe for packaging a service, followed as
written with another server (lighttpd), gives an image that serves.

Results are read outside the code under test: HTTP through the Switch,
sodactl's exit status and output, the console as the Agent keeps it."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.support import free_port
from tests.system.cluster import wait_until
from tests.system.guests import TOP, app_image, fetch, require_guest_support, uml_node

# The first test builds the Debian image (mmdebstrap, about a minute; cached after).
pytestmark = [pytest.mark.root, pytest.mark.guest, pytest.mark.timeout(900)]

require_guest_support()
if not shutil.which("mmdebstrap") and os.geteuid() != 0:
    pytest.skip("building a Debian image needs mmdebstrap (or root to install it)", allow_module_level=True)

NGINX_PAGE = "Welcome to nginx!"


@pytest.fixture(scope="module")
def debian_image(tmp_path_factory):
    out = tmp_path_factory.mktemp("debian") / "debian.img"
    done = subprocess.run([os.path.join(TOP, "scripts", "build-rootfs"), "--debian", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture
def node(cluster, rootfs, debian_image):
    hypervisors = "qemu" if shutil.which("qemu-system-x86_64") and glob.glob("/boot/vmlinuz-*") else ""
    with uml_node(cluster, rootfs, hypervisors=hypervisors) as c:
        c.ctl("image", "push", debian_image, "--name", "debian-nginx", timeout=300)
        c.has_qemu = bool(hypervisors)
        yield c


def _serves(url: str, text: str) -> bool:
    try:
        return text in fetch(url, timeout=2)
    except OSError:
        return False


def test_an_app_layered_on_the_debian_image_pulls_only_its_layer_and_serves(node, debian_image, tmp_path):
    """An application shipped as a layer: the application is the Debian image with
    a new front page and 3 MiB of application files, pushed over it; the
    node pulls the base once (what a node that runs the base already has)
    and, for the app, its layer alone; the app's guest serves the page."""
    page = f"<html>the app {os.urandom(4).hex()}</html>\n"
    app = app_image(debian_image, str(tmp_path / "app.img"), {
        "/var/www/html/index.nginx-debian.html": page.encode(), "/opt/app.bin": os.urandom(3 << 20)})
    pushed = node.json("image", "push", app, "--name", "debian-app", "--base", "debian-nginx")
    assert pushed["layer"] and pushed["stored_size"] <= 0.05 * pushed["size"], pushed
    port = free_port()
    node.ctl("service", "create", "app", "--image", "debian-app", "--hypervisor", "uml", "--memory", "64",
             "--disk", "400", "--switch", f"127.0.0.1:{port}", "--wait", "--timeout", "120", timeout=180)
    wait_until(lambda: _serves(f"http://127.0.0.1:{port}/", page.strip()), 30,
               what="the app's page through the Switch")
    log = node.log("node-a")
    base = node.json("image", "inspect", "debian-nginx")["digest"]
    assert log.count(f"pulling image {base}") == 1 and log.count(f"pulling image {pushed['digest']}") == 1
    assert f"image {pushed['digest']} cached: a layer of {pushed['stored_size']} bytes" in log, log[-3000:]


def test_a_stock_debian_image_serves_through_the_switch_on_uml(node):
    port = free_port()
    began = time.monotonic()
    node.ctl("service", "create", "deb", "--image", "debian-nginx", "--hypervisor", "uml",
             "--memory", "64", "--disk", "400", "--switch", f"127.0.0.1:{port}",
             "--wait", "--timeout", "120", timeout=180)
    took = time.monotonic() - began
    wait_until(lambda: _serves(f"http://127.0.0.1:{port}/", NGINX_PAGE), 30,
               what="nginx's default page through the Switch")
    vnode = node.json("service", "get", "deb")["vnodes"][0]
    assert vnode["phase"] == "RUNNING", vnode
    # The guest's name came from ip= (the image has no /etc/hostname), and
    # its console shows systemd, not SODA's init.
    logs = node.ctl("service", "logs", "deb", "--tail", "-1").stdout
    assert "systemd" in logs and "Welcome to Debian GNU/Linux 12" in logs, logs[-2000:]
    assert "setup_one_line failed" not in logs and "epollctl add err" not in logs
    print(f"debian on uml: create --wait {took:.1f}s, boot {vnode['boot_seconds']:.2f}s")
    node.ctl("service", "delete", "deb", "--wait", "--timeout", "60", timeout=90)


def test_a_stock_debian_image_serves_through_the_switch_on_qemu(node):
    if not node.has_qemu:
        pytest.skip("needs qemu-system-x86 and linux-image-amd64")
    port = free_port()
    node.ctl("service", "create", "debq", "--image", "debian-nginx", "--hypervisor", "qemu",
             "--memory", "256", "--disk", "400", "--switch", f"127.0.0.1:{port}",
             "--wait", "--timeout", "300", timeout=360)
    wait_until(lambda: _serves(f"http://127.0.0.1:{port}/", NGINX_PAGE), 60,
               what="nginx's default page through the Switch")
    node.ctl("service", "delete", "debq", "--wait", "--timeout", "90", timeout=120)


def test_a_guest_that_never_opens_its_port_fails_with_the_reason_and_its_console(node):
    # nginx listens on 80; the service says 8080: it never answers there.
    timeout = 15
    began = time.monotonic()
    done = node.ctl("service", "create", "mute", "--image", "debian-nginx", "--hypervisor", "uml",
                    "--memory", "64", "--disk", "400", "--port", "8080",
                    "--boot-timeout", str(timeout), "--wait", "--timeout", "300",
                    check=False, timeout=120)
    took = time.monotonic() - began
    assert done.returncode != 0, done.stdout
    print(f"create --wait of a guest that never answers: exited {done.returncode} after {took:.1f}s")
    assert took <= timeout + 5 + 5, took        # + the create and placement themselves
    said = done.stderr
    assert "not answering on port 8080 15s after start (boot_timeout)" in said, said
    # The console is quoted (how far the boot got within the 15 s varies
    # with the host's load: nginx's failure, or systemd still starting).
    assert "console: " in said and ("nginx" in said or "systemd" in said), said
    reason = node.json("service", "get", "mute")["vnodes"][0]["reason"]
    assert "not answering on port 8080" in reason and "console: " in reason, reason
    # Its console, kept by the Agent until the retry boots it again.
    logs = node.ctl("service", "logs", "mute", "0", "--tail", "-1").stdout
    assert "systemd" in logs and "nginx" in logs, logs[-2000:]
    node.ctl("service", "delete", "mute", "--wait", "--timeout", "60", timeout=90)


def _readme_recipe() -> str:
    """The shell commands of README.rst's guest-image recipe, as written."""
    with open(os.path.join(TOP, "README.rst")) as f:
        text = f.read()
    block = re.search(r"\.\. recipe: package a service\n\n\.\. code-block:: sh\n\n((?:    .*\n|\n)+)", text)
    assert block, "README.rst has no guest-image recipe"
    return "\n".join(line[4:] for line in block.group(1).splitlines())


def test_the_readmes_recipe_packages_another_server(node, tmp_path):
    script = _readme_recipe().replace("nginx-light", "lighttpd")
    assert "lighttpd" in script
    done = subprocess.run(["bash", "-euxc", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**node.ctl_env(), "SODA_MASTER": node.master_addr,
                                            "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"})
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    port = free_port()
    node.ctl("service", "create", "light", "--image", "myapp", "--hypervisor", "uml",
             "--memory", "64", "--disk", "400", "--switch", f"127.0.0.1:{port}",
             "--wait", "--timeout", "120", timeout=180)
    wait_until(lambda: _serves(f"http://127.0.0.1:{port}/", "lighttpd"), 30,
               what="lighttpd's page through the Switch")
    node.ctl("service", "delete", "light", "--wait", "--timeout", "60", timeout=90)
