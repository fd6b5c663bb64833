"""A service booted from a layered image: the application image is the
reference image plus a page written into its filesystem, pushed with
--base, so the Master stores and the Agent pulls only that layer; the Agent
composes the image once and a real UML guest serves the new page through
the Switch. Checked outside the code: the page over HTTP, the sha256 of
the Agent's composed file, the sizes sodactl reports."""

import hashlib
import os

import pytest

from tests.support import free_port
from tests.system.cluster import wait_until
from tests.system.guests import app_image, fetch, guest_records, require_guest_support

pytestmark = [pytest.mark.root, pytest.mark.guest]

require_guest_support()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def test_a_guest_boots_from_a_layer_the_agent_composed(uml_node, rootfs, tmp_path):
    c = uml_node
    page = f"served from the app layer {os.urandom(4).hex()}\n".encode()
    app = app_image(rootfs, str(tmp_path / "app.img"), {"/www/app.txt": page,
                                                        "/www/blob": os.urandom(512 * 1024)})
    pushed = c.json("image", "push", app, "--name", "app", "--base", "busybox-httpd")
    base = c.json("image", "inspect", "busybox-httpd")
    assert pushed["parent"] == base["digest"] and pushed["digest"] == _sha256(app)
    # The layer: the two files' blocks and the filesystem's metadata they touched.
    assert pushed["stored_size"] < 0.05 * pushed["size"], pushed
    assert c.json("image", "inspect", "busybox-httpd")["images"] == [pushed["digest"]]

    port = free_port()
    c.ctl("service", "create", "app", "--image", "app", "--hypervisor", "uml", "--nodes", "2",
          "--cpu", "0.5", "--memory", "64", "--switch", f"127.0.0.1:{port}", "--wait", "--timeout", "120",
          timeout=180)
    c.guest_pids.update(r["pid"] for r in guest_records(c, "node-a").values())
    url = f"http://127.0.0.1:{port}/app.txt"
    wait_until(lambda: _answers(url) == page.decode(), 30, what="the guests to serve the app's page")

    # The Agent holds the base whole and the app composed from its layer, once.
    cache = os.path.join(c.agent_dir("node-a"), "images")
    composed = os.path.join(cache, pushed["digest"].replace(":", "-"))
    assert _sha256(composed) == pushed["digest"]
    assert _sha256(os.path.join(cache, base["digest"].replace(":", "-"))) == base["digest"]
    log = c.log("node-a")
    assert log.count(f"image {pushed['digest']} cached: a layer of {pushed['stored_size']} bytes") == 1, log
    assert c.json("image", "inspect", "app")["services"] == ["app"]

    c.ctl("service", "delete", "app", "--wait", "--timeout", "60", timeout=90)
    c.ctl("image", "delete", "app")
    assert c.json("image", "inspect", "busybox-httpd")["images"] == []


def _answers(url: str) -> str:
    try:
        return fetch(url)
    except OSError:
        return ""


CACHE_BOUND = 6 << 20     # the base (~2.2 MiB on disk) and two apps (~2.7 each) do not all fit


@pytest.fixture
def bounded_node(cluster, rootfs):
    from tests.system.guests import uml_node
    with uml_node(cluster, rootfs, agent_config=f"image_cache_bytes: {CACHE_BOUND}") as c:
        yield c


def test_a_bounded_cache_evicts_what_no_guest_boots_and_pulls_it_again(bounded_node, rootfs, tmp_path):
    c = bounded_node
    apps = {}
    for name in ("a", "b"):
        page = f"app {name}\n".encode()
        path = app_image(rootfs, str(tmp_path / f"{name}.img"), {"/www/app.txt": page,
                                                                 "/www/blob": os.urandom(512 * 1024)})
        apps[name] = c.json("image", "push", path, "--name", f"app-{name}", "--base", "busybox-httpd")["digest"]
    base = c.json("image", "inspect", "busybox-httpd")["digest"]
    cache = os.path.join(c.agent_dir("node-a"), "images")

    def held() -> set[str]:
        names = {f.replace("-", ":", 1) for f in os.listdir(cache) if f.startswith("sha256-")}
        return {k for k, d in {"base": base, **apps}.items() if d in names}

    def serve(service: str, image: str, page: str) -> None:
        port = free_port()
        c.ctl("service", "create", service, "--image", image, "--hypervisor", "uml", "--nodes", "1",
              "--cpu", "0.5", "--memory", "64", "--disk", "16", "--switch", f"127.0.0.1:{port}",
              "--wait", "--timeout", "120", timeout=180)
        c.guest_pids.update(r["pid"] for r in guest_records(c, "node-a").values())
        url = f"http://127.0.0.1:{port}/app.txt" if page else f"http://127.0.0.1:{port}/"
        wait_until(lambda: page in _answers(url) if page else _answers(url) != "", 30,
                   what=f"service {service} to serve")

    serve("sa", "app-a", "app a")
    assert held() == {"base", "a"}                  # the base pulled as app a's parent
    serve("sb", "app-b", "app b")
    # Over the bound: the base goes (no guest boots it), both apps stay.
    assert held() == {"a", "b"}
    assert _answers(f"http://127.0.0.1:{_port_of(c, 'sa')}/app.txt") == "app a\n"
    c.ctl("service", "delete", "sa", "--wait", "--timeout", "60", timeout=90)
    serve("sc", "busybox-httpd", "")
    # The base is pulled again; app a, no longer booted, makes room for it.
    assert held() == {"base", "b"}
    log = c.log("node-a")
    assert log.count(f"pulling image {base}") == 2, log
    node = {}
    wait_until(lambda: node.update(c.json("node", "get", "node-a")) or
               (node["image_cache"] or {}).get("bytes", 0) > 0, 20, what="a heartbeat with the cache's use")
    assert node["image_cache"]["limit"] == CACHE_BOUND
    assert 0 < node["image_cache"]["bytes"] <= CACHE_BOUND
    assert "Image cache:" in c.ctl("node", "get", "node-a").stdout


def _port_of(c, service: str) -> int:
    return int(c.json("service", "get", service)["switch"]["listen"].rsplit(":", 1)[1])
