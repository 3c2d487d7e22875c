"""The Airflow comparison's pure figures: task-instance timestamps, audit log entries, CPU ledgers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.airflow_figures import (
    CpuLedger,
    RunTimes,
    TaskTimes,
    descendants,
    pod_calls,
    pod_name_prefix,
    run_figures,
    side_by_side,
)
from controlplane.airflowk8s import KubernetesExecutorSetup, kubeconfig_for_token

T0 = datetime(2026, 12, 1, 22, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_task_times_come_from_the_rest_api_shape() -> None:
    mapped = TaskTimes.from_api(
        {
            "task_id": "short",
            "map_index": 7,
            "state": "success",
            "queued_when": "2026-12-01T22:00:01.500000Z",
            "start_date": "2026-12-01T22:00:03+00:00",
            "end_date": None,
        }
    )
    assert mapped.name == "short[7]"
    assert mapped.queued == at(1.5)
    assert mapped.started == at(3)
    assert mapped.ended is None
    plain = TaskTimes.from_api({"task_id": "seed", "map_index": -1, "state": None})
    assert (plain.name, plain.state, plain.queued) == ("seed", "none", None)


def test_run_figures_measure_from_the_run_start_to_the_last_task_end() -> None:
    tasks = tuple(
        TaskTimes(f"short[{i}]", "success", queued=at(i), started=at(i + 1 + i / 10), ended=at(i + 5))
        for i in range(10)
    )
    run = RunTimes(state="success", started=at(-0.5), ended=at(16), tasks=tasks)
    figures = run_figures(run)
    assert figures["seconds_to_all_done"] == 14.5  # the last task ends at 14 s
    assert figures["seconds_to_run_done"] == 16.5
    assert figures["all_succeeded"] is True
    # Latencies 1.0, 1.1, ..., 1.9 s, ranked as every benchmark figure (bench.common.percentile).
    assert figures["queued_to_running_p50_s"] == 1.5
    assert figures["queued_to_running_p99_s"] == 1.9
    assert figures["queued_to_running_n"] == 10


def test_a_task_that_never_ran_is_left_out_of_the_latency_and_fails_the_run() -> None:
    tasks = (
        TaskTimes("a", "success", queued=at(0), started=at(2), ended=at(3)),
        TaskTimes("b", "upstream_failed", queued=None, started=None, ended=None),
    )
    figures = run_figures(RunTimes(state="failed", started=at(0), ended=None, tasks=tasks))
    assert figures["queued_to_running_n"] == 1
    assert figures["all_succeeded"] is False
    assert figures["states"] == {"success": 1, "upstream_failed": 1}
    assert figures["seconds_to_run_done"] is None


def audit(verb: str, name: str, *, user: str, code: int, namespace: str = "ns") -> dict[str, Any]:
    return {
        "stage": "ResponseComplete",
        "verb": verb,
        "user": {"username": user},
        "objectRef": {"resource": "pods", "namespace": namespace, "name": name},
        "responseStatus": {"code": code},
    }


def test_pod_calls_count_every_client_deletes_of_the_runs_pods_only() -> None:
    entries = [
        audit("create", "bench-a-1", user="executor", code=201),
        audit("create", "bench-b-1", user="executor", code=201),
        audit("create", "bench-b-1", user="executor", code=409),  # a retried create: not a new pod
        audit("delete", "bench-a-1", user="executor", code=200),
        audit("delete", "bench-a-1", user="system:node:real-node-0", code=200),
        audit("delete", "bench-b-1", user="executor", code=200),
        audit("delete", "bench-b-1", user="executor", code=404),
        audit("delete", "bench-b-1", user="system:node:real-node-0", code=200),
        audit("delete", "other-x", user="executor", code=200),  # another DAG's pod
        audit("delete", "bench-c-1", user="executor", code=200, namespace="elsewhere"),
        {**audit("delete", "bench-a-1", user="executor", code=200), "stage": "ResponseStarted"},
        {
            **audit("delete", "bench-a-1", user="executor", code=200),
            "objectRef": {
                "resource": "pods",
                "namespace": "ns",
                "name": "bench-a-1",
                "subresource": "eviction",
            },
        },
    ]
    figures = pod_calls(entries, "ns", "bench-").figures()
    assert figures["pods_created"] == 2
    assert figures["delete_calls"] == 5
    assert figures["delete_calls_per_pod"] == 2.5
    assert figures["delete_calls_per_pod_max"] == 3
    assert figures["pods_never_deleted"] == 0
    assert figures["delete_calls_by_client"] == {"executor": 3, "system:node:real-node-0": 2}
    assert figures["delete_status_codes"] == {"200": 4, "404": 1}


def test_pod_calls_can_be_kept_to_the_runs_own_pod_names() -> None:
    entries = [
        audit("create", "bench-a-1", user="e", code=201),
        audit("create", "bench-a-2", user="e", code=201),  # another run's pod in the same namespace
        audit("delete", "bench-a-1", user="e", code=200),
        audit("delete", "bench-a-2", user="e", code=200),
    ]
    figures = pod_calls(entries, "ns", "bench-", names={"bench-a-1"}).figures()
    assert (figures["pods_created"], figures["delete_calls"]) == (1, 1)


def test_a_pod_never_deleted_is_counted() -> None:
    entries = [
        audit("create", "bench-a-1", user="e", code=201),
        audit("create", "bench-a-2", user="e", code=201),
    ]
    entries.append(audit("delete", "bench-a-1", user="e", code=200))
    figures = pod_calls(entries, "ns", "bench-").figures()
    assert (figures["delete_calls_per_pod"], figures["pods_never_deleted"]) == (0.5, 1)


def test_pod_name_prefix_is_what_both_executors_put_first() -> None:
    assert pod_name_prefix("shepherd_bench") == "shepherd-bench-"
    assert pod_name_prefix("My.Dag") == "my-dag-"


def test_descendants_follow_the_parent_links_only_below_the_root() -> None:
    parents = {1: 0, 10: 1, 11: 10, 12: 10, 13: 11, 20: 1, 21: 20}
    assert descendants(parents, 10) == {10, 11, 12, 13}
    assert descendants(parents, 21) == {21}
    assert descendants(parents, 99) == set()  # gone


def test_the_ledger_counts_new_processes_from_zero_and_never_counts_a_process_twice() -> None:
    ledger = CpuLedger()
    ledger.start({(1, 100): ("scheduler", 50.0), (2, 200): ("watcher", 3.0)})
    ledger.observe({(1, 100): ("scheduler", 52.5), (2, 200): ("watcher", 3.5), (3, 300): ("manager", 0.4)})
    # pid 2 exits; pid 2 is reused by another process, which counts from zero.
    ledger.observe({(1, 100): ("scheduler", 54.0), (3, 300): ("manager", 0.6), (2, 900): ("watcher", 0.2)})
    assert ledger.used() == 4.0 + 0.5 + 0.6 + 0.2
    assert ledger.used_by_name() == {"scheduler": 4.0, "watcher": 0.7, "manager": 0.6}


def test_the_table_shows_each_figure_with_its_ratio_to_the_baseline() -> None:
    phases = {
        "k8s defaults": {"seconds_to_all_done": 200.0, "delete_calls_per_pod": 2.0, "scheduler_cpu_s": 40.0},
        "shepherd": {"seconds_to_all_done": 50.0, "delete_calls_per_pod": 2.0, "scheduler_cpu_s": 10.0},
    }
    lines = side_by_side(phases, "k8s defaults")
    row = next(line for line in lines if line.startswith("DAG run start"))
    assert "200 s" in row
    assert "50 s (x0.25)" in row
    cpu = next(line for line in lines if line.startswith("scheduler CPU"))
    assert "10 s (x0.25)" in cpu
    services = next(line for line in lines if line.startswith("+ Shepherd"))
    assert "x" not in services.split("services' CPU", 1)[1]  # not measured: no ratio


def test_kubernetes_executor_defaults_leave_the_providers_options_alone_and_tuned_sets_two() -> None:
    setup = KubernetesExecutorSetup("airflow-k8s", Path("/k/config"))
    defaults, tuned = setup.options(tuned=False), setup.options(tuned=True)
    assert defaults == {"in_cluster": "False", "config_file": "/k/config"}
    assert tuned == {**defaults, "worker_pods_creation_batch_size": "128", "async_pod_creation": "True"}
    assert setup.user == "system:serviceaccount:airflow-k8s:airflow-scheduler"


def test_the_executors_kubeconfig_keeps_the_cluster_and_swaps_the_user(tmp_path: Path) -> None:
    admin = tmp_path / "admin.kubeconfig"
    admin.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster: {server: 'https://127.0.0.1:6443',"
        " certificate-authority-data: Q0E=}\nusers:\n- name: admin\n  user: {client-key-data: S0VZ}\n"
    )
    config = kubeconfig_for_token(admin, "t0ken", "airflow-k8s")
    assert config["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
    assert config["users"] == [{"name": "airflow-k8s-airflow-scheduler", "user": {"token": "t0ken"}}]
    context = config["contexts"][0]["context"]
    assert (context["cluster"], context["namespace"]) == ("local", "airflow-k8s")
    assert "S0VZ" not in str(config)
