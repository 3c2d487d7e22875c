"""The operator CLI's pure parts: task keys on a command line, task files, output, error text."""

from __future__ import annotations

import json
import tomllib
from datetime import UTC, datetime
from importlib import import_module
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from click.testing import CliRunner
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, error_details_pb2, status_pb2
from rich.console import Console

from shepherd.v1 import task_pb2
from shepherd_cli import output
from shepherd_cli.connection import Connection, ConnectionFileError
from shepherd_cli.errors import describe_rpc_error
from shepherd_cli.keys import KeySyntaxError, format_key, parse_key
from shepherd_cli.main import cli, parse_since
from shepherd_cli.taskfile import TaskFileError, parse_task_file

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("etl/extract/r1", ("etl", "extract", "r1", 1, -1)),
        ("etl/extract/r1/3", ("etl", "extract", "r1", 3, -1)),
        ("etl/extract/r1/3/7", ("etl", "extract", "r1", 3, 7)),
        (
            "etl/extract/manual__2026-01-01T00:00:00+00:00",
            ("etl", "extract", "manual__2026-01-01T00:00:00+00:00", 1, -1),
        ),
        ("a%2Fb/t/r%25x", ("a/b", "t", "r%x", 1, -1)),
    ],
)
def test_task_keys_parse(text: str, expected: tuple[str, str, str, int, int]) -> None:
    key = parse_key(text)
    assert (key.dag_id, key.task_id, key.run_id, key.try_number, key.map_index) == expected
    assert parse_key(format_key(key)) == key  # every printed key can be pasted back


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("etl/extract", "expected dag/task/run"),
        ("a/b/c/1/2/3/4", "expected dag/task/run"),
        ("etl/t/r1/1/-1/z", "the resumption part 'z'"),
        ("etl/t/r1/1/-1/-1", "the resumption part '-1'"),
        ("etl//r1", "the task part is empty"),
        ("etl/t/r1/one", "the try part 'one' is not an integer"),
        ("etl/t/r1/1/x", "the map_index part 'x'"),
    ],
)
def test_bad_task_keys_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(KeySyntaxError, match=problem):
        parse_key(text)


def test_format_key_leaves_out_an_unmapped_index() -> None:
    key = task_pb2.TaskKey(dag_id="d", task_id="t", run_id="r/1", try_number=2, map_index=-1)
    assert format_key(key) == "d/t/r%2F1/2"
    key.map_index = 0
    assert format_key(key) == "d/t/r%2F1/2/0"


def test_task_file_documents_become_requests() -> None:
    requests = parse_task_file(
        """
key: etl/extract/r1
command: [python, -m, etl.extract, 3]
pod_override: {metadata: {annotations: {team: data}}}
---
key: {dag_id: etl, task_id: load, run_id: r1, map_index: 2}
command: [echo]
template_name: small
"""
    )
    assert [format_key(r.key) for r in requests] == ["etl/extract/r1/1", "etl/load/r1/1/2"]
    assert list(requests[0].command) == ["python", "-m", "etl.extract", "3"]
    assert yaml.safe_load(requests[0].pod_override_yaml) == {"metadata": {"annotations": {"team": "data"}}}
    assert requests[1].template_name == "small"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "describes no task"),
        ("[1, 2]", "document 1: expected a mapping"),
        ("key: a/b/c\ncommand: x", "command must be a list"),
        ("key: a/b/c\ncommand: [x]\ncomand: [y]", "unknown field 'comand'"),
        ("command: [x]", "key is required"),
        ("key: {dag: a}\ncommand: [x]", "key has unknown field 'dag'"),
        ("key: a/b\ncommand: [x]", "key: 'a/b' is not a task key"),
        ("key: a/b/c\ncommand: [x]\n---\nkey: a/b/d\ncommand: [x]\ntemplate: 3", "document 2: template"),
    ],
)
def test_bad_task_files_name_the_document_and_field(text: str, problem: str) -> None:
    with pytest.raises(TaskFileError, match=problem):
        parse_task_file(text)


