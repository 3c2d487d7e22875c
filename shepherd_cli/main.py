"""The `shepherd` command: `serve` runs the services; `tasks ...` and `status` talk to them.

Commands are thin: they parse arguments, make one or a few RPCs over the channel factory
(shepherd/channels.py) with the addresses and credentials of the connection file, and hand the
answers to output.py. Server errors become one readable message (code, text, bad fields) via
errors.py, never a traceback.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from controlplane.settings import ClusterSettings
from shepherd import channels
from shepherd.readiness import LIVENESS
from shepherd.release import release
from shepherd.settings import state_dir
from shepherd.v1 import (
    launcher_service_pb2,
    launcher_service_pb2_grpc,
    reconciler_service_pb2,
    reconciler_service_pb2_grpc,
    task_pb2,
)
from shepherd_cli import connection as conn
from shepherd_cli import output, servicemetrics
from shepherd_cli.errors import describe_rpc_error
from shepherd_cli.keys import KEY_SYNTAX, KeySyntaxError, format_key, parse_key
from shepherd_cli.output import Format
from shepherd_cli.taskfile import TaskFileError, parse_task_file

PROG = "shepherd"
F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110, "show_default": True}

console = Console()
err_console = Console(stderr=True)


class _Group(click.Group):
    """Turns the failures an operator can cause into one `Error: ...` message and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except grpc.RpcError as err:
            raise click.ClickException("\n".join(describe_rpc_error(err))) from None
        except (conn.ConnectionFileError, KeySyntaxError, TaskFileError) as err:
            raise click.ClickException(str(err)) from None


def _output_option(func: F) -> F:
    return click.option(
        "-o",
        "--output",
        "fmt",
        type=click.Choice([f.value for f in Format]),
        default=Format.TABLE.value,
        help="Output format: a table for people, JSON or YAML for scripts.",
    )(func)


def _connection(ctx: click.Context) -> conn.Connection:
    return conn.Connection.read(ctx.find_root().params["connection"])


@contextmanager
def _stub(ctx: click.Context, service: str, factory: Callable[[grpc.Channel], Any]) -> Iterator[Any]:
    connection = _connection(ctx)
    with channels.sync_channel(connection.address(service), connection.credentials()) as channel:
        yield factory(channel)


def _reconciler(ctx: click.Context) -> Any:
    return _stub(ctx, "reconciler", reconciler_service_pb2_grpc.ReconcilerServiceStub)


def _emit(data: Any, fmt: Format) -> None:
    click.echo(output.render_data(data, fmt))


@click.group(cls=_Group, context_settings=CONTEXT)
@click.option(
    "--connection",
    type=click.Path(path_type=Path, dir_okay=False),
    default=conn.default_path(),
    envvar=conn.ENV_VAR,
    show_envvar=True,
    help="The connection file `shepherd serve` writes: addresses and client credentials.",
)
@click.version_option(release(), prog_name=PROG)
def cli(connection: Path) -> None:
    """Operate Shepherd: run its services, and list, watch, launch and cancel tasks.

    A task key is written dag/task/run[/try[/map_index[/resumption]]] (try defaults to 1, map_index
    to -1, resumption to 0).
    """


# ---- serve -----------------------------------------------------------------------------------


@cli.command(context_settings=CONTEXT)
@click.option(
    "--kubeconfig",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Run against this cluster instead of the local control plane (started or reused).",
)
@click.option(
    "--context", "kube_context", default=None, help="Context of --kubeconfig (default: its current one)."
)
@click.option(
    "--namespace", default="shepherd-workers", help="Namespace of the task pods, with --kubeconfig."
)
@click.option("--executor-id", default="shepherd", help="Executor id on the pods' labels.")
@click.option("--launcher-port", default=50051, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--watcher-port", default=50052, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--reconciler-port", default=50053, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=state_dir() / "serve",
    help="The services' SQLite stores and logs (kept across runs: accepted launches survive).",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=ClusterSettings().state_dir,
    help="With --kubeconfig: where the CA of the gRPC certificates is kept (the local cluster's by default).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    kubeconfig: Path | None,
    kube_context: str | None,
    namespace: str,
    executor_id: str,
    launcher_port: int,
    watcher_port: int,
    reconciler_port: int,
    workdir: Path,
    state_dir: Path,
) -> None:
    """Start the launcher, watcher and reconciler, and keep them running until Ctrl-C.

    Prints each address and the scheduler credentials, and writes the connection file.
    """
    from shepherd_cli.serve import ServeOptions
    from shepherd_cli.serve import serve as run_serve

    if kube_context and kubeconfig is None:
        raise click.UsageError("--context needs --kubeconfig")
    if launcher_port and len({launcher_port, watcher_port, reconciler_port} - {0}) < 3:
        raise click.UsageError("the three ports must differ")
    ports = {"launcher": launcher_port, "watcher": watcher_port, "reconciler": reconciler_port}
    options = ServeOptions(
        kubeconfig=kubeconfig,
        context=kube_context,
        namespace=namespace,
        executor_id=executor_id,
        ports={name: port for name, port in ports.items() if port},
        workdir=workdir,
        connection_path=ctx.find_root().params["connection"],
        state_dir=state_dir,
    )
    sys.exit(run_serve(options, lambda line: click.echo(line, err=False)))


