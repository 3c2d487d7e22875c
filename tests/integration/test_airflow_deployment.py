"""A real Airflow 3.3.2 on Shepherd: scheduler, DAG processor and API server (controlplane/airflow.py)
with the ShepherdExecutor, a PostgreSQL metadata database, and the tasks running in real pods on the
real node from the worker image built on the machine. The DAGs are integrations/airflow/dags.

What is checked is what Airflow itself says (each task instance's state and try number, each
try's log through the REST API, the run's state), and the API server's audit log for the pods
(one create per task-instance try; the pod of a task marked failed while running deleted).

Slow on a fresh machine: the Airflow virtualenv (about 4 minutes) and the worker image (pip install
of Airflow in a buildah build, several minutes) are built once and cached outside the checkout;
after that the module takes a few minutes (every task starts Python and Airflow in a pod).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import Cluster, ClusterInfo
from controlplane.airflow import (
    TERMINAL_TASK_STATES,
    AirflowDeployment,
    ShepherdConnection,
    TaskInstance,
    TaskState,
)
from controlplane.stack import ServiceStack
from shepherd import podmeta
from tests.helpers import eventually, task_key
from tests.helpers.audit import RECONCILER, AuditLog

# Building the virtualenv and the worker image on a fresh machine counts towards the first test.
pytestmark = [pytest.mark.integration, pytest.mark.airflow, pytest.mark.timeout(2400)]
# States a task waited for as running must not pass through unseen (so the wait fails at once).
ENDED = {TaskState.UP_FOR_RETRY, *TERMINAL_TASK_STATES}


@pytest.fixture(scope="module")
def services(
    cluster: ClusterInfo, real_node: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceStack]:
    """Shepherd's services for this Airflow, with a pending timeout a real pod start fits in."""
    stack = ServiceStack(
        cluster,
        tmp_path_factory.mktemp("airflow-stack"),
        executor_id=f"airflow-{uuid.uuid4().hex[:8]}",
        flags={"reconciler": ["--pending-timeout-s", "300"]},
    )
    stack.start()
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def airflow(
    cluster: ClusterInfo, services: ServiceStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AirflowDeployment]:
    with AirflowDeployment(
        cluster,
        tmp_path_factory.mktemp("airflow"),
        shepherd=ShepherdConnection.of_stack(services),
        parallelism=8,
    ) as deployment:
        yield deployment


def pod_of(dag_id: str, run_id: str, task_id: str, try_number: int = 1, map_index: int = -1) -> str:
    """The pod Shepherd makes for one task-instance try (its name is a function of the key)."""
    return podmeta.pod_name(task_key(dag_id, task_id, run_id, try_number, map_index))


def outcome(tis: list[TaskInstance]) -> dict[tuple[str, int], tuple[str | None, int]]:
    return {(ti.task_id, ti.map_index): (ti.state, ti.try_number) for ti in tis}


def pod_exists(name: str, namespace: str) -> bool:
    from controlplane.kubeapi import ApiError

    try:
        Cluster()._admin().request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
    except ApiError as err:
        if err.status == 404:
            return False
        raise
    return True


