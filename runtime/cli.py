"""The ``tenantflow`` command (SPEC 8): run a supervisor, check tenant code, drive instances.

::

    tenantflow serve     ──▶ open_supervisor + serve_http under trio.run, until SIGINT/SIGTERM
    tenantflow check DIR ──▶ read_tenant + parse_limits + compile_tenant + imports, here
    tenantflow trigger / instances / send-event / tenants
                         ──HTTP (runtime._client)──▶ a running supervisor's admin API

Client commands print tables (runtime._render) for people and, with ``--json``, the
API's JSON for programs. Every failure is one line on stderr and exit status 1; bad
arguments are exit status 2 (click's usage errors).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import signal
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar

import click
import trio

from ._client import DEFAULT_URL, Client, ClientError, ServerEvent
from ._render import Checklist, compact, error_text, instance_lines, instances_table, tenants_table

if TYPE_CHECKING:
    from ._supervisor import Supervisor, SupervisorConfig

__all__ = ["cli", "main"]

STATUSES: Final = (
    "queued",
    "running",
    "paused",
    "errored",
    "terminated",
    "complete",
    "waiting",
    "waitingForPause",
    "unknown",
)
FINISHED: Final = frozenset({"complete", "errored", "terminated"})
TOKEN_ENV: Final = "TENANTFLOW_ADMIN_TOKEN"
URL_ENV: Final = "TENANTFLOW_URL"
DEFAULT_GRACE_SECONDS: Final = 5.0

F = TypeVar("F", bound=Callable[..., Any])


def parse_json(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """A click callback: an option's JSON text as the value it denotes."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc})", ctx, param) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tenantflow", prog_name="tenantflow")
def cli() -> None:
    """tenantflow: durable workflows whose code is different for every tenant.

    `tenantflow serve` runs the supervisor; the other commands talk to a running one
    (--url, or TENANTFLOW_URL; the admin token from TENANTFLOW_ADMIN_TOKEN).
    """


def main() -> None:
    """The console script ``tenantflow``."""
    cli(prog_name="tenantflow")


# ---------------------------------------------------------------------------------- serve


