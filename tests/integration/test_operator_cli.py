"""`shepherd serve` and the operator CLI, end to end, as an operator runs them.

`shepherd serve` runs as a subprocess in its own session (so the test can press Ctrl-C on its
process group, as a terminal would); every CLI command runs as a subprocess too and finds the
services only through the connection file serve wrote. The README's grpcurl example is run as
written, with the address and credentials serve printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpc_reflection.v1alpha import reflection_pb2

from controlplane import ClusterInfo
from controlplane.settings import ClusterSettings
from shepherd import channels
from shepherd_cli.connection import Connection
from tests.helpers.eventually import eventually

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
GRPCURL = str(ClusterSettings().bin_dir / "grpcurl")


@dataclass
class Served:
    proc: subprocess.Popen[str]
    connection_path: Path
    connection: Connection
    out_path: Path

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SHEPHERD_CONNECTION": str(self.connection_path), "COLUMNS": "200"}
        return subprocess.run(
            [sys.executable, "-m", "shepherd_cli", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self.cli(*args, stdin=stdin)
        assert result.returncode == 0, f"shepherd {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout


@pytest.fixture
def served(cluster: ClusterInfo, tmp_path: Path) -> Iterator[Served]:
    connection_path = tmp_path / "connection.json"
    out_path = tmp_path / "serve.out"
    argv = [
        sys.executable,
        "-m",
        "shepherd_cli",
        "--connection",
        str(connection_path),
        "serve",
        "--executor-id",
        f"cli-{uuid.uuid4().hex[:8]}",
        "--workdir",
        str(tmp_path / "work"),
        *("--launcher-port", "0", "--watcher-port", "0", "--reconciler-port", "0"),
    ]
    with out_path.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        eventually(
            lambda: connection_path.exists() or proc.poll() is not None,
            what="shepherd serve to write its connection file",
            timeout=120,
        )
        assert proc.poll() is None, f"shepherd serve exited:\n{out_path.read_text()}"
        yield Served(proc, connection_path, Connection.read(connection_path), out_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with contextlib.suppress(ProcessLookupError):  # services a killed serve left (a failed test)
            os.killpg(proc.pid, signal.SIGKILL)


def _task_file(dag: str) -> str:
    return f"""
key: {dag}/extract/r1
command: [python, -m, etl.extract]
---
key: {{dag_id: {dag}, task_id: forever, run_id: r1}}
command: [sleep, infinity]
pod_override:
  metadata:
    annotations: {{sim.shepherd.dev/outcome: run-forever}}
"""


def test_serve_then_launch_get_list_watch_cancel(served: Served) -> None:
    printed = served.out_path.read_text()
    for name in ("launcher", "watcher", "reconciler"):
        assert served.connection.address(name) in printed
    assert f"--cert {served.connection.cert}" in printed
    status = json.loads(served.ok("status", "-o", "json"))
    assert [s["health"] for s in status["services"]] == ["SERVING"] * 3
    assert [s["liveness"] for s in status["services"]] == ["SERVING"] * 3
    assert all(s["version"] == status["client_version"] for s in status["services"]), status

    dag = f"cli{uuid.uuid4().hex[:8]}"
    launched = json.loads(served.ok("tasks", "launch", "-f", "-", "-o", "json", stdin=_task_file(dag)))
    assert [entry["launch"]["key"]["task_id"] for entry in launched["launches"]] == ["extract", "forever"]
    again = json.loads(served.ok("tasks", "launch", "-f", "-", "-o", "json", stdin=_task_file(dag)))
    assert all(entry["already_existed"] for entry in again["launches"])  # idempotent, nothing new

    forever = f"{dag}/forever/r1"
    eventually(
        lambda: (
            json.loads(served.ok("tasks", "get", forever, "-o", "json"))["state"] == "TASK_STATE_RUNNING"
            if served.cli("tasks", "get", forever).returncode == 0
            else None
        ),
        what="the run-forever task to be RUNNING",
    )
    listed = json.loads(served.ok("tasks", "list", "--dag", dag, "--run", "r1", "-o", "json"))
    assert sorted(t["key"]["task_id"] for t in listed["tasks"]) == ["extract", "forever"]
    table = served.ok("tasks", "list", "--dag", dag)
    assert f"{dag}/forever/r1/1" in table
    assert "running" in table

    cancelled = json.loads(served.ok("tasks", "cancel", forever, "-o", "json"))
    assert cancelled["tasks"][0]["key"]["task_id"] == "forever"

    # Watch replays from the start and exits once both tasks are terminal: each exactly once.
    lines = served.ok("tasks", "watch", "--dag", dag, "--until-done", "-o", "json").splitlines()
    final = {}
    for line in lines:
        change = json.loads(line)
        final[change["task"]["key"]["task_id"]] = change["task"]["state"]
    assert final == {"extract": "TASK_STATE_SUCCEEDED", "forever": "TASK_STATE_REVOKED"}
    terminal = [json.loads(line)["task"]["state"] for line in lines]
    assert terminal.count("TASK_STATE_REVOKED") == 1
    assert terminal.count("TASK_STATE_SUCCEEDED") == 1
    summary = served.ok("tasks", "watch", "--dag", dag, "--until-done")
    assert "2/2 done" in summary

    # A run's cancel finds nothing left to cancel: both tasks already ended.
    assert "cancelled 0 task(s)" in served.ok("tasks", "cancel", "--dag", dag, "--run", "r1")


def test_server_errors_name_the_field(served: Served) -> None:
    bad = "key: {dag_id: d, task_id: t, run_id: r, try_number: 100001}\ncommand: [x]\n"
    result = served.cli("tasks", "launch", "-f", "-", stdin=bad)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr
    assert "key.try_number" in result.stderr
    assert "Traceback" not in result.stderr
    missing = served.cli("tasks", "get", f"nope{uuid.uuid4().hex[:6]}/t/r")
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr


def _readme_grpcurl_commands() -> list[str]:
    """The README's grpcurl example, as lines of shell."""
    readme = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "grpcurl" in b)
    return [line for line in block.splitlines() if not line.startswith(".venv/bin/python")]


