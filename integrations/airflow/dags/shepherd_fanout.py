"""N short tasks (a mapped task over the run's `n` parameter): the shape of the executor
benchmark, the same DAG for the KubernetesExecutor and the Shepherd executor."""

from __future__ import annotations

from airflow.sdk import DAG, Param, get_current_context, task

with DAG(
    "shepherd_fanout",
    schedule=None,
    catchup=False,
    params={"n": Param(10, type="integer", minimum=1, maximum=1024)},
    tags=["shepherd"],
):

    @task
    def items() -> list[int]:
        return list(range(int(get_current_context()["params"]["n"])))

    @task
    def noop(i: int) -> int:
        return i

    noop.expand(i=items())