@dataclass(slots=True)
class ServeOptions:
    """What ``tenantflow serve`` runs with, beyond the supervisor's own config."""

    host: str
    port: int
    admin_token: str | None
    grace: float
    playground: bool = False  #: serve the browser playground at /playground
    started: bool = False  #: the HTTP server is up (failures from now on are not startup's)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def client_url(host: str, port: int) -> str:
    """The URL a client on this machine uses to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


@cli.command()
@click.option(
    "--tenants",
    "tenants_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("tenants"),
    show_default=True,
    help="Folder of tenant folders (each with a main.py); watched for changes.",
)
@click.option(
    "--db",
    "db_url",
    default="sqlite:///./tenantflow.db",
    show_default=True,
    help="sqlite:///PATH (embedded) or postgresql://... (shared by several supervisors).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8787,
    show_default=True,
    help="Port to listen on (0: any free port).",
)
@click.option(
    "--admin-token",
    envvar=TOKEN_ENV,
    show_envvar=True,
    help="Bearer token the admin API requires (needed to listen beyond loopback).",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Running instances at once, all tenants together.",
)
@click.option(
    "--max-sandboxes",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Sandbox processes alive at once (least recently used evicted first).",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds an idle sandbox lives before eviction (fractions allowed).",
)
@click.option(
    "--lease-seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=15.0,
    show_default=True,
    help="With PostgreSQL: how long a running instance stays ours without renewal "
    "(renewed every third of it); another supervisor takes over after it expires.",
)
@click.option(
    "--max-write-lag",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Back-pressure: when writes to the database lag this many seconds, API calls "
    "that write answer 503 storage.busy (Retry-After) and no new activation starts.",
)
@click.option(
    "--loader",
    metavar="MODULE:CALLABLE",
    help="The platform's load_runner(metadata[, default=...]) instead of the built-in one.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=DEFAULT_GRACE_SECONDS,
    show_default=True,
    help="On SIGINT/SIGTERM, seconds running instances get to reach a step boundary.",
)
@click.option(
    "--playground",
    is_flag=True,
    help="Serve the browser playground at /playground (behind the admin token when one "
    "is set: open /playground?token=TOKEN once). Its tenant, 'playground', keeps its "
    "code in the database only.",
)
@click.pass_context
def serve(
    ctx: click.Context,
    tenants_dir: Path,
    db_url: str,
    host: str,
    port: int,
    admin_token: str | None,
    max_concurrency: int,
    max_sandboxes: int,
    idle_timeout: float,
    lease_seconds: float,
    max_write_lag: float,
    loader: str | None,
    grace: float,
    playground: bool,
) -> None:
    """Run the supervisor: the engine, the sandboxes and the HTTP API.

    SIGINT or SIGTERM stops it gracefully: no new requests or instances, running
    instances get --grace seconds, then sandboxes stop and the database closes
    (everything acknowledged is already durable; unfinished steps run again later).
    """
    from ._http_playground import PLAYGROUND_TENANT
    from ._supervisor import SupervisorConfig, import_loader

    admin_token = admin_token or None
    if not is_loopback(host) and admin_token is None:
        ctx.fail(
            f"refusing to listen on {host!r} without an admin token: anyone who can reach it "
            f"could drive every tenant's instances. Pass --admin-token or set {TOKEN_ENV} "
            "(or listen on 127.0.0.1)."
        )
    if loader is not None:
        try:
            import_loader(loader)
        except (ImportError, ValueError) as exc:
            raise click.BadParameter(str(exc), ctx, param_hint="--loader") from None
    if not tenants_dir.is_dir():
        click.echo(
            f"warning: {tenants_dir} is not a folder yet; tenants appear when it is created",
            err=True,
        )
    config = SupervisorConfig(
        tenants_dir=tenants_dir,
        db_url=db_url,
        max_concurrency=max_concurrency,
        max_sandboxes=max_sandboxes,
        idle_timeout=idle_timeout,
        lease_seconds=lease_seconds,
        max_write_lag=max_write_lag,
        loader=loader,
        stored_tenants=(PLAYGROUND_TENANT,) if playground else (),
    )
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    options = ServeOptions(host, port, admin_token, grace, playground)
    try:
        trio.run(_serve, config, options)
    except (Exception, BaseExceptionGroup) as exc:
        # A failure to start (database URL, port in use) is the operator's to fix: one
        # line. A failure while serving is a bug: its traceback.
        inner = _single(exc)
        if options.started or not isinstance(inner, Exception):
            raise
        if isinstance(inner, OSError) and inner.errno is not None:
            click.echo(f"error: cannot serve on {host}:{port}: {inner}", err=True)
        else:
            click.echo(f"error: cannot start: {type(inner).__name__}: {inner}", err=True)
        sys.exit(1)


def _single(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (trio's strict groups)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _say(text: str) -> None:
    click.echo(text)
    sys.stdout.flush()


async def _serve(config: SupervisorConfig, options: ServeOptions) -> None:
    """Serve until a signal; then stop in order (HTTP, dispatching, running work, rest)."""
    from ._http import serve_http
    from ._supervisor import open_supervisor

    stop = trio.Event()
    async with trio.open_nursery() as outer:
        await outer.start(_watch_signals, stop, outer.cancel_scope)
        async with open_supervisor(config) as supervisor, trio.open_nursery() as nursery:
            http_scope = trio.CancelScope()

            async def run_http(*, task_status: trio.TaskStatus[int]) -> None:
                with http_scope:
                    await serve_http(
                        supervisor,
                        host=options.host,
                        port=options.port,
                        admin_token=options.admin_token,
                        playground=options.playground,
                        task_status=task_status,
                    )

            if not stop.is_set():
                port = await nursery.start(run_http)
                options.started = True
                _banner(supervisor, options, port)
                await stop.wait()
            _say(
                f"stopping: no new requests or instances; up to {options.grace:g} s for "
                "running instances to reach a step boundary"
            )
            http_scope.cancel()
            if not await supervisor.engine.drain(options.grace):
                _say(
                    f"grace period over: {supervisor.engine.running_count} instance(s) "
                    "stopped mid-step; their unfinished steps run again on the next start"
                )
            nursery.cancel_scope.cancel()
        outer.cancel_scope.cancel()
    _say("stopped: sandboxes stopped, database closed")


async def _watch_signals(
    stop: trio.Event,
    hard: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """First SIGINT/SIGTERM: stop gracefully. A second one: stop at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            name = signal.Signals(signum).name
            if not stop.is_set():
                _say(f"{name}: stopping gracefully ({name} again to stop at once)")
                stop.set()
            else:
                _say(f"{name}: stopping at once")
                hard.cancel()
                return