# ---- status ----------------------------------------------------------------------------------


def _health_name(reply: health_pb2.HealthCheckResponse) -> str:
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return name


@cli.command(context_settings=CONTEXT)
@_output_option
@click.pass_context
def status(ctx: click.Context, fmt: str) -> None:
    """Each service's address, health (grpc.health.v1), round-trip time, and from its metrics
    port: why it is not ready, its backlog, and the watch's silence."""
    connection = _connection(ctx)
    rows: list[dict[str, Any]] = []
    for name in conn.SERVICES:
        address = connection.address(name)
        started = time.monotonic()
        live = ""
        try:
            with channels.sync_channel(address, connection.credentials()) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                rtt_ms = round((time.monotonic() - started) * 1000, 1)
                # Liveness apart from readiness: a reconciler whose upstream is down is alive but
                # not ready, and must not be restarted for it (what the kubelet's probe checks).
                try:
                    live = _health_name(
                        stub.Check(health_pb2.HealthCheckRequest(service=LIVENESS), timeout=5)
                    )
                except grpc.RpcError as err:  # e.g. a service older than the liveness name
                    live = describe_rpc_error(err)[0]
            health = _health_name(reply)
        except grpc.RpcError as err:
            rtt_ms = round((time.monotonic() - started) * 1000, 1)
            health = f"unreachable ({describe_rpc_error(err)[0]})"
        row: dict[str, Any] = {
            "service": name,
            "address": address,
            "health": health,
            "liveness": live,
            "rtt_ms": rtt_ms,
        }
        if url := connection.metrics_url(name):
            try:
                row.update(servicemetrics.summary(name, servicemetrics.fetch(url)))
            except (OSError, ValueError) as err:
                row["metrics_error"] = str(err)
        rows.append(row)
    healthy = all(row["health"] == "SERVING" for row in rows)
    fmt_ = Format(fmt)
    if fmt_ is Format.TABLE:
        table = Table(show_edge=False, header_style="bold")
        for column in ("SERVICE", "ADDRESS", "HEALTH", "LIVE", "VERSION", "RTT", "BACKLOG", "WHY"):
            table.add_column(column)
        for row in rows:
            style = "green" if row["health"] == "SERVING" else "red"
            figures = []
            if "backlog" in row:
                figures.append(str(row["backlog"]))
            if "watch_silence_s" in row:
                figures.append(f"silent {row['watch_silence_s']} s")
            table.add_row(
                row["service"],
                row["address"],
                f"[{style}]{row['health']}[/]",
                "yes" if row["liveness"] == "SERVING" else (row["liveness"] or "-"),
                row.get("version", "-"),
                f"{row['rtt_ms']} ms",
                ", ".join(figures),
                "; ".join(row.get("why", [])) or row.get("metrics_error", ""),
            )
        console.print(table)
        console.print(f"executor {connection.executor_id}, client {PROG} {release()}")
    else:
        _emit(
            {"executor_id": connection.executor_id, "client_version": release(), "services": rows},
            fmt_,
        )
    if not healthy:
        sys.exit(1)


# ---- tasks -----------------------------------------------------------------------------------


@cli.group(cls=_Group, context_settings=CONTEXT)
def tasks() -> None:
    """List, inspect, watch, launch and cancel tasks."""


class _KeyType(click.ParamType):  # type: ignore[type-arg]
    name = "KEY"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> task_pb2.TaskKey:
        if isinstance(value, task_pb2.TaskKey):
            return value
        try:
            return parse_key(str(value))
        except KeySyntaxError as err:
            self.fail(str(err), param, ctx)


KEY = _KeyType()
_DURATION = re.compile(r"^(\d+)([smhd])$")


def parse_since(text: str) -> timedelta:
    """`90s`, `15m`, `2h`, `1d`."""
    match = _DURATION.match(text.strip())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 15m, 2h or 1d", param_hint="--since")
    unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
    return timedelta(**{unit: int(match.group(1))})


