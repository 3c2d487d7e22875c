"""What the Airflow demo shows, from the task instances Airflow's REST API returns: a progress line
while the DAG runs, and at the end each task's state with where to read its log (the Airflow UI
and `shepherd tasks logs`). Pure: demo/airflow.py fetches, this module formats."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

# Airflow's task-instance states in the order a task goes through them; anything else after.
ORDER = (
    "scheduled",
    "queued",
    "running",
    "up_for_retry",
    "success",
    "failed",
    "upstream_failed",
    "skipped",
)
FINISHED = frozenset({"success", "failed", "upstream_failed", "skipped", "removed"})


def state_of(ti: Mapping[str, Any]) -> str:
    return str(ti.get("state") or "none")


def label(ti: Mapping[str, Any]) -> str:
    index = ti.get("map_index", -1)
    return str(ti["task_id"]) + (f"[{index}]" if index is not None and index >= 0 else "")


def progress_line(elapsed_s: float, run_state: str, tis: Sequence[Mapping[str, Any]]) -> str:
    """`[  12.0s] run running  5 task instances: queued=1 running=2 success=2`."""
    counts = Counter(state_of(ti) for ti in tis)
    ranked = [s for s in ORDER if counts[s]] + sorted(s for s in counts if s not in ORDER)
    parts = " ".join(f"{s}={counts[s]}" for s in ranked)
    return f"[{elapsed_s:6.1f}s] run {run_state:<8} {len(tis)} task instances: {parts}"


def ui_url(api_url: str, dag_id: str, run_id: str, ti: Mapping[str, Any]) -> str:
    """The task instance's page in the Airflow UI (its log is the page's Logs tab)."""
    base = f"{api_url.rstrip('/')}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
    url = f"{base}/tasks/{quote(str(ti['task_id']), safe='')}"
    index = ti.get("map_index", -1)
    return f"{url}/mapped/{index}" if index is not None and index >= 0 else url


def shepherd_key(dag_id: str, run_id: str, ti: Mapping[str, Any]) -> str:
    """The task's key as `shepherd tasks logs` takes it: dag/task/run/try[/map_index]."""

    def part(value: str) -> str:
        return value.replace("%", "%25").replace("/", "%2F")

    key = f"{part(dag_id)}/{part(str(ti['task_id']))}/{part(run_id)}/{int(ti.get('try_number') or 1)}"
    index = ti.get("map_index", -1)
    return f"{key}/{index}" if index is not None and index >= 0 else key


@dataclass(frozen=True)
class Row:
    task: str
    state: str
    tries: int
    seconds: float | None
    ui: str
    shepherd: str  # the key, or "" for a task that never ran (nothing was launched)


def summary_rows(api_url: str, dag_id: str, run_id: str, tis: Sequence[Mapping[str, Any]]) -> list[Row]:
    rows = []
    for ti in sorted(tis, key=lambda t: (str(t.get("start_date") or "~"), label(t))):
        started, ended = _time(ti.get("start_date")), _time(ti.get("end_date"))
        ran = started is not None
        rows.append(
            Row(
                task=label(ti),
                state=state_of(ti),
                tries=int(ti.get("try_number") or 0),
                seconds=round((ended - started).total_seconds(), 1) if started and ended else None,
                ui=ui_url(api_url, dag_id, run_id, ti),
                shepherd=shepherd_key(dag_id, run_id, ti) if ran else "",
            )
        )
    return rows


def _time(text: Any) -> datetime | None:
    return datetime.fromisoformat(str(text).replace("Z", "+00:00")) if text else None


def readable_log(text: str, last: int = 6) -> list[str]:
    """The last `last` lines of a task's structured log as messages: each line's event (Airflow's
    REST API gives `event {fields}`, the container's own log a JSON object with `event`), with an
    exception's type and message, and without the log-group markers."""
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        start = line.find("{")
        fields: Any = None
        if start >= 0:
            try:
                fields = json.loads(line[start:])
            except ValueError:
                fields = None
        if not isinstance(fields, dict):
            message = line
        else:
            message = line[:start].strip() if start > 0 else str(fields.get("event", ""))
            for detail in fields.get("error_detail") or []:
                if isinstance(detail, dict):
                    message += f": {detail.get('exc_type')}: {detail.get('exc_value')}"
        if message and not message.startswith(("::group::", "::endgroup::")):
            lines.append(message)
    return lines[-last:]
