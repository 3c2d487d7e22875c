"""What the Airflow demo prints: progress, each task's state and where its log is."""

from __future__ import annotations

from typing import Any

from demo.airflowview import progress_line, readable_log, shepherd_key, summary_rows, ui_url
from shepherd_cli.keys import parse_key

RUN = "manual__2026-12-01T22:00:00+00:00"


def ti(
    task_id: str, state: str | None, *, map_index: int = -1, tries: int = 1, **times: str
) -> dict[str, Any]:
    return {"task_id": task_id, "state": state, "map_index": map_index, "try_number": tries, **times}


def test_progress_counts_states_in_the_order_a_task_goes_through_them() -> None:
    tis = [ti("a", "success"), ti("b", "running"), ti("c", None), ti("d", "queued"), ti("e", "running")]
    assert progress_line(3.25, "running", tis) == (
        "[   3.2s] run running  5 task instances: queued=1 running=2 success=1 none=1"
    )


def test_the_ui_link_names_the_run_and_the_mapped_instance() -> None:
    assert ui_url("http://127.0.0.1:8080/", "etl", RUN, ti("load", "success")) == (
        "http://127.0.0.1:8080/dags/etl/runs/manual__2026-12-01T22%3A00%3A00%2B00%3A00/tasks/load"
    )
    assert ui_url("http://h:1", "etl", "r1", ti("transform", "success", map_index=2)).endswith(
        "/runs/r1/tasks/transform/mapped/2"
    )


def test_the_shepherd_key_is_what_the_cli_parses_back() -> None:
    key = parse_key(shepherd_key("etl", RUN, ti("transform", "success", map_index=3, tries=2)))
    assert (key.dag_id, key.task_id, key.run_id, key.try_number, key.map_index) == (
        "etl",
        "transform",
        RUN,
        2,
        3,
    )
    assert shepherd_key("etl", "a/b", ti("load", "success")) == "etl/load/a%2Fb/1"


def test_summary_rows_in_start_order_and_no_shepherd_key_for_a_task_that_never_ran() -> None:
    tis = [
        ti("report", "success", start_date="2026-12-01T22:00:09Z", end_date="2026-12-01T22:00:10.5Z"),
        ti("extract", "success", start_date="2026-12-01T22:00:01Z", end_date="2026-12-01T22:00:03Z"),
        ti("load", "upstream_failed", tries=0),
    ]
    rows = summary_rows("http://h:1", "etl", "r1", tis)
    assert [r.task for r in rows] == ["extract", "report", "load"]
    assert [r.seconds for r in rows] == [2.0, 1.5, None]
    assert rows[0].shepherd == "etl/extract/r1/1"
    assert rows[2].shepherd == ""


def test_a_structured_log_reads_as_its_messages_with_the_exception() -> None:
    error = '"error_detail": [{"exc_type": "RuntimeError", "exc_value": "stale feed"}]'
    through_airflow = "\n".join(
        [
            'checking the feed... {"logger": "task.stdout"}',
            '::endgroup:: {"try_number": 1}',
            "Task failed with exception {" + error + "}",
            "plain text",
        ]
    )
    assert readable_log(through_airflow) == [
        "checking the feed...",
        "Task failed with exception: RuntimeError: stale feed",
        "plain text",
    ]
    from_the_container = "\n".join(
        [
            '{"event": "::group::Post Execute", "level": "info"}',
            '{"event": "Task failed with exception", ' + error + "}",
            '{"event": "Workload finished", "final_state": "failed"}',
        ]
    )
    assert readable_log(from_the_container, last=1) == ["Workload finished"]
    assert readable_log(from_the_container)[0] == "Task failed with exception: RuntimeError: stale feed"