def _state_option(func: F) -> F:
    return click.option(
        "--state", type=click.Choice(output.STATE_NAMES), default=None, help="Only tasks in this state."
    )(func)


def _list_tasks(
    stub: Any, *, state: str | None, dag: str | None, page_size: int, page_token: str, limit: int
) -> tuple[list[task_pb2.Task], str]:
    """Pages until `limit` tasks (whole pages: the token must stay exact), or the last page."""
    found: list[task_pb2.Task] = []
    token = page_token
    while True:
        reply = stub.ListTasks(
            reconciler_service_pb2.ListTasksRequest(
                page_size=page_size,
                page_token=token,
                state=output.parse_state(state) if state else task_pb2.TASK_STATE_UNSPECIFIED,
                dag_id=dag or "",
            ),
            timeout=30,
        )
        found.extend(reply.tasks)
        token = reply.next_page_token
        if not token or len(found) >= limit:
            return found, token


def _matches(task: task_pb2.Task, run: str | None, since: datetime | None) -> bool:
    if run is not None and task.key.run_id != run:
        return False
    return since is None or task.queued_time.ToDatetime(tzinfo=UTC) >= since


@tasks.command("list", context_settings=CONTEXT)
@_state_option
@click.option("--dag", default=None, help="Only tasks of this DAG.")
@click.option("--run", default=None, help="Only tasks of this DAG run.")
@click.option("--since", default=None, help="Only tasks queued within this long, e.g. 15m, 2h, 1d.")
@click.option(
    "--limit", default=100, type=click.IntRange(1), help="Stop after the page that reaches this many."
)
@click.option("--page-size", default=100, type=click.IntRange(1, 1000), help="Tasks per request.")
@click.option("--page-token", default="", help="Continue from a previous listing's next page token.")
@_output_option
@click.pass_context
def list_tasks(
    ctx: click.Context,
    state: str | None,
    dag: str | None,
    run: str | None,
    since: str | None,
    limit: int,
    page_size: int,
    page_token: str,
    fmt: str,
) -> None:
    """Tasks in key order, filtered; prints the token of the next page when there is one."""
    cutoff = datetime.now(UTC) - parse_since(since) if since else None
    with _reconciler(ctx) as stub:
        found, token = _list_tasks(
            stub, state=state, dag=dag, page_size=page_size, page_token=page_token, limit=limit
        )
    selected = [task for task in found if _matches(task, run, cutoff)]
    fmt_ = Format(fmt)
    if fmt_ is Format.TABLE:
        console.print(output.tasks_table(selected, now=datetime.now(UTC)))
        console.print(output.progress([task.state for task in selected]))
        if token:
            console.print(f"more: --page-token {token}")
    else:
        _emit({"tasks": [output.to_dict(task) for task in selected], "next_page_token": token}, fmt_)


@tasks.command(context_settings=CONTEXT)
@click.argument("key", type=KEY)
@_output_option
@click.pass_context
def get(ctx: click.Context, key: task_pb2.TaskKey, fmt: str) -> None:
    """One task: state, pod, times and why it failed."""
    with _reconciler(ctx) as stub:
        task = stub.GetTask(reconciler_service_pb2.GetTaskRequest(key=key), timeout=30).task
    fmt_ = Format(fmt)
    if fmt_ is Format.TABLE:
        console.print(output.task_detail(task))
    else:
        _emit(output.to_dict(task), fmt_)


@tasks.command(context_settings=CONTEXT)
@click.argument("key", type=KEY, required=False)
@click.option("--dag", default=None, help="Cancel every unfinished task of this DAG.")
@click.option("--run", default=None, help="With --dag: only this run.")
@click.option("--reason", default="cancelled with the shepherd CLI", help="Recorded with the cancel.")
@_output_option
@click.pass_context
def cancel(
    ctx: click.Context, key: task_pb2.TaskKey | None, dag: str | None, run: str | None, reason: str, fmt: str
) -> None:
    """Revoke one task (KEY), or every unfinished task of a DAG (--dag) or run (--dag --run)."""
    if (key is None) == (dag is None):
        raise click.UsageError(f"give either a task key ({KEY_SYNTAX}) or --dag")
    if run is not None and dag is None:
        raise click.UsageError("--run needs --dag")
    with _reconciler(ctx) as stub:
        if key is not None:
            keys = [key]
        else:
            found, _ = _list_tasks(
                stub, state=None, dag=dag, page_size=1000, page_token="", limit=sys.maxsize
            )
            keys = [t.key for t in found if _matches(t, run, None) and not output.is_terminal(t.state)]
        cancelled = [
            stub.CancelTask(reconciler_service_pb2.CancelTaskRequest(key=k, reason=reason), timeout=30).task
            for k in keys
        ]
    fmt_ = Format(fmt)
    if fmt_ is Format.TABLE:
        console.print(output.tasks_table(cancelled, now=datetime.now(UTC)))
        console.print(f"cancelled {len(cancelled)} task(s)")
    else:
        _emit({"tasks": [output.to_dict(task) for task in cancelled]}, fmt_)


