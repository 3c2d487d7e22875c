"""`make run AIRFLOW=1` (`python -m demo --airflow`): a real Airflow 3 on Shepherd runs an example DAG.

The local control plane with its real node, the three services, then Airflow itself
(controlplane/airflow.py: PostgreSQL, API server, DAG processor, scheduler with
`shepherd_airflow.ShepherdExecutor`); the first run installs what it needs (Airflow's virtualenv,
the worker image, PostgreSQL), which takes several minutes. The DAG `shepherd_example`
(integrations/airflow/dags/) runs with live progress; at the end each task instance's state, and
where to read its log: the Airflow UI (served by the API server) and `shepherd tasks logs`.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.live import Live
from rich.table import Table

from controlplane import Cluster
from controlplane.airflow import AirflowDeployment, AirflowError, ShepherdConnection
from controlplane.stack import ServiceStack
from demo.airflowview import (
    FINISHED,
    label,
    progress_line,
    readable_log,
    shepherd_key,
    state_of,
    summary_rows,
)
from shepherd import channels
from shepherd.v1 import reconciler_service_pb2, reconciler_service_pb2_grpc
from shepherd_cli.keys import parse_key
from shepherd_cli.serve import stack_connection

DAG = "shepherd_example"
STYLE = {"success": "green", "failed": "red", "upstream_failed": "red", "running": "cyan", "queued": "yellow"}


def _task_instances(airflow: AirflowDeployment, run_id: str) -> list[dict[str, Any]]:
    reply = airflow.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances", query={"limit": "100"})
    return list(reply["task_instances"])


def _live_table(elapsed_s: float, run_state: str, tis: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title=progress_line(elapsed_s, run_state, tis), title_justify="left", show_edge=False)
    for column in ("task", "state", "try"):
        table.add_column(column)
    for ti in sorted(tis, key=lambda t: (str(t["task_id"]), int(t.get("map_index", -1)))):
        state = state_of(ti)
        table.add_row(label(ti), f"[{STYLE.get(state, 'white')}]{state}[/]", str(ti.get("try_number") or ""))
    return table


def follow(airflow: AirflowDeployment, run_id: str, console: Console, *, timeout_s: float) -> str:
    """Until the run is finished, showing its task instances (a live table on a terminal, a line
    per change otherwise); the run's final state."""
    started = time.monotonic()
    last = ""

    def poll() -> tuple[str, list[dict[str, Any]]]:
        airflow.check_running()
        run = airflow.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}")
        return str(run["state"]), _task_instances(airflow, run_id)

    state, tis = poll()
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            elapsed = time.monotonic() - started
            if console.is_terminal:
                live.update(_live_table(elapsed, state, tis), refresh=True)
            else:
                line = progress_line(elapsed, state, tis)
                if line.split("]", 1)[1] != last:
                    print(line, flush=True)  # a log or a pipe gets whole lines, never wrapped
                    last = line.split("]", 1)[1]
            if state in ("success", "failed") and all(state_of(t) in FINISHED for t in tis):
                return state
            if elapsed > timeout_s:
                console.print(f"(stopped waiting after {timeout_s:.0f}s)")
                return state
            time.sleep(1.0)
            state, tis = poll()


def summary(
    airflow: AirflowDeployment, run_id: str, connection_file: Path, console: Console
) -> list[dict[str, Any]]:
    tis = _task_instances(airflow, run_id)
    rows = summary_rows(airflow.api_url, DAG, run_id, tis)
    table = Table(title=f"Task instances of {DAG}, run {run_id}", title_justify="left", show_edge=False)
    for column in ("task", "state", "tries", "seconds"):
        table.add_column(column)
    for row in rows:
        state = f"[{STYLE.get(row.state, 'white')}]{row.state}[/]"
        seconds = "" if row.seconds is None else f"{row.seconds:.1f}"
        table.add_row(row.task, state, str(row.tries), seconds)
    console.print(table)
    width = max(len(row.task) for row in rows) if rows else 0
    console.print("\nEach task's log in the Airflow UI (its Logs tab), served by the API server:")
    for row in rows:
        console.print(f"  {row.task:<{width}}  {row.ui}", soft_wrap=True)
    console.print(
        "\nThe same logs from Shepherd (the pod's `base` container, kept after the pod is gone), while the "
        "services run (KEEP=1):"
    )
    for row in rows:
        if row.shepherd:
            console.print(
                f"  .venv/bin/shepherd --connection {connection_file} tasks logs '{row.shepherd}'",
                soft_wrap=True,
            )
    return tis