def _banner(supervisor: Supervisor, options: ServeOptions, port: int) -> None:
    url = client_url(options.host, port)
    config = supervisor.config
    _say(f"tenantflow: serving on {url}  (listening on {options.host}:{port})")
    _say(f"  tenants folder: {config.tenants_dir}   database: {config.db_url}")
    tenants = sorted(
        (s for s in supervisor.registry.tenants.values() if s.present), key=lambda s: s.tenant_id
    )
    for state in tenants:
        version = state.version[:12] if state.version else "not loaded"
        error = f"  ! {state.load_error}" if state.load_error else ""
        _say(f"  tenant {state.tenant_id}: {version}{error}")
    if not tenants:
        _say("  no tenants yet: add a folder with a main.py to the tenants folder")
    example = tenants[0].tenant_id if tenants else "TENANT"
    _say("From another shell:")
    _say(f"  export {URL_ENV}={url}")
    if options.admin_token:
        _say(f"  export {TOKEN_ENV}=...   # the admin token this server was given")
    _say("  tenantflow tenants")
    _say(f"  tenantflow trigger {example} --params '{{}}'")
    _say(f"  tenantflow instances describe {example} ID --follow")
    _say(f"  curl {url}/t/{example}/   # the tenant's fetch()")
    if options.playground:
        _say(f"Playground: {url}/playground")
        if options.admin_token:
            _say(f"  first visit: {url}/playground?token=<the admin token> (sets a cookie)")
    _say("Ctrl-C or SIGTERM stops it gracefully.")


# ---------------------------------------------------------------------------------- check


def _tenant_folders(directory: Path) -> list[Path]:
    """``directory`` itself if it is a tenant, else its subfolders holding tenant files."""
    if (directory / "main.py").is_file():
        return [directory]
    return [
        folder
        for folder in sorted(directory.iterdir())
        if folder.is_dir()
        and not folder.name.startswith((".", "_"))
        and any(f.suffix in (".py", ".toml") for f in folder.iterdir() if f.is_file())
    ]


def check_tenant(folder: Path) -> tuple[str | None, str | None]:
    """``(version, None)`` if the tenant's files load, else ``(None, "main.py:3: ...")``."""
    from loader import read_tenant
    from loader._registry import parse_limits
    from sandbox._restricted import TenantCompileError, compile_tenant

    try:
        code = read_tenant(folder)
        parse_limits(code.files)
        compile_tenant(code.files)
        error = first_bad_import(code.files)
    except TenantCompileError as exc:
        return None, str(exc)
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, too big, bad tenant.toml
        return None, str(exc)
    return (None, error) if error else (code.version, None)


def first_bad_import(files: dict[str, str]) -> str | None:
    """The first import the sandbox would refuse, as ``file:line: ImportError: ...``.

    The sandbox checks imports when it runs them; reading the import statements finds
    the usual mistake (``import time``) without running any tenant code here.
    """
    import ast

    from sandbox._policy import DEFAULT_POLICY
    from sandbox._restricted import SDK_MODULE

    allowed = {SDK_MODULE, *DEFAULT_POLICY.allowed_modules}
    allowed.update(name.removesuffix(".py") for name in files if name.endswith(".py"))
    for filename in sorted(f for f in files if f.endswith(".py")):
        for node in ast.walk(ast.parse(files[filename], filename)):
            if isinstance(node, ast.ImportFrom) and node.level:
                return (
                    f"{filename}:{node.lineno}: ImportError: relative imports are not allowed "
                    "in tenant code; import sibling modules by name"
                )
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name not in allowed:
                    return (
                        f"{filename}:{getattr(node, 'lineno', '?')}: ImportError: "
                        f"module {name!r} is not allowed in tenant code"
                    )
    return None


@cli.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
def check(directory: Path) -> None:
    """Validate the tenants in DIRECTORY: files, tenant.toml limits, restricted compile.

    Prints `ok TENANT VERSION` or `error TENANT: FILE:LINE: MESSAGE` for each tenant;
    exits 1 if any tenant has an error.
    """
    folders = _tenant_folders(directory)
    if not folders:
        click.echo(f"error: no tenant folders (with a main.py) in {directory}", err=True)
        sys.exit(1)
    errors = 0
    for folder in folders:
        version, error = check_tenant(folder)
        if error is None:
            click.echo(f"ok {folder.name} {(version or '')[:12]}")
        else:
            errors += 1
            click.echo(f"error {folder.name}: {error}")
    if errors:
        click.echo(f"{errors} of {len(folders)} tenant(s) have errors", err=True)
        sys.exit(1)


