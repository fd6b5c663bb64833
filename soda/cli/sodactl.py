"""sodactl: the operator CLI for SODA.

Owns the command line: options and help, calling the Master through a
MasterClient, printing (data to stdout, progress and errors to stderr) and
exit codes: 0 success, 1 error, 2 usage error, 3 no room on the platform,
130 interrupted. Every error reaches the user as one line `error: ...`,
never a traceback.

It must not hold rules about what a valid spec is (soda.model does, and the
Master applies the same ones) and must not touch grpc (soda.rpc does).
Tests inject a stand-in client with
`CliRunner().invoke(cli, args, obj=Session(connect=lambda master: fake))`.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, NoReturn, Sequence

import click

from soda import errors, model
from soda.cli import output, specs
from soda.cli.progress import ByteProgress, StatusLine
from soda.cli.wait import (DEFAULT_TIMEOUT, wait_until_deleted, wait_until_drained, wait_until_moved,
                            wait_until_running)
from soda.config import TlsConfig
from soda.model import identity
from soda.rpc.client import DEFAULT_MASTER, MasterClient, sha256_file
from soda.rpc.tls import ENV as TLS_ENV

if TYPE_CHECKING:
    from soda import pki

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2            # click's own exit code for usage errors
EXIT_NO_CAPACITY = 3
EXIT_INTERRUPTED = 130    # what a shell reports for a command ended by SIGINT

# flag -> (metavar, what one value means)
RESOURCE_FLAGS = {
    "cpu": ("CORES", "CPU cores (also the share of traffic)"),
    "memory": ("MiB", "Memory in MiB"),
    "bandwidth": ("MBIT", "Network bandwidth in Mbit/s, each way"),
    "disk": ("MiB", "Disk the guest sees in MiB, at least the image's size"),
}


class CliError(click.ClickException):
    """An error shown as one line `error: <message>`."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str):
        # Messages from the Master may span lines; the contract is one line.
        super().__init__("; ".join(line.strip() for line in message.splitlines() if line.strip()))

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", file=file, err=file is None)


class NoRoomError(CliError):
    """The platform has no capacity for the request."""

    exit_code = EXIT_NO_CAPACITY


@dataclass
class Session:
    """What every command shares: where the Master is, how to reach it and
    how to print. The client is made on first use, so `--help` and usage
    errors never open a channel."""

    master: str = DEFAULT_MASTER
    output_format: str = "table"
    connect: Callable[..., MasterClient] = MasterClient
    tls: TlsConfig = field(default_factory=TlsConfig)
    _client: MasterClient | None = field(default=None, init=False, repr=False)

    @property
    def client(self) -> MasterClient:
        if self._client is None:
            self._client = (self.connect(self.master, tls=self.tls) if self.tls.enabled
                            else self.connect(self.master))
        return self._client

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

    def emit(self, data: Any, table: Callable[[], str]) -> None:
        """Print `data` in the chosen format; `table` draws it for people."""
        click.echo(output.render(data, self.output_format, table))

    def emit_list(self, items: Iterable[Any], to_dict: Callable[[Any], dict],
                  table: Callable[[list], str]) -> None:
        """A listing, in the order every list is shown in (tables and json/yaml alike)."""
        ordered = sorted(items, key=output.listing_order)
        self.emit([to_dict(i) for i in ordered], lambda: table(ordered))