def show_failed_log(
    airflow: AirflowDeployment, stack: ServiceStack, run_id: str, tis: list[dict[str, Any]], console: Console
) -> None:
    """The end of the failed task's log, as Airflow's API server serves it and as Shepherd's
    reconciler does (`GetTaskLogs`, what `shepherd tasks logs` calls)."""
    for ti in tis:
        if state_of(ti) != "failed":
            continue
        try:
            text = airflow.task_log(DAG, run_id, ti["task_id"], int(ti["try_number"]), int(ti["map_index"]))
        except AirflowError as err:
            console.print(f"\n(log of {label(ti)} not available: {err})")
            continue
        console.print(f"\nLog of the failed task {label(ti)} (end), through Airflow's REST API:")
        for line in readable_log(text):
            console.print(f"  | {line}", markup=False, soft_wrap=True)
        key = parse_key(shepherd_key(DAG, run_id, ti))
        console.print("\nThe same task's container log (end), through Shepherd's GetTaskLogs:")
        try:
            with channels.sync_channel(stack.address("reconciler"), stack.credentials()) as channel:
                stub = reconciler_service_pb2_grpc.ReconcilerServiceStub(channel)
                request = reconciler_service_pb2.GetTaskLogsRequest(key=key, tail_lines=20)
                data = b"".join(chunk.data for chunk in stub.GetTaskLogs(request, timeout=30))
        except grpc.RpcError as err:
            console.print(f"  (not available: {err.code().name}: {err.details()})")
            continue
        for line in readable_log(data.decode(errors="replace")):
            console.print(f"  | {line}", markup=False, soft_wrap=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo --airflow", description=__doc__)
    parser.add_argument("--airflow", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--keep", action="store_true", help="keep Airflow and the services up at the end, until Ctrl-C"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the run (default 600)"
    )
    args = parser.parse_args(argv)
    console = Console(highlight=False)

    print("== control plane", flush=True)
    info = Cluster().up()
    print(f"kube-apiserver {info.version} at {info.server}")
    if info.real_node is None:
        print(f"Airflow's tasks need real containers; there is no real node: {info.real_node_unavailable}")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="shepherd-airflow-demo-"))
    stack = ServiceStack(info, workdir / "services", executor_id=f"airflow-demo-{int(time.time())}")
    print(f"\n== services (logs and stores in {stack.workdir})", flush=True)
    stack.start()
    for name in ("launcher", "watcher", "reconciler"):
        print(f"  {name:<10} {stack.address(name)}")
    connection_file = workdir / "connection.json"
    stack_connection(stack).write(connection_file)
    print(
        "\n== Airflow 3.3.2 with shepherd_airflow.ShepherdExecutor (the first run installs Airflow, "
        "builds the worker image and installs PostgreSQL: several minutes)",
        flush=True,
    )
    tis: list[dict[str, Any]] = []
    try:
        with AirflowDeployment(
            cluster=info, workdir=workdir / "airflow", shepherd=ShepherdConnection.of_stack(stack)
        ) as airflow:
            print(
                f"  API server and UI {airflow.api_url}; worker pods in namespace {airflow.workers_namespace}"
            )
            print(f"  components' logs in {airflow.workdir}", flush=True)
            run_id = airflow.trigger(DAG)
            print(f"\n== run {run_id} of {DAG}", flush=True)
            state = follow(airflow, run_id, console, timeout_s=args.timeout)
            console.print(f"\nThe run ended {state}.\n")
            tis = summary(airflow, run_id, connection_file, console)
            show_failed_log(airflow, stack, run_id, tis, console)
            if args.keep:
                console.print(f"\nAirflow stays up at {airflow.api_url}; Ctrl-C stops it and the services.")
                with contextlib.suppress(KeyboardInterrupt):
                    signal.pause()
            else:
                console.print(
                    "\nAirflow and the services stop now (`make run AIRFLOW=1 KEEP=1` keeps them up)."
                )
    finally:
        stack.stop_all()
    print(f"stopped; the cluster keeps running (`make cluster-down` stops it). Logs: {workdir}")
    # validate fails on purpose; anything else not succeeding is unexpected.
    unexpected = [
        label(t) for t in tis if state_of(t) != ("failed" if t["task_id"] == "validate" else "success")
    ]
    if unexpected:
        print(f"unexpected states: {unexpected}", file=sys.stderr)
    return 1 if unexpected else 0