def test_a_dag_of_every_kind_of_task_ends_as_airflow_would_end_it(
    airflow: AirflowDeployment, cluster: ClusterInfo
) -> None:
    dag = "shepherd_checks"
    audit = AuditLog.from_now(Path(Cluster().audit_log))
    run = airflow.trigger(dag, f"checks_{uuid.uuid4().hex[:8]}")

    # The long task runs until a user marks it failed, as from the UI.
    long = airflow.wait_for_task(dag, run, "long", {TaskState.RUNNING, *ENDED}, timeout=600)
    assert long.state == TaskState.RUNNING, long
    # Its code is running (its log says so, read through Airflow while it runs).
    eventually(
        lambda: "long is still running" in airflow.task_log(dag, run, "long", 1),
        what="the long task's code to run",
        timeout=600,
        interval=2.0,
    )
    airflow.mark_failed(dag, run, "long")
    assert airflow.wait_for_run(dag, run, timeout=900) == "failed"

    # Each instance's end as Airflow gives it: successes in one try, the flaky task failed after
    # its one retry, the mapped instances each once, the long task failed in its first try with
    # its two retries unused.
    assert outcome(airflow.task_instances(dag, run)) == {
        ("hello", -1): ("success", 1),
        ("square", 0): ("success", 1),
        ("square", 1): ("success", 1),
        ("flaky", -1): ("failed", 2),
        ("override", -1): ("success", 1),
        ("long", -1): ("failed", 1),
    }

    # Every try's log, through Airflow's API server, after its pod is gone.
    assert "hello from a Shepherd worker pod" in airflow.task_log(dag, run, "hello", 1)
    assert "square of 1 is 1" in airflow.task_log(dag, run, "square", 1, map_index=0)
    assert "square of 2 is 4" in airflow.task_log(dag, run, "square", 1, map_index=1)
    for try_number in (1, 2):
        assert "flaky fails on purpose" in airflow.task_log(dag, run, "flaky", try_number)
    override_log = airflow.task_log(dag, run, "override", 1)
    assert "SHEPHERD_GREETING=hello from the pod_override" in override_log
    # The pod's memory limit, read by the task from its own cgroup: 700Mi, the override's.
    assert f"memory limit={700 * 1024 * 1024}" in override_log
    assert "long is still running" in airflow.task_log(dag, run, "long", 1)

    # One pod per task-instance try, each created once.
    pods = {
        pod_of(dag, run, "hello"),
        pod_of(dag, run, "square", map_index=0),
        pod_of(dag, run, "square", map_index=1),
        pod_of(dag, run, "flaky", 1),
        pod_of(dag, run, "flaky", 2),
        pod_of(dag, run, "override"),
        pod_of(dag, run, "long"),
    }
    assert dict(audit.creates(pods)) == dict.fromkeys(pods, 1)
    # The run is over, so nothing more is scheduled: the long task's pod was the only one for it.
    assert not audit.creates({pod_of(dag, run, "long", 2)})
    # The long task's pod stopped and was deleted by Shepherd.
    long_pod = pod_of(dag, run, "long")
    eventually(
        lambda: audit.calls("delete", {long_pod}, user=RECONCILER),
        what="the long pod's delete",
        timeout=300,
        interval=1.0,
    )
    eventually(
        lambda: not pod_exists(long_pod, cluster.namespace),
        what="the long pod to be gone",
        timeout=300,
        interval=1.0,
    )


def test_a_scheduler_killed_while_tasks_run_is_replaced_and_its_tasks_adopted(
    airflow: AirflowDeployment,
) -> None:
    dag = "shepherd_adoption"
    audit = AuditLog.from_now(Path(Cluster().audit_log))
    run = airflow.trigger(dag, f"adopt_{uuid.uuid4().hex[:8]}")
    for i in range(3):
        ti = airflow.wait_for_task(dag, run, "hold", {TaskState.RUNNING, *ENDED}, map_index=i, timeout=600)
        assert ti.state == TaskState.RUNNING, ti
    first = max(airflow.scheduler_job_ids())  # the scheduler that launched them

    # The tasks hold until released (below), so they are still running while the scheduler dies
    # without handing anything over and another starts.
    airflow.restart_scheduler()

    def adopted() -> bool:
        rows = airflow.sql(f"SELECT queued_by_job_id, state FROM task_instance WHERE run_id = '{run}'")
        return len(rows) == 3 and all(int(job) > first and state == "running" for job, state in rows)

    eventually(adopted, what="the new scheduler to adopt the running tasks", timeout=300, interval=1.0)
    airflow.set_variable(f"release_{run}", "go")
    assert airflow.wait_for_run(dag, run, timeout=600) == "success"

    assert outcome(airflow.task_instances(dag, run)) == {("hold", i): ("success", 1) for i in range(3)}
    for i in range(3):
        log = airflow.task_log(dag, run, "hold", 1, map_index=i)
        assert log.count(f"released {i}") == 1, log
    # None ran twice: one pod per instance, created once, and no pod for a second try.
    pods = {pod_of(dag, run, "hold", map_index=i) for i in range(3)}
    assert dict(audit.creates(pods)) == dict.fromkeys(pods, 1)
    assert not audit.creates({pod_of(dag, run, "hold", 2, map_index=i) for i in range(3)})