# ---------------------------------------------------------------------------------- client


def client_options(fn: F) -> F:
    """``--url``, ``--token`` and ``--json``, shared by every command that calls the API."""
    fn = click.option(
        "--json", "as_json", is_flag=True, help="Print the API's JSON instead of text."
    )(fn)
    fn = click.option(
        "--token",
        envvar=TOKEN_ENV,
        show_envvar=True,
        help="The supervisor's admin token.",
    )(fn)
    fn = click.option(
        "--url",
        envvar=URL_ENV,
        show_envvar=True,
        default=DEFAULT_URL,
        show_default=True,
        help="The supervisor's URL.",
    )(fn)
    return fn


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _path(*parts: str) -> str:
    return "/v1/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)


def _instance_path(tenant: str, instance_id: str, *rest: str) -> str:
    return _path("tenants", tenant, "instances", instance_id, *rest)


def _print_json(data: Any) -> None:
    click.echo(json.dumps({} if data is None else data, indent=2, ensure_ascii=False))


def _call(url: str, token: str | None, method: str, path: str, body: Any = None, **q: Any) -> Any:
    try:
        return Client(url, token).call(method, path, body, query=q or None)
    except ClientError as exc:
        _fail(exc.message)


@cli.command()
@click.argument("tenant")
@click.option("--id", "instance_id", help="The instance id (default: a new unique one).")
@click.option("--params", callback=parse_json, help="The instance's params, as JSON.")
@client_options
def trigger(
    tenant: str, instance_id: str | None, params: Any, url: str, token: str | None, as_json: bool
) -> None:
    """Create an instance of TENANT's workflow."""
    body: dict[str, Any] = {}
    if instance_id is not None:
        body["id"] = instance_id
    if params is not None:
        body["params"] = params
    created = _call(url, token, "POST", _path("tenants", tenant, "instances"), body)
    if as_json:
        _print_json(created)
        return
    iid = created.get("id") if isinstance(created, dict) else None
    status = created.get("status") if isinstance(created, dict) else None
    click.echo(f"created {tenant} instance {iid} ({status})")
    click.echo(f"  follow it: tenantflow instances describe {tenant} {iid} --follow")


@cli.group()
def instances() -> None:
    """List, inspect and control a tenant's instances."""


