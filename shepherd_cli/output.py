"""How tasks and other results look on a terminal (tables) and to scripts (JSON, YAML).

Pure: messages in, Rich renderables or text out, so the formatting is tested without a server.
Machine output is the proto3 JSON mapping (field names as in the protos, enums by name), the
same shape grpcurl prints, so a script can switch between them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.table import Table
from rich.text import Text

from shepherd.taskstates import TERMINAL, state_name

__all__ = ["Format", "render_change", "render_data", "state_name", "tasks_table", "to_dict"]
from shepherd.v1 import task_pb2
from shepherd_cli.keys import format_key


class Format(StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


_STATE_STYLES: dict[int, str] = {
    task_pb2.TASK_STATE_QUEUED: "cyan",
    task_pb2.TASK_STATE_RUNNING: "blue",
    task_pb2.TASK_STATE_SUCCEEDED: "green",
    task_pb2.TASK_STATE_FAILED: "red",
    task_pb2.TASK_STATE_UP_FOR_RESCHEDULE: "yellow",
    task_pb2.TASK_STATE_REVOKED: "magenta",
    task_pb2.TASK_STATE_ADOPTED: "cyan",
}


def parse_state(name: str) -> task_pb2.TaskState.ValueType:
    return task_pb2.TaskState.Value("TASK_STATE_" + name.upper().replace("-", "_"))


STATE_NAMES = [state_name(value) for value in task_pb2.TaskState.values() if value]


def is_terminal(state: int) -> bool:
    return state in TERMINAL


def to_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def render_data(data: Any, fmt: Format) -> str:
    """Dicts/lists (already converted from messages) as JSON or YAML text."""
    if fmt is Format.YAML:
        return yaml.safe_dump(data, sort_keys=False).rstrip("\n")
    return json.dumps(data, indent=2)


def render_change(change: task_pb2.TaskStateChange, fmt: Format) -> str:
    """One streamed change: a JSON line (so `jq` can follow the stream), or a YAML document."""
    data = to_dict(change)
    if fmt is Format.YAML:
        return "---\n" + render_data(data, fmt)
    return json.dumps(data, separators=(",", ":"))


def _time(stamp: Timestamp, now: datetime | None) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    when = stamp.ToDatetime(tzinfo=UTC)
    if now is None:
        return when.strftime("%Y-%m-%d %H:%M:%S")
    return f"{_ago(now - when)} ago"


def _ago(delta: Any) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def failure_summary(task: task_pb2.Task) -> str:
    if not task.HasField("failure"):
        return ""
    failure = task.failure
    return f"{failure.reason}: {failure.message}" if failure.message else failure.reason


def styled_state(state: int) -> Text:
    return Text(state_name(state), style=_STATE_STYLES.get(state, ""))


def tasks_table(
    tasks: Iterable[task_pb2.Task], *, now: datetime | None = None, title: str | None = None
) -> Table:
    """One row per task; `now` turns times into ages ("12s ago")."""
    table = Table(title=title, show_edge=False, header_style="bold")
    for column in ("KEY", "STATE", "POD", "QUEUED", "ENDED"):
        table.add_column(column, no_wrap=True)
    table.add_column("FAILURE", overflow="fold")
    for task in tasks:
        table.add_row(
            format_key(task.key),
            styled_state(task.state),
            task.pod_name,
            _time(task.queued_time, now),
            _time(task.end_time, now),
            failure_summary(task),
        )
    return table


def task_detail(task: task_pb2.Task) -> Table:
    """One task as field/value rows, failure details included."""
    table = Table(show_header=False, show_edge=False, box=None)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows: list[tuple[str, str | Text]] = [
        ("key", format_key(task.key)),
        ("state", styled_state(task.state)),
        ("namespace", task.namespace),
        ("pod", task.pod_name),
        ("executor", task.executor_id),
        ("launch attempts", str(task.launch_attempts)),
        ("queued", _time(task.queued_time, None)),
        ("started", _time(task.start_time, None)),
        ("ended", _time(task.end_time, None)),
    ]
    if task.HasField("failure"):
        failure = task.failure
        rows += [("failure", failure_summary(task))]
        if failure.pod_phase or failure.pod_reason:
            rows.append(("pod status", " ".join(filter(None, (failure.pod_phase, failure.pod_reason)))))
        if failure.HasField("container"):
            c = failure.container
            rows.append(("container", f"{c.name} {c.reason} exit={c.exit_code}".strip()))
        for event in failure.events:  # the pod's recent Kubernetes Events, oldest first
            count = f" x{event.count}" if event.count > 1 else ""
            rows.append(("event", f"{event.type} {event.reason}{count} ({event.source}): {event.message}"))
    for name, value in rows:
        if value:
            table.add_row(name, value)
    return table


def progress(states: Sequence[int]) -> str:
    """`3/5 done  running=1 queued=1 succeeded=3`: terminal count first, then every state present."""
    counts = Counter(states)
    done = sum(n for state, n in counts.items() if is_terminal(state))
    parts = [f"{state_name(state)}={counts[state]}" for state in sorted(counts)]
    return f"{done}/{len(states)} done  " + " ".join(parts)
