"""The Airflow comparison's plumbing (bench/airflow.py) on a tiny DAG: a phase of each kind runs the
fan-out DAG of 2 mapped tasks through a real Airflow and yields figures that match what happened.
No timing is asserted: only that the run is measured (every task instance, every pod and its
deletes, by whom) and that nothing is left behind.

Each phase starts a whole Airflow (PostgreSQL, migrations, API server, DAG processor, scheduler)
and runs three real pods, a few minutes on the 2-core machine.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from bench import airflow as comparison
from controlplane import Cluster, ClusterInfo, airflowk8s
from controlplane.airflow import ExecutorKind
from controlplane.kubeapi import ApiError
from tests.helpers.audit import RECONCILER

pytestmark = [pytest.mark.integration, pytest.mark.airflow, pytest.mark.timeout(2400)]

TASKS = 2  # mapped tasks; the DAG's seed task makes it 3 task instances


def namespace_exists(name: str) -> bool:
    try:
        Cluster()._admin().request("GET", f"/api/v1/namespaces/{name}")
    except ApiError as err:
        if err.status == 404:
            return False
        raise
    return True


@pytest.mark.parametrize(
    "phase",
    [
        comparison.Phase("KubernetesExecutor tuned", ExecutorKind.KUBERNETES, tuned=True),
        comparison.Phase("Shepherd", ExecutorKind.SHEPHERD),
    ],
    ids=["kubernetes-executor-tuned", "shepherd"],
)
def test_a_phase_measures_every_task_and_every_pod_of_its_run(
    phase: comparison.Phase, cluster: ClusterInfo, real_node: str, tmp_path: Path
) -> None:
    local = Cluster()
    k8s = airflowk8s.prepare(local, tmp_path, namespace=f"airflow-k8s-{uuid.uuid4().hex[:6]}")
    try:
        figures = comparison.run_phase(phase, cluster, tmp_path / "phase", k8s, tasks=TASKS, parallelism=4)
    finally:
        airflowk8s.remove(local, k8s.namespace)
    assert not namespace_exists(k8s.namespace)

    assert figures["all_succeeded"], figures["states"]
    assert figures["tasks"] == TASKS + 1
    assert figures["queued_to_running_n"] == TASKS + 1
    assert figures["seconds_to_all_done"] > 0
    # One pod per task instance, every one deleted; the deletes counted are every client's.
    assert figures["pods_created"] == TASKS + 1
    assert figures["pods_never_deleted"] == 0
    by_client = figures["delete_calls_by_client"]
    assert sum(by_client.values()) == figures["delete_calls"]
    assert figures["delete_calls_per_pod"] == round(figures["delete_calls"] / (TASKS + 1), 2)
    assert figures["pods_left_after_180s"] == 0
    assert figures["scheduler_cpu_s"] > 0
    if phase.executor is ExecutorKind.SHEPHERD:
        # Shepherd's reconciler deletes each pod exactly once.
        assert by_client[RECONCILER] == TASKS + 1, by_client
        assert figures["namespace"] == cluster.namespace
        assert figures["services_cpu_s"] > 0
        assert figures["scheduler_side_cpu_s"] > figures["scheduler_cpu_s"]
    else:
        # The KubernetesExecutor deletes with its own identity, at least once per pod (it was
        # seen deleting a pod three times, twice answered 404).
        assert by_client[k8s.user] >= TASKS + 1, by_client
        assert figures["namespace"] == k8s.namespace
        assert figures["kubernetes_executor_options"]["worker_pods_creation_batch_size"] == "128"
        assert figures["services_cpu_s"] is None