def test_readme_grpcurl_example_works_against_serve(served: Served) -> None:
    connection = served.connection
    dag = f"readme{uuid.uuid4().hex[:8]}"
    script = "\n".join(_readme_grpcurl_commands())
    # The README's defaults (port 50051, the `schedulers/me` certificate) become this serve's.
    script = script.replace("localhost:50051", connection.launcher)
    script = re.sub(
        r"T=\"[^\"]*\"",
        f'T="--cacert {connection.ca} --cert {connection.cert} --key {connection.key}"',
        script,
    )
    script = script.replace('"dag_id":"etl"', f'"dag_id":"{dag}"')
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "shepherd.v1.LauncherService" in result.stdout
    assert "grpc.reflection.v1.ServerReflection" in result.stdout
    assert json.loads(result.stdout[result.stdout.index("{") :])["launch"]["key"]["dag_id"] == dag


def test_reflection_serves_v1_and_v1alpha(served: Served) -> None:
    connection = served.connection
    with channels.sync_channel(connection.launcher, connection.credentials()) as channel:
        for package in ("grpc.reflection.v1", "grpc.reflection.v1alpha"):
            # v1 and v1alpha messages are the same on the wire; only the service name differs.
            call = channel.stream_stream(
                f"/{package}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            replies = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            names = {s.name for s in replies[0].list_services_response.service}
            assert "shepherd.v1.LauncherService" in names, package
            assert "grpc.reflection.v1.ServerReflection" in names, package


def test_ctrl_c_stops_everything_and_removes_the_connection_file(served: Served) -> None:
    os.killpg(served.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    assert served.proc.wait(timeout=60) == 0
    assert not served.connection_path.exists()
    assert "stopping" in served.out_path.read_text()
    for name in ("launcher", "watcher", "reconciler"):  # each port is free again: its service exited
        host, _, port = served.connection.address(name).rpartition(":")
        with socket.socket() as sock:
            # SO_REUSEADDR: closed connections in TIME_WAIT do not count, a listener still would.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, int(port)))


def test_serve_killed_with_9_leaves_no_service_behind(served: Served) -> None:
    """A supervisor or an OOM kill ends serve without its Ctrl-C path: its services must not
    outlive it, or they keep the ports and attach to the next cluster started on the same ones."""
    os.kill(served.proc.pid, signal.SIGKILL)  # serve alone, not its process group
    served.proc.wait(timeout=30)
    for name in ("launcher", "watcher", "reconciler"):
        host, _, port = served.connection.address(name).rpartition(":")

        def freed(host: str = host, port: str = port) -> bool:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, int(port)))
                except OSError:
                    return False
                return True

        eventually(freed, what=f"the {name} to exit after serve was killed", timeout=60)