def _stamp(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _task(task_id: str, state: task_pb2.TaskState.ValueType, **extra: Any) -> task_pb2.Task:
    key = task_pb2.TaskKey(dag_id="etl", task_id=task_id, run_id="r1", try_number=1, map_index=-1)
    return task_pb2.Task(key=key, state=state, pod_name=f"etl-{task_id}-0", **extra)


def test_tasks_table_shows_keys_states_ages_and_failures() -> None:
    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    failure = task_pb2.FailureDetails(reason="PodFailed", message="exit code 3")
    tasks = [
        _task(
            "a",
            task_pb2.TASK_STATE_RUNNING,
            queued_time=_stamp(datetime(2026, 12, 1, 11, 59, 30, tzinfo=UTC)),
        ),
        _task("b", task_pb2.TASK_STATE_FAILED, failure=failure),
    ]
    console = Console(record=True, width=200)
    console.print(output.tasks_table(tasks, now=now))
    text = console.export_text()
    assert "etl/a/r1/1" in text
    assert "running" in text
    assert "30s ago" in text
    assert "etl/b/r1/1" in text
    assert "failed" in text
    assert "PodFailed: exit code 3" in text


def test_progress_counts_terminal_states() -> None:
    states = [task_pb2.TASK_STATE_RUNNING, task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_REVOKED]
    assert output.progress(states) == "2/3 done  running=1 succeeded=1 revoked=1"


def test_machine_output_uses_the_proto_field_names() -> None:
    task = _task("a", task_pb2.TASK_STATE_SUCCEEDED)
    as_json = json.loads(output.render_data(output.to_dict(task), output.Format.JSON))
    assert as_json["key"]["task_id"] == "a"
    assert as_json["state"] == "TASK_STATE_SUCCEEDED"
    assert yaml.safe_load(output.render_data(output.to_dict(task), output.Format.YAML)) == as_json
    change = task_pb2.TaskStateChange(cursor=7, task=task)
    line = output.render_change(change, output.Format.JSON)
    assert "\n" not in line
    assert json.loads(line)["cursor"] == "7"


def test_state_names_round_trip() -> None:
    for name in output.STATE_NAMES:
        assert output.state_name(output.parse_state(name)) == name


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400)])
def test_since_durations(text: str, seconds: int) -> None:
    assert parse_since(text).total_seconds() == seconds


class _FailedCall(grpc.RpcError):  # type: ignore[misc]
    """What a failed call looks like to a client: code, details and the status trailer."""

    def __init__(self, status: status_pb2.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return {code_pb2.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT}[self._status.code]

    def details(self) -> str:
        return str(self._status.message)

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return (("grpc-status-details-bin", self._status.SerializeToString()),)


def test_server_errors_show_every_bad_field() -> None:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="key.try_number", description="must be >= 1"),
            error_details_pb2.BadRequest.FieldViolation(field="command[0]", description="is empty"),
        ]
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="2 bad fields")
    status.details.add().Pack(bad)
    assert describe_rpc_error(_FailedCall(status)) == [
        "INVALID_ARGUMENT: 2 bad fields",
        "  key.try_number: must be >= 1",
        "  command[0]: is empty",
    ]


def test_connection_file_round_trips_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "connection.json"
    written = Connection("h:1", "h:2", "h:3", executor_id="e", ca="/ca", cert="/c", key="/k", identity="id")
    written.write(path)
    assert Connection.read(path) == written
    assert path.stat().st_mode & 0o077 == 0
    assert written.credentials().cert == Path("/c")
    with pytest.raises(ConnectionFileError, match="shepherd serve"):
        Connection.read(tmp_path / "missing.json")
    path.write_text('{"launcher": "h:1"}')
    with pytest.raises(ConnectionFileError, match="lacks watcher, reconciler, executor_id"):
        Connection.read(path)


def test_console_script_is_declared_and_importable() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["shepherd"].partition(":")
    assert callable(getattr(import_module(module), function))


def test_help_shows_the_program_name_and_real_defaults() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["serve", "--help"], prog_name="shepherd")
    assert result.exit_code == 0
    assert "Usage: shepherd serve" in result.output
    for default in ("default: 50051", "default: 50052", "default: 50053", "default: shepherd"):
        assert default in result.output
    listing = runner.invoke(cli, ["tasks", "list", "--help"], prog_name="shepherd").output
    assert "default: table" in listing
    assert "default: 100" in listing


def test_missing_connection_file_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["--connection", str(tmp_path / "none.json"), "status"], prog_name="shepherd"
    )
    assert result.exit_code == 1
    assert "no connection file" in result.output
    assert "Traceback" not in result.output


def test_task_detail_lists_the_failed_pods_events() -> None:
    failure = task_pb2.FailureDetails(reason="FatalContainerState", message="cannot start")
    failure.events.add(
        type="Normal", reason="Scheduled", message="assigned", count=1, source="default-scheduler"
    )
    failure.events.add(type="Warning", reason="Failed", message="no such image", count=3, source="kubelet")
    console = Console(record=True, width=200)
    console.print(output.task_detail(_task("c", task_pb2.TASK_STATE_FAILED, failure=failure)))
    text = console.export_text()
    assert "Normal Scheduled (default-scheduler): assigned" in text
    assert "Warning Failed x3 (kubelet): no such image" in text