@instances.command("list")
@click.argument("tenant")
@click.option("--status", type=click.Choice(STATUSES), help="Only instances in this status.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many instances.")
@click.option("--cursor", help="Continue a listing where the previous page ended.")
@client_options
def list_instances(
    tenant: str,
    status: str | None,
    limit: int | None,
    cursor: str | None,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """List TENANT's instances, newest first."""
    path = _path("tenants", tenant, "instances")
    page = _call(url, token, "GET", path, status=status, limit=limit, cursor=cursor)
    if as_json:
        _print_json(page)
        return
    rows = page.get("instances", []) if isinstance(page, dict) else []
    if rows:
        click.echo(instances_table(rows))
    else:
        click.echo("no instances")
    next_cursor = page.get("next_cursor") if isinstance(page, dict) else None
    if next_cursor:
        click.echo(f"more: tenantflow instances list {tenant} --cursor {next_cursor}")


@instances.command()
@click.argument("tenant")
@click.argument("instance_id", metavar="ID")
@click.option("--follow", "-f", is_flag=True, help="Show the steps live until it finishes.")
@client_options
def describe(
    tenant: str, instance_id: str, follow: bool, url: str, token: str | None, as_json: bool
) -> None:
    """Show an instance and its per-step checklist (live with --follow).

    With --follow, exits 0 when the instance completes and 1 when it errors or is
    terminated.
    """
    if follow:
        sys.exit(_follow(Client(url, token), tenant, instance_id, as_json=as_json))
    view = _call(url, token, "GET", _instance_path(tenant, instance_id))
    if as_json:
        _print_json(view)
        return
    click.echo("\n".join(instance_lines(view, tenant)))


def _status_of(data: Any) -> str | None:
    if isinstance(data, str):
        return data
    if isinstance(data, dict) and isinstance(data.get("status"), str):
        status: str = data["status"]
        return status
    return None


def _follow(client: Client, tenant: str, instance_id: str, *, as_json: bool) -> int:
    """Stream the instance's events (history first, then live) until ``done``."""
    path = _instance_path(tenant, instance_id)
    out = sys.stdout
    checklist = Checklist(out, redraw=not as_json and out.isatty())
    final: str | None = None
    try:
        view = client.call("GET", path)
        if not as_json:
            click.echo(f"instance {instance_id} (tenant {tenant}): {view.get('status')}")
            click.echo(f"  code version {str(view.get('code_version') or '')[:12]}")
        last_status = view.get("status")
        for event in client.events(f"{path}/logs"):
            data = event.json()
            if as_json:
                click.echo(json.dumps({"event": event.event, "data": data}, ensure_ascii=False))
                out.flush()
            if event.event == "done":
                final = _status_of(data)
                break
            if event.event == "error":
                _fail(_stream_error(data))
            if as_json:
                continue
            last_status = _show_event(checklist, event, data, last_status)
        view = client.call("GET", path)
    except ClientError as exc:
        _fail(exc.message)
    except KeyboardInterrupt:
        return 130
    final = final or view.get("status")
    if final not in FINISHED:
        _fail(f"the event stream ended while the instance is {final}")
    if not as_json:
        if final == "complete":
            click.echo(f"complete -> {compact(view.get('output'))}")
        else:
            detail = f": {error_text(view['error'])}" if view.get("error") else ""
            click.echo(f"{final}{detail}")
    return 0 if final == "complete" else 1


def _stream_error(data: Any) -> str:
    """An ``error`` event's ``{"error": {"code", "message"}}`` as ``code: message``."""
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return f"{error.get('code', 'error')}: {error.get('message', '')}"
    return f"the event stream failed: {compact(data)}"


def _show_event(checklist: Checklist, event: ServerEvent, data: Any, last_status: Any) -> Any:
    if event.event == "step" and isinstance(data, dict):
        inner = data.get("step")
        checklist.update(inner if isinstance(inner, dict) else data)
    elif event.event == "log":
        if isinstance(data, dict):
            level, message = data.get("level", "info"), data.get("message", "")
            checklist.log(f"log {level}: {message}")
        else:
            checklist.log(f"log: {data}")
    elif event.event == "status":
        status = _status_of(data)
        if status is not None and status != last_status:
            checklist.log(f"status: {status}")
            return status
    return last_status


def _action_command(action: str, summary: str) -> click.Command:
    @click.argument("tenant")
    @click.argument("instance_id", metavar="ID")
    @client_options
    def command(tenant: str, instance_id: str, url: str, token: str | None, as_json: bool) -> None:
        answer = _call(url, token, "POST", _instance_path(tenant, instance_id, action))
        if as_json:
            _print_json(answer)
            return
        status = answer.get("status") if isinstance(answer, dict) else None
        click.echo(f"{action}: {tenant} instance {instance_id} is {status}")

    command.__doc__ = summary
    return click.command(action)(command)


for _action, _summary in (
    ("pause", "Pause an instance at its next step boundary."),
    ("resume", "Resume a paused instance (its pending timers shift by the paused time)."),
    ("terminate", "Stop an instance at once (it ends terminated)."),
    ("restart", "Discard the journal and run again, same id and params, current code."),
):
    instances.add_command(_action_command(_action, _summary))


@cli.command("send-event")
@click.argument("tenant")
@click.argument("instance_id", metavar="ID")
@click.option("--type", "event_type", required=True, help="The event type it waits for.")
@click.option("--payload", callback=parse_json, help="The event's payload, as JSON.")
@client_options
def send_event(
    tenant: str,
    instance_id: str,
    event_type: str,
    payload: Any,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Send an event to an instance (buffered if it is not waiting for it yet)."""
    body = {"type": event_type, "payload": payload}
    answer = _call(url, token, "POST", _instance_path(tenant, instance_id, "events"), body)
    if as_json:
        _print_json(answer)
        return
    click.echo(f"sent {event_type} to {tenant} instance {instance_id}")


@cli.command()
@client_options
def tenants(url: str, token: str | None, as_json: bool) -> None:
    """List tenants: code version, sandbox warm or cold, instances by status."""
    listed = _call(url, token, "GET", "/v1/tenants")
    if as_json:
        _print_json(listed)
        return
    click.echo(tenants_table(listed) if listed else "no tenants")


if __name__ == "__main__":
    main()