class SodactlGroup(click.Group):
    """The top-level group: turns whatever a command raises into the
    one-line message and exit code of sodactl's contract."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except errors.NoCapacity as exc:
            raise NoRoomError(str(exc) or "the platform has no room for this request") from None
        except errors.SodaError as exc:
            raise CliError(str(exc) or type(exc).__name__) from None
        except OSError as exc:
            if exc.errno == errno.EPIPE:       # stdout closed early (| head): click exits quietly
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            raise CliError(f"{where}{exc.strerror or exc}") from None
        except Exception as exc:  # noqa: BLE001 - the contract is "never a traceback"
            raise CliError(f"internal: {type(exc).__name__}: {exc}") from None


# ---- shared options ------------------------------------------------------

def _remember_output(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.find_object(Session).output_format = value


def output_option(command: Callable) -> Callable:
    """`-o` on the command too, so `sodactl service get web -o json` works."""
    return click.option("-o", "--output", type=click.Choice(output.OUTPUT_FORMATS), default=None,
                        expose_value=False, callback=_remember_output,
                        help="Output format (overrides the global -o).")(command)


def resource_options(command: Callable) -> Callable:
    for key, (unit, what) in reversed(RESOURCE_FLAGS.items()):
        command = click.option(
            f"--{key}", metavar=f"{unit}[,{unit}...]",
            help=f"{what} per virtual node; a comma list gives one value per node.")(command)
    return command


def wait_options(until: str) -> Callable[[Callable], Callable]:
    def decorate(command: Callable) -> Callable:
        command = click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
                               default=DEFAULT_TIMEOUT, show_default=True, metavar="SECONDS",
                               help="How long --wait waits before it gives up (exit 1).")(command)
        return click.option("--wait", is_flag=True,
                            help=f"Wait until {until}, showing progress on stderr.")(command)
    return decorate


def resource_values(**flags: str | None) -> dict[str, specs.PerNodeValue]:
    """The resource flags that were given, comma lists split per node."""
    return {key: specs.per_node_values(text) for key, text in flags.items() if text is not None}


# ---- commands ------------------------------------------------------------

@click.group(cls=SodactlGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                  "max_content_width": 100})
@click.option("--master", envvar="SODA_MASTER", default=DEFAULT_MASTER, show_default=True,
              metavar="HOST:PORT", help="Address of the SODA Master (env SODA_MASTER).")
@click.option("--ca", envvar=TLS_ENV["ca"], metavar="FILE",
              help=f"The cluster CA's certificate (env {TLS_ENV['ca']}).")
@click.option("--cert", envvar=TLS_ENV["cert"], metavar="FILE",
              help=f"Your certificate, from sodactl pki issue (env {TLS_ENV['cert']}).")
@click.option("--key", envvar=TLS_ENV["key"], metavar="FILE",
              help=f"Your certificate's key (env {TLS_ENV['key']}).")
@click.option("-o", "--output", "output_format", type=click.Choice(output.OUTPUT_FORMATS), default="table",
              show_default=True, help="Output format: a table for people, json or yaml for scripts.")
@click.version_option(package_name="soda", prog_name="sodactl")
@click.pass_context
def cli(ctx: click.Context, master: str, ca: str | None, cert: str | None, key: str | None,
        output_format: str) -> None:
    """Operate a SODA platform: physical nodes, images and services.

    The Master takes mutual TLS: give the CA, your certificate and its key
    (--ca/--cert/--key or SODA_CA/SODA_CERT/SODA_KEY); an operator's
    certificate may do everything, a tenant's only with its own services
    and images. Without them sodactl speaks plaintext, which only a Master
    started with --insecure on loopback takes.

    Data goes to stdout, progress and errors to stderr. Exit status: 0 ok,
    1 error, 2 usage error, 3 no room on the platform or over a quota."""
    session = ctx.ensure_object(Session)
    session.master = master
    session.tls = TlsConfig(ca=ca or "", cert=cert or "", key=key or "")
    session.output_format = output_format
    ctx.call_on_close(session.close)


@cli.group()
def node() -> None:
    """Physical nodes that run virtual nodes."""


@node.command("list")
@output_option
@click.pass_obj
def node_list(session: Session) -> None:
    """List physical nodes: capacity in use, virtual nodes, hypervisors.

    STATE is READY or LOST; a node being drained adds DRAINING while it
    still holds virtual nodes and DRAINED once it holds none (READY,DRAINED)."""
    session.emit_list(session.client.list_nodes(), output.node_to_dict, output.nodes_table)


@node.command("get")
@click.argument("name")
@output_option
@click.pass_obj
def node_get(session: Session, name: str) -> None:
    """One physical node: address, state, capacity in use, image cache."""
    found = [n for n in session.client.list_nodes() if n.name == name]
    if not found:
        raise errors.NotFound(f"no physical node named {name!r} (sodactl node list shows them)")
    session.emit(output.node_detail_to_dict(found[0]), lambda: output.node_detail(found[0]))


@node.command("drain")
@click.argument("name")
@wait_options("the node holds no virtual node")
@output_option
@click.pass_obj
def node_drain(session: Session, name: str, wait: bool, timeout: float) -> None:
    """Move every virtual node off node NAME.

    Nothing new is placed there, and its virtual nodes move one at a time: each gets a replacement on
    another node, and leaves (through the Switch's drain) once that one
    runs and, where a Switch serves the service, is healthy there.
    Refused (exit 3, naming the resource) when the other nodes have no
    room for them all. Draining a draining node again changes nothing.
    A --wait that times out while a virtual node still waits for room
    elsewhere exits 3 too.

    \b
    sodactl node drain node-a --wait
    sodactl node remove node-a      # once drained, with its Agent stopped"""
    drained = session.client.drain_node(name)
    if wait:
        with StatusLine() as status:
            drained = wait_until_drained(session.client, name, status, timeout)
    session.emit(output.node_to_dict(drained),
                 lambda: f"node {name} drained: it holds no virtual node" if not drained.vnodes
                 else f"node {name} draining: {drained.vnodes} virtual node(s) to move "
                      f"(sodactl node list shows its state)")


@node.command("undrain")
@click.argument("name")
@output_option
@click.pass_obj
def node_undrain(session: Session, name: str) -> None:
    """Place virtual nodes on node NAME again.

    Moves already done stay done; a move still under way is given up."""
    undrained = session.client.undrain_node(name)
    session.emit(output.node_to_dict(undrained), lambda: f"node {name} takes new virtual nodes again")


@node.command("remove")
@click.argument("name")
@output_option
@click.pass_obj
def node_remove(session: Session, name: str) -> None:
    """Forget node NAME, which holds nothing.

    Its subnet is free again. Drain it first (or it is LOST and its virtual nodes run elsewhere).
    Stop its Agent before: a running Agent registers its node again."""
    removed = session.client.remove_node(name)
    session.emit(output.node_to_dict(removed),
                 lambda: f"node {name} removed (subnet {removed.subnet or '-'} is free); on its "
                         f"host, soda-agent --teardown removes its network and routes")


@cli.group()
def image() -> None:
    """Root filesystem images that virtual nodes boot from."""


@image.command("push")
@click.argument("file", type=click.Path(), required=False)
@click.option("--name", metavar="NAME", help="Name for the image; its sha256 digest always works too.")
@click.option("--init", metavar="PATH",
              help="Init the guest starts instead of /sbin/init (a path inside the image).")
@click.option("--public", is_flag=True, help="Every tenant may use it (operators only).")
@click.option("--base", metavar="IMAGE",
              help="An image on the Master that FILE was made from: only the blocks that differ "
                   "from it are sent and stored (a layer over it).")
@click.option("--no-compress", "no_compress", is_flag=True,
              help="Send raw bytes even when the Master takes zstd.")
@click.option("--url", metavar="URL",
              help="Instead of FILE: the Master fetches the image (a layer with --base) from this "
                   "http(s) URL itself, resuming if cut off.")
@click.option("--sha256", "sha256", metavar="DIGEST",
              help="With --url: the sha256 the content must have (sha256:HEX or HEX); refused otherwise.")
@output_option
@click.pass_obj
def image_push(session: Session, file: str | None, name: str | None, init: str | None, public: bool,
               base: str | None, no_compress: bool, url: str | None, sha256: str | None) -> None:
    """Upload the raw ext4 root filesystem FILE (or have the Master fetch
    it from --url); prints its name and digest.

    A tenant's push is its own image (and counts against its image-bytes
    quota: what is stored, a layer's size with --base); an operator's is the
    operators', seen by tenants with --public. A tenant's --url must be on
    a public address."""
    if name is not None:
        model.check_image_name(name)
    if (file is None) == (url is None):
        raise click.UsageError("give the image FILE or --url URL (one of them)")
    if sha256 and not url:
        raise click.UsageError("--sha256 goes with --url (a FILE's digest is computed here)")
    if url:
        digest = sha256 if not sha256 or sha256.startswith("sha256:") else "sha256:" + sha256
        with StatusLine() as status:
            started = time.monotonic()
            status.update(f"the Master is fetching {url} ...", milestone=True)
            pushed = session.client.fetch_image(url, digest=digest or "", name=name or "", init=init or "",
                                                public=public, base=base or "")
            status.finish(f"fetched {output.format_bytes(pushed.stored_size)} from {url} in "
                          f"{time.monotonic() - started:.1f}s")
        label = name or ",".join(pushed.names) or "-"
        session.emit(output.image_to_dict(pushed), lambda: f"{label} {pushed.digest}")
        return
    size = specs.file_size(file)
    client = session.client
    with StatusLine() as status:
        started = time.monotonic()
        digest = sha256_file(file, progress=ByteProgress(status, "hashing  "))
        status.finish(f"hashed {file}: {output.format_bytes(size)} in {time.monotonic() - started:.1f}s")
        started = time.monotonic()
        upload = ByteProgress(status, "uploading")
        pushed = client.push_image(file, name=name or "", init=init or "", progress=upload, digest=digest,
                                   public=public, base=base or "", compress=not no_compress)
        elapsed = time.monotonic() - started
        sent = upload.wire if upload.wire is not None else pushed.stored_size
        what = (f"a layer of {output.format_bytes(pushed.layer_size)} over {base}" if pushed.layer
                else output.format_bytes(size))
        rate = f", {output.format_bytes(int(sent / elapsed))}/s on the wire" if elapsed > 0 else ""
        status.finish(f"uploaded {what} as {output.format_bytes(sent)} in {elapsed:.1f}s{rate}")
    label = name or ",".join(pushed.names) or "-"
    session.emit(output.image_to_dict(pushed), lambda: f"{label} {pushed.digest}")


@image.command("list")
@output_option
@click.pass_obj
def image_list(session: Session) -> None:
    """List images: names, size, what is stored (a layer's size), parent."""
    session.emit_list(session.client.list_images(), output.image_to_dict, output.images_table)


@image.command("inspect")
@click.argument("ref", metavar="NAME|DIGEST")
@output_option
@click.pass_obj
def image_inspect(session: Session, ref: str) -> None:
    """One image: its layers down to a whole image, their sizes on the wire
    and whole, and the images and services that use it."""
    image, children, services, nodes = session.client.inspect_image(ref)
    chain = [image]
    while chain[-1].parent:
        chain.append(session.client.get_image(chain[-1].parent))
    session.emit(output.image_detail_to_dict(image, chain, children, services, nodes),
                 lambda: output.image_detail(image, chain, children, services, nodes))


@image.command("prime")
@click.argument("ref", metavar="NAME|DIGEST")
@click.option("--nodes", metavar="NODE,...", default="",
              help="The nodes to pull it into (default: every READY node).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until every node asked holds it, showing how many do.")
@click.option("--timeout", type=float, default=DEFAULT_TIMEOUT, show_default=True, metavar="SECONDS",
              help="How long --wait waits.")
@output_option
@click.pass_obj
def image_prime(session: Session, ref: str, nodes: str, wait: bool, timeout: float) -> None:
    """Pull an image into nodes' image caches ahead of need (operators
    only): a service created there later boots without pulling it. Each
    node pulls with its next heartbeat; a node's cache bound may evict a
    primed image no virtual node uses."""
    client = session.client
    asked = client.prime_image(ref, [n for n in nodes.split(",") if n])
    holding: list[str] = []
    if wait and asked:
        deadline = time.monotonic() + timeout
        with StatusLine() as status:
            while True:
                holding = sorted(set(client.inspect_image(ref)[3]) & set(asked))
                status.update(f"primed on {len(holding)}/{len(asked)} node(s): {', '.join(holding) or '-'}",
                              milestone=True)
                if len(holding) == len(asked):
                    status.finish(f"image {ref} is in the cache of {len(asked)} node(s)")
                    break
                if time.monotonic() >= deadline:
                    missing = sorted(set(asked) - set(holding))
                    raise errors.Unavailable(f"image {ref} is not yet in the cache of {', '.join(missing)} "
                                             f"after {timeout:g} s (sodactl image inspect {ref} shows where "
                                             f"it is; the Agents' logs say why)")
                time.sleep(0.5)
    session.emit({"image": ref, "nodes": asked, "holding": holding},
                 lambda: f"image {ref}: asked {', '.join(asked) or 'no node'}"
                         + (f"; held by {', '.join(holding)}" if wait else ""))


@image.command("delete")
@click.argument("ref", metavar="NAME|DIGEST")
@output_option
@click.pass_obj
def image_delete(session: Session, ref: str) -> None:
    """Delete an image no service uses and no image is layered on."""
    deleted = session.client.delete_image(ref)
    session.emit(output.image_to_dict(deleted), lambda: f"image {deleted.digest} deleted")


@cli.group()
def service() -> None:
    """Services: an image run as virtual nodes behind a Switch.

    The Service Switch spreads each service's clients over its virtual
    nodes in proportion to their resources."""


@service.command("create")
@click.argument("name", required=False)
@click.option("-f", "--file", "spec_file", metavar="FILE",
              help="Read the spec from a YAML file ('-' for stdin). Flags given too override "
                   "its fields, and NAME its name.")
@click.option("--image", metavar="NAME|DIGEST", help="Image to boot (required without -f).")
@click.option("--nodes", type=int, metavar="N", help="Number of virtual nodes (default 1).")
@resource_options
@click.option("--port", type=int, metavar="PORT", help=f"Port the guests serve on (default {model.DEFAULT_PORT}).")
@click.option("--hypervisor", metavar="NAME",
              help="Hypervisor to boot the guests with: uml, qemu, or another driver the nodes "
                   "offer (sodactl node list); default: whatever a node offers first.")
@click.option("--switch", "listen", metavar="HOST:PORT",
              help="Address where the Service Switch listens for this service's clients.")
@click.option("--policy", type=click.Choice(model.POLICIES),
              help=f"How the Switch spreads connections (default {model.DEFAULT_POLICY}).")
@click.option("--mode", type=click.Choice(model.SWITCH_MODES),
              help="How the Switch forwards: its userspace proxy (default), or l4, the kernel "
                   "path (nftables DNAT).")
@click.option("--health", metavar="tcp|none|/PATH",
              help="The Switch's health check of each virtual node: a TCP connect (default), "
                   "none, or an HTTP GET of /PATH that must answer 200.")
@click.option("--cpu-cap/--no-cpu-cap", "cpu_cap", default=None,
              help="Also cap each virtual node's CPU at its cores (a hard limit); by default "
                   "CPU is a proportional share that may use idle cycles.")
@click.option("--on-demand", "on_demand", type=int, metavar="MAX_NODES",
              help="Deploy on first request: start with no virtual node (unless --nodes), let the "
                   "Switch ask for one when a client connects, up to MAX_NODES.")
@click.option("--idle-seconds", type=float, metavar="S",
              help="With --on-demand: back to zero virtual nodes (or to the warm pool) after S "
                   "seconds without a connection (default 300).")
@click.option("--warm", type=int, metavar="N",
              help="With --on-demand: keep N virtual nodes booted and frozen while idle; a first "
                   "client thaws one (milliseconds) instead of booting one (default 0). They "
                   "hold their memory on their node, not their CPU.")
@click.option("--idle", "idle_policy", type=click.Choice(model.IDLE_POLICIES),
              help="With --on-demand: what the guests that served become when the service is "
                   "idle: frozen into the warm pool (freeze, the default), or stopped, the pool "
                   "booted afresh (stop).")
@click.option("--peers/--no-peers", "peers", default=None,
              help="Whether the service's virtual nodes may reach each other (default: they may). "
                   "Other services' guests and the hosts are closed to them either way.")
@click.option("--egress", "egress", multiple=True, metavar="CIDR:PORT",
              help="Let the guests open connections to CIDR on PORT (or LOW-HIGH), TCP and UDP; "
                   "repeat for more. By default they reach nothing beyond their own service.")
@click.option("--boot-timeout", "boot_timeout", type=float, metavar="S",
              help="Seconds a guest may take from its start to answering on its port before it "
                   "is FAILED (with its console's last lines as the reason) and retried; "
                   "default: its hypervisor's, sized to the kernel it boots.")
@wait_options("every virtual node is running")
@output_option
@click.pass_obj
def service_create(session: Session, name: str | None, spec_file: str | None, image: str | None,
                   nodes: int | None, cpu: str | None, memory: str | None, bandwidth: str | None,
                   disk: str | None, port: int | None, hypervisor: str | None, listen: str | None,
                   policy: str | None, mode: str | None, health: str | None,
                   cpu_cap: bool | None, on_demand: int | None,
                   idle_seconds: float | None, warm: int | None, idle_policy: str | None,
                   peers: bool | None, egress: tuple[str, ...],
                   boot_timeout: float | None, wait: bool, timeout: float) -> None:
    """Create service NAME from flags, or from a YAML spec with -f.

    \b
    sodactl service create web --image busybox-httpd --nodes 2 --cpu 0.5,1.0
    sodactl service create -f web.yaml --nodes 3 --wait
    sodactl service create api --image busybox-httpd --on-demand 1 --idle-seconds 60 \\
        --switch 127.0.0.1:8081
    sodactl service create api --image busybox-httpd --on-demand 2 --warm 1 \\
        --switch 127.0.0.1:8082"""
    if spec_file is None:
        if not name:
            raise click.UsageError("give the service NAME, or a spec file with -f FILE")
        if not image:
            raise click.UsageError("--image is required unless the spec comes from -f FILE")
        data: dict = {}
    else:
        data = specs.load_spec_file(spec_file, sys.stdin)
    data = specs.apply_overrides(
        data, name=name, image=image, nodes=nodes, port=port, hypervisor=hypervisor,
        listen=listen, policy=policy, mode=mode, health=specs.health_flag(health),
        cpu_cap=cpu_cap, on_demand=on_demand, idle_seconds=idle_seconds, warm=warm,
        idle_policy=idle_policy, peers=peers, egress=egress,
        boot_timeout=boot_timeout, resources=resource_values(cpu=cpu, memory=memory, bandwidth=bandwidth, disk=disk))
    try:
        spec = model.parse_spec(data)
    except errors.InvalidSpec as exc:
        if spec_file is None:
            raise
        raise errors.InvalidSpec(f"{'<stdin>' if spec_file == specs.STDIN_PATH else spec_file}: "
                                 f"{exc}") from None
    created = session.client.create_service(spec)
    if wait:
        with StatusLine() as status:
            created = wait_until_running(session.client, spec.name, status, timeout)
    session.emit(output.service_to_dict(created), lambda: output.service_table(created))


@service.command("get")
@click.argument("name")
@output_option
@click.pass_obj
def service_get(session: Session, name: str) -> None:
    """Show a service and each of its virtual nodes."""
    found = session.client.get_service(name)
    session.emit(output.service_to_dict(found), lambda: output.service_table(found))


@service.command("logs")
@click.argument("name")
@click.argument("vnode", required=False, default="")
@click.option("-f", "--follow", is_flag=True, help="Keep printing what the guest writes (Ctrl-C ends).")
@click.option("--tail", type=int, default=100, show_default=True, metavar="N",
              help="Start with the last N lines; -1 for all the node keeps.")
@click.pass_obj
def service_logs(session: Session, name: str, vnode: str, follow: bool, tail: int) -> None:
    """Print a virtual node's console: the guest's kernel and init output,
    relayed by the Master from the node that runs it. VNODE is its name or
    index (default: the first). For a guest that failed and is waiting to
    be retried, the console of the boot that failed.

    \b
    sodactl service logs web
    sodactl service logs web web-1 --tail 20 --follow"""
    if tail < -1:
        raise click.BadParameter("give a number of lines, or -1 for all", param_hint="--tail")
    out = sys.stdout.buffer
    for _, data in session.client.service_logs(name, vnode, follow, tail if tail else 100):
        out.write(data)
        out.flush()


@service.command("list")
@output_option
@click.pass_obj
def service_list(session: Session) -> None:
    """List services with how many of their virtual nodes run."""
    session.emit_list(session.client.list_services(), output.service_to_dict,
                      output.services_table)


@service.command("delete")
@click.argument("name")
@wait_options("the service and all its virtual nodes are gone")
@output_option
@click.pass_obj
def service_delete(session: Session, name: str, wait: bool, timeout: float) -> None:
    """Delete a service: its virtual nodes stop, then it is removed."""
    deleting = session.client.delete_service(name)
    if wait:
        with StatusLine() as status:
            wait_until_deleted(session.client, name, status, timeout)
    session.emit(output.service_to_dict(deleting),
                 lambda: f"service {name} {'deleted' if wait else 'deleting'}")


@service.command("resize")
@click.argument("name")
@click.option("--nodes", type=int, metavar="N", help="New number of virtual nodes.")
@resource_options
@wait_options("the service runs as resized")
@output_option
@click.pass_obj
def service_resize(session: Session, name: str, nodes: int | None, cpu: str | None,
                   memory: str | None, bandwidth: str | None, disk: str | None,
                   wait: bool, timeout: float) -> None:
    """Change the number of virtual nodes or their resources.

    Resource flags left out keep each node's current value.

    \b
    sodactl service resize web --nodes 4
    sodactl service resize web --cpu 1.0,2.0 --wait"""
    overrides = resource_values(cpu=cpu, memory=memory, bandwidth=bandwidth, disk=disk)
    if nodes is None and not overrides:
        raise click.UsageError("nothing to change: give --nodes and/or --cpu, --memory, "
                               "--bandwidth, --disk")
    client = session.client
    # The current spec is read so the request is checked by the same rules
    # as a new service before it is sent.
    current = client.get_service(name)
    wanted = specs.resized_spec(current.spec, nodes, overrides)
    resized = client.resize_service(name, nodes=nodes, resources=wanted.resources if overrides else ())
    # Say which guests boot again: the rest of a resize applies live, and a
    # restart should never come as a surprise. A new generation is a new
    # boot; memory that grows on a live-resizing hypervisor is live only up
    # to what the guest booted with, which only its Agent knows.
    before = {v.name: v for v in current.vnodes}
    for v in resized.vnodes:
        old = before.get(v.name)
        if old is None or v.deleting:
            continue
        if v.generation != old.generation:
            click.echo(f"virtual node {v.name} restarts: its new memory or disk needs a new boot",
                       err=True)
        elif v.resources.memory > old.resources.memory:
            click.echo(f"virtual node {v.name}: memory grows live up to what it booted with, and "
                       f"restarts to go past that (see its phase in `sodactl service get`)", err=True)
    if wait:
        with StatusLine() as status:
            resized = wait_until_running(client, name, status, timeout)
    session.emit(output.service_to_dict(resized), lambda: output.service_table(resized))


def _freeze_command(frozen: bool):
    """`service freeze` and `service thaw`: one command, two directions."""
    verb = "freeze" if frozen else "thaw"
    doc = ("Freeze virtual nodes in place: memory and address kept, no CPU, no new "
           "connections (the Switch drains them first). Only where their hypervisor can "
           "(qemu; `node list -o json` shows each driver's freeze); a frozen one stays frozen across "
           "Agent restarts.\n\n\b\nsodactl service freeze web --vnode 1 --wait"
           if frozen else
           "Thaw frozen virtual nodes: they go on where they were paused and take "
           "connections again once their port answers.\n\n\b\nsodactl service thaw web --wait")

    @service.command(verb, help=doc)
    @click.argument("name")
    @click.option("--vnode", "vnodes", multiple=True, metavar="VNODE",
                  help="Only this virtual node (its name or index); repeatable. Default: all of them.")
    @wait_options("the virtual nodes are " + ("FROZEN" if frozen else "RUNNING again"))
    @output_option
    @click.pass_obj
    def command(session: Session, name: str, vnodes: tuple[str, ...], wait: bool, timeout: float) -> None:
        client = session.client
        changed = client.freeze_service(name, vnodes, frozen=frozen)
        if wait:
            with StatusLine() as status:
                changed = wait_until_running(client, name, status, timeout)
        session.emit(output.service_to_dict(changed), lambda: output.service_table(changed))

    return command


service_freeze = _freeze_command(True)
service_thaw = _freeze_command(False)


@service.command("move")
@click.argument("name")
@click.argument("vnode")
@click.option("--to", "to", default="", metavar="NODE",
              help="The physical node to move it to. Default: where placement finds room.")
@click.option("--cold", is_flag=True,
              help="Where its disk cannot be carried (a driver that cannot, a guest that is not "
                   "running): boot its image afresh on the target instead; what it wrote is lost.")
@wait_options("the replacement is RUNNING and the old virtual node gone")
@output_option
@click.pass_obj
def service_move(session: Session, name: str, vnode: str, to: str, cold: bool, wait: bool,
                 timeout: float) -> None:
    """Move a virtual node (its name or index) to another physical node.

    Where the drivers of both nodes can carry a guest's disk (`node list -o
    json`: migration), the Switch drains the guest, it is frozen, its disk
    is sent to the target, and a replacement boots there from it: what it
    wrote survives, its memory does not (no live migration yet). New
    connections wait for the replacement meanwhile when the service has no
    other guest. Without that, the move is refused unless --cold. Either
    way the replacement takes the next index and the old one leaves once
    it is ready.

    \b
    sodactl service move web web-0 --to node-b --wait
    sodactl service move web 2 --cold"""
    client = session.client
    moving = client.move_vnode(name, vnode, to=to, cold=cold)
    old = next((v for v in moving.vnodes if vnode in (v.name, str(v.index))), None)
    new = next((v for v in moving.vnodes if old is not None and v.replaces == old.name), None)
    if old is not None and new is not None:
        how = "carrying its disk" if old.moving_to else "booting its image afresh"
        click.echo(f"moving {old.name} from {old.node} to {new.node} as {new.name}, {how}", err=True)
        if wait:
            with StatusLine() as status:
                moving = wait_until_moved(client, name, old.name, new.name, status, timeout)
    session.emit(output.service_to_dict(moving), lambda: output.service_table(moving))


def run(argv: Sequence[str] | None = None) -> int:
    """sodactl on `argv` (default: the process's arguments); its exit code."""
    try:
        cli.main(args=argv, prog_name="sodactl")
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            return done.code or EXIT_OK
        click.echo(done.code, err=True)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - last resort outside any command
        click.echo(f"error: internal: {type(exc).__name__}: {exc}", err=True)
        return EXIT_ERROR
    return EXIT_OK


# ---- pki: the cluster's certificates (no Master involved) ----------------------

def certificate_authority(directory: str) -> pki.CertificateAuthority:
    # Loaded here, not with sodactl: the cryptography it needs is a third
    # of sodactl's start-up, and only the pki commands use it.
    from soda import pki
    return pki.CertificateAuthority(directory)


def pki_dir_option(command: Callable) -> Callable:
    return click.option("--dir", "directory", envvar="SODA_PKI_DIR", required=True, metavar="DIR",
                        help="The CA directory (env SODA_PKI_DIR); its keys are secrets.")(command)


def issued_to_dict(entry: pki.Issued, directory: str) -> dict:
    return {"serial": f"{entry.serial:x}", "role": entry.role, "name": entry.name,
            "state": entry.state(), "not_after": entry.not_after, "revoked_at": entry.revoked_at or None,
            "key": os.path.join(directory, entry.key), "cert": os.path.join(directory, entry.cert)}


@cli.group()
def tenant() -> None:
    """ASP tenants: their quotas and what they use.

    A tenant is who a certificate soda://tenant/NAME names (sodactl pki
    issue tenant NAME); it sees and changes only its own services and
    images. A request that would take it over a quota is refused (exit 3)."""


@tenant.command("list")
@output_option
@click.pass_obj
def tenant_list(session: Session) -> None:
    """Tenants with what they use against their quota (USED/LIMIT; - = no limit)."""
    session.emit_list(session.client.list_tenants(), output.tenant_to_dict, output.tenants_table)


def _quota_options(command: Callable) -> Callable:
    for name, (unit, what) in reversed(model.QUOTA_FIELDS.items()):
        flag = name.replace("_", "-")
        command = click.option(f"--{flag}", name, metavar=(unit or "COUNT").upper(),
                               type=float if name == "cpu" else click.IntRange(min=0),
                               help=f"Limit of the {what}.")(command)
    return command


@tenant.command("set-quota")
@click.argument("name")
@_quota_options
@click.option("--unlimited", multiple=True, type=click.Choice([n.replace("_", "-") for n in model.QUOTA_FIELDS]),
              help="Lift this limit (repeatable).")
@click.option("--clear", is_flag=True, help="Remove the whole quota: the tenant is not limited.")
@output_option
@click.pass_obj
def tenant_set_quota(session: Session, name: str, unlimited: tuple[str, ...], clear: bool,
                     **limits: float | int | None) -> None:
    """Set limits of tenant NAME; limits not given stay as they were.

    \b
    sodactl tenant set-quota acme --cpu 4 --memory 8192 --vnodes 8 --image-bytes 10000000000
    sodactl tenant set-quota acme --unlimited cpu
    sodactl tenant set-quota acme --clear"""
    model.check_tenant_name(name)
    given = {k: v for k, v in limits.items() if v is not None}
    if clear and (given or unlimited):
        raise click.UsageError("--clear removes the whole quota: give no limits with it")
    if not clear and not given and not unlimited:
        raise click.UsageError("give at least one limit (e.g. --cpu 4), --unlimited FIELD or --clear")
    quota = None
    if not clear:
        current = next((t.quota for t in session.client.list_tenants() if t.name == name), model.Quota())
        values = {**current.as_dict(), **given, **{u.replace("-", "_"): None for u in unlimited}}
        quota = model.Quota(**values)
    updated = session.client.set_quota(name, quota)
    session.emit(output.tenant_to_dict(updated), lambda: output.tenants_table([updated]))


def issued_table(entries: Sequence[pki.Issued]) -> str:
    return output.format_table(("SERIAL", "ROLE", "NAME", "STATE", "NOT AFTER", "CERTIFICATE"),
                               [(f"{e.serial:x}"[:16], e.role, e.name, e.state(), e.not_after, e.cert)
                                for e in entries])


@cli.group("pki")
def pki_group() -> None:
    """The cluster's certificates: a CA, and one per party.

    Each certificate names its holder in a SAN URI soda://ROLE/NAME; the
    Master grants by it. Roles: master (with --host for the names and
    addresses clients dial), agent (its node's name), switch, operator,
    tenant.

    \b
    sodactl pki init --dir /etc/soda/pki
    sodactl pki issue master m1 --host 10.0.0.5 --dir /etc/soda/pki
    sodactl pki issue agent node-1 --dir /etc/soda/pki
    sodactl pki revoke agent node-1 --dir /etc/soda/pki
    sodactl pki crl --dir /etc/soda/pki     # monthly: the CRL is good for 30 days"""


@pki_group.command("init")
@pki_dir_option
@click.option("--cluster", default="soda", show_default=True, help="The cluster's name, in the CA's.")
@click.option("--days", type=int, default=identity.DEFAULT_DAYS["ca"], show_default=True,
              help="Days the CA lives.")
def pki_init(directory: str, cluster: str, days: int) -> None:
    """Make the cluster CA in DIR (refused where one exists)."""
    cert = certificate_authority(directory).init(cluster, days)
    click.echo(f"CA of cluster {cluster} made in {os.path.abspath(directory)} (until "
               f"{cert.not_valid_after_utc.date()}): give {identity.CA_CERT} to every party, keep "
               f"{identity.CA_KEY} secret")


@pki_group.command("issue")
@click.argument("role", type=click.Choice(identity.ROLES))
@click.argument("name")
@pki_dir_option
@click.option("--days", type=int, default=None,
              help="Days it lives (default: operator 90, others 365; never past the CA).")
@click.option("--host", "hosts", multiple=True, metavar="NAME|ADDR",
              help="A DNS name or address the master is dialled at (repeatable; master only).")
@output_option
@click.pass_obj
def pki_issue(session: Session, role: str, name: str, directory: str, days: int | None,
              hosts: tuple[str, ...]) -> None:
    """A key and certificate for ROLE NAME, signed by the CA.

    Refused while ROLE NAME holds a valid one: revoke it first."""
    entry = certificate_authority(directory).issue(role, name, days, hosts)
    data = issued_to_dict(entry, os.path.abspath(directory))
    session.emit(data, lambda: f"issued {role} {name} (serial {data['serial']}, until {entry.not_after}): "
                               f"{data['cert']}, key {data['key']} (0600)")


@pki_group.command("list")
@pki_dir_option
@output_option
@click.pass_obj
def pki_list(session: Session, directory: str) -> None:
    """Every certificate the CA issued: STATE is valid, expired or revoked."""
    entries = certificate_authority(directory).list()
    session.emit([issued_to_dict(e, os.path.abspath(directory)) for e in entries],
                 lambda: issued_table(entries))


@pki_group.command("revoke")
@click.argument("role", type=click.Choice(identity.ROLES))
@click.argument("name")
@pki_dir_option
@click.option("--serial", default=None, metavar="HEX", help="Only the certificate with this serial.")
@output_option
@click.pass_obj
def pki_revoke(session: Session, role: str, name: str, directory: str, serial: str | None) -> None:
    """Revoke ROLE NAME's certificates and re-sign the revocation list
    (crl.pem), which the Master reloads without a restart."""
    try:
        number = int(serial, 16) if serial is not None else None
    except ValueError:
        raise CliError(f"--serial {serial!r} is not a hexadecimal serial") from None
    revoked = certificate_authority(directory).revoke(role, name, number)
    session.emit([issued_to_dict(e, os.path.abspath(directory)) for e in revoked],
                 lambda: "\n".join(f"revoked {role} {name} (serial {e.serial:x})" for e in revoked))


@pki_group.command("crl")
@pki_dir_option
def pki_crl(directory: str) -> None:
    """Sign the revocation list again: it is good for 30 days from each
    signing (each revoke signs it too)."""
    certificate_authority(directory).refresh_crl()
    click.echo(f"signed {os.path.join(os.path.abspath(directory), identity.CRL)} again: good for "
               f"{identity.CRL_DAYS} days")


def main() -> NoReturn:
    """Console script entry point: sodactl, then the end of the process with
    its exit code, at once. Its output is flushed first; what is skipped is
    the interpreter's teardown (grpc and every module sodactl imported),
    ~40 ms of every command once its work is done."""
    code = run()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):      # closed early (| head): nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
