"""TaskKey builders shared by unit and integration tests."""

from __future__ import annotations

from shepherd.v1 import task_pb2


def task_key(
    dag_id: str = "etl_daily",
    task_id: str = "extract",
    run_id: str = "scheduled__2026-11-21T00:00:00+00:00",
    try_number: int = 1,
    map_index: int = -1,
    resumption: int = 0,
) -> task_pb2.TaskKey:
    return task_pb2.TaskKey(
        dag_id=dag_id,
        task_id=task_id,
        run_id=run_id,
        try_number=try_number,
        map_index=map_index,
        resumption=resumption,
    )