@tasks.command(context_settings=CONTEXT)
@click.argument("key", type=KEY)
@click.option("--tail", "tail_lines", default=100, type=click.IntRange(1, 10_000), help="Lines from the end.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until the container ends.")
@click.pass_context
def logs(ctx: click.Context, key: task_pb2.TaskKey, tail_lines: int, follow: bool) -> None:
    """The log of the task's `base` container."""
    request = reconciler_service_pb2.GetTaskLogsRequest(key=key, tail_lines=tail_lines, follow=follow)
    with _reconciler(ctx) as stub:
        for chunk in stub.GetTaskLogs(request):
            sys.stdout.buffer.write(chunk.data)
            sys.stdout.buffer.flush()


@tasks.command(context_settings=CONTEXT)
@click.option(
    "-f", "--file", "task_file", type=click.File("r"), required=True, help="Task YAML ('-' reads stdin)."
)
@_output_option
@click.pass_context
def launch(ctx: click.Context, task_file: Any, fmt: str) -> None:
    """Launch the task(s) a YAML file describes (one per document): key, command, template, override."""
    requests = parse_task_file(task_file.read())
    with _stub(ctx, "launcher", launcher_service_pb2_grpc.LauncherServiceStub) as stub:
        replies: list[launcher_service_pb2.LaunchTaskResponse] = [
            stub.LaunchTask(request, timeout=30) for request in requests
        ]
    fmt_ = Format(fmt)
    if fmt_ is Format.TABLE:
        table = Table(show_edge=False, header_style="bold")
        for column in ("KEY", "LAUNCH", "POD", "NOTE"):
            table.add_column(column)
        for reply in replies:
            launch_ = reply.launch
            state = launcher_service_pb2.LaunchState.Name(launch_.state).removeprefix("LAUNCH_STATE_").lower()
            note = "already launched: nothing changed" if reply.already_existed else ""
            table.add_row(format_key(launch_.key), state, launch_.pod_name, note)
        console.print(table)
    else:
        _emit({"launches": [output.to_dict(reply) for reply in replies]}, fmt_)


@tasks.command(context_settings=CONTEXT)
@_state_option
@click.option("--dag", default=None, help="Only tasks of this DAG.")
@click.option("--run", default=None, help="Only tasks of this DAG run.")
@click.option(
    "--after-cursor", default=0, type=click.IntRange(0), help="Start after this cursor (0: from the start)."
)
@click.option("--until-done", is_flag=True, help="Exit once every task seen is in a terminal state.")
@_output_option
@click.pass_context
def watch(
    ctx: click.Context,
    state: str | None,
    dag: str | None,
    run: str | None,
    after_cursor: int,
    until_done: bool,
    fmt: str,
) -> None:
    """Follow state changes live: a table with a progress summary, or one JSON/YAML change per line."""
    fmt_ = Format(fmt)
    latest: dict[str, task_pb2.Task] = {}
    wanted = output.parse_state(state) if state else None

    def view() -> Group:
        shown = [t for t in latest.values() if wanted is None or t.state == wanted]
        return Group(
            output.tasks_table(sorted(shown, key=lambda t: format_key(t.key)), now=datetime.now(UTC)),
            output.progress([t.state for t in latest.values()]),
        )

    def done() -> bool:
        return until_done and bool(latest) and all(output.is_terminal(t.state) for t in latest.values())

    request = reconciler_service_pb2.WatchTaskStatesRequest(after_cursor=after_cursor)
    with _reconciler(ctx) as stub:
        stream = stub.WatchTaskStates(request)
        live = Live(view(), console=console, auto_refresh=False) if fmt_ is Format.TABLE else None
        try:
            if live is not None:
                live.start()
            for reply in stream:
                for change in reply.changes:
                    task = change.task
                    if (dag and task.key.dag_id != dag) or (run and task.key.run_id != run):
                        continue
                    latest[format_key(task.key)] = task
                    if live is None and (wanted is None or task.state == wanted):
                        click.echo(output.render_change(change, fmt_))
                if live is not None:
                    live.update(view(), refresh=True)
                if done():
                    break
        except KeyboardInterrupt:
            pass
        finally:
            stream.cancel()
            if live is not None:
                live.stop()


def run() -> None:
    """The console script's entry point."""
    cli(prog_name=PROG)
