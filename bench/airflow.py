"""The comparison users care about: the same DAG of N short tasks through a real Airflow 3, once per
executor, on the same cluster, with the same worker image and pod template.

Three phases, each a fresh Airflow (controlplane/airflow.py: PostgreSQL, API server, DAG
processor, scheduler) whose tasks run as real containers on the local cluster's real node:
1. the cncf.kubernetes provider's KubernetesExecutor with its own defaults (the baseline),
2. the KubernetesExecutor tuned (`worker_pods_creation_batch_size` 128, `async_pod_creation`),
3. the Shepherd executor, with the three services started for the phase.
The DAG is `shepherd_fanout` (integrations/airflow/dags/): a seed task, then a task mapped over
`n` items, so a run has n + 1 task instances. Every phase gets the same Airflow settings apart
from the executor: `parallelism` and `max_active_tasks_per_dag` both `--airflow-parallelism`.

Per phase, from the run's start to its end:
- DAG run start -> all tasks done: the run's start_date to the last task instance's end_date, from
  Airflow's metadata database (its REST API);
- queued -> running latency, p50 and p99: each task instance's queued_when (the scheduler handed
  it to the executor) to its start_date (its process in the pod began the task);
- pod delete calls per pod: every delete call on the run's pods, by any client, from the API
  server's audit log (each executor's own, and the kubelet's final one of a graceful delete);
- scheduler-side CPU: the scheduler's process tree (the KubernetesExecutor's watcher and manager
  processes are its children), and for Shepherd the three services' CPU, shown separately and added.
The API server's, the DAG processor's and kube-apiserver's CPU are recorded too, for context.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.airflow_figures import (
    ProcessTreeMeter,
    RunTimes,
    TaskTimes,
    parse_time,
    pod_calls,
    pod_name_prefix,
    run_figures,
)
from controlplane import Cluster, ClusterInfo, airflowk8s
from controlplane.airflow import AirflowDeployment, ExecutorKind, ShepherdConnection
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.v1 import task_pb2

DAG = "shepherd_fanout"
SERVICES = ("launcher", "watcher", "reconciler")
QUIET_S = 10.0


@dataclass(frozen=True)
class Phase:
    name: str
    executor: ExecutorKind
    tuned: bool = False


PHASES = (
    Phase("KubernetesExecutor defaults", ExecutorKind.KUBERNETES),
    Phase("KubernetesExecutor tuned", ExecutorKind.KUBERNETES, tuned=True),
    Phase("Shepherd", ExecutorKind.SHEPHERD),
)
BASELINE = PHASES[0].name


def audit_entries(path: Path, start: int) -> Iterator[dict[str, Any]]:
    """The audit log's complete lines after byte `start` (from 0 if it was rotated since)."""
    if not path.exists():
        return
    with path.open("rb") as log:
        log.seek(start if log.seek(0, 2) >= start else 0)
        for line in log:
            if line.endswith(b"\n"):
                yield json.loads(line)


def shepherd_pod_names(tis: list[dict[str, Any]], attempts: int = 3) -> set[str]:
    """The pods Shepherd names for these task instances (its first `attempts` launch attempts)."""
    names: set[str] = set()
    for ti in tis:
        key = task_pb2.TaskKey(
            dag_id=ti["dag_id"],
            task_id=ti["task_id"],
            run_id=ti["dag_run_id"],
            try_number=int(ti["try_number"]),
            map_index=int(ti["map_index"]),
        )
        names.update(podmeta.pod_name(key, attempt) for attempt in range(1, attempts + 1))
    return names


class Sampler:
    """Samples a ProcessTreeMeter every second in a thread, between `with` entry and exit."""

    def __init__(self, meter: ProcessTreeMeter) -> None:
        self.meter = meter
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.meter.sample()

    def __enter__(self) -> Sampler:
        self.meter.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.meter.sample()


def _task_instances(airflow: AirflowDeployment, run_id: str) -> list[dict[str, Any]]:
    tis: list[dict[str, Any]] = []
    while True:
        page = airflow.api(
            "GET",
            f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances",
            query={"limit": "500", "offset": str(len(tis))},
        )
        tis.extend(page["task_instances"])
        if not page["task_instances"] or len(tis) >= page["total_entries"]:
            return tis


def _wait_for_run(airflow: AirflowDeployment, run_id: str, tasks: int, timeout_s: float) -> dict[str, Any]:
    """Until the run is finished, printing its task instances' states every few seconds."""
    started = time.monotonic()
    last = ""
    while True:
        airflow.check_running()
        run: dict[str, Any] = airflow.api("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}")
        counts = Counter(str(ti.get("state") or "none") for ti in _task_instances(airflow, run_id))
        line = " ".join(f"{state}={n}" for state, n in sorted(counts.items()))
        if line != last:
            print(f"    [{time.monotonic() - started:6.1f}s] run {run['state']}: {line}", flush=True)
            last = line
        if run["state"] in ("success", "failed"):
            return run
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"the run of {tasks} tasks did not finish in {timeout_s:.0f}s: {line}")
        time.sleep(3.0)


def _wait_for_pods_gone(cluster: Cluster, namespace: str, prefix: str, timeout_s: float = 180.0) -> int:
    """Until no pod of the DAG is left in `namespace` (its last delete calls are then in the
    audit log); how many are still there when the wait gives up."""
    admin = cluster._admin()
    deadline = time.monotonic() + timeout_s
    while True:
        pods = admin.request("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
        left = sum(1 for p in pods if p["metadata"]["name"].startswith(prefix))
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(1.0)


def _load_average() -> float:
    return round(os.getloadavg()[0], 2)


def run_phase(
    phase: Phase,
    info: ClusterInfo,
    workdir: Path,
    k8s: airflowk8s.KubernetesExecutorSetup,
    *,
    tasks: int,
    parallelism: int,
) -> dict[str, Any]:
    cluster = Cluster()
    stack: ServiceStack | None = None
    config = {"core": {"max_active_tasks_per_dag": str(parallelism)}}
    if phase.executor is ExecutorKind.KUBERNETES:
        config["kubernetes_executor"] = k8s.options(tuned=phase.tuned)
        namespace = k8s.namespace
    else:
        stack = ServiceStack(
            info, workdir / "services", executor_id=f"bench-airflow-{int(time.time())}", die_with_parent=True
        )
        namespace = info.namespace
    try:
        if stack is not None:
            stack.start()
        with AirflowDeployment(
            cluster=info,
            workdir=workdir / "airflow",
            executor=phase.executor,
            shepherd=ShepherdConnection.of_stack(stack) if stack is not None else None,
            namespace=namespace,
            parallelism=parallelism,
            config=config,
        ) as airflow:
            airflow.wait_for_dag(DAG)
            # A quiet moment: the components just started are still busy with their first loops
            # and the DAG's first parse, which the phase should not measure.
            time.sleep(QUIET_S)
            roots = {
                "scheduler": airflow.scheduler_pid,
                "api-server": airflow.procs["api-server"].pid,
                "dag-processor": airflow.procs["dag-processor"].pid,
            }
            if (apiserver := cluster.supervisor.pid("kube-apiserver")) is not None:
                roots["kube-apiserver"] = apiserver
            if stack is not None:
                roots.update({name: stack.procs[name].pid for name in SERVICES})
            meter = ProcessTreeMeter(roots)
            audit_start = cluster.audit_log.stat().st_size if cluster.audit_log.exists() else 0
            load = _load_average()
            print(f"  {phase.name}: API {airflow.api_url}, load average {load}", flush=True)
            with Sampler(meter):
                run_id = airflow.trigger(DAG, conf={"n": tasks})
                run = _wait_for_run(airflow, run_id, tasks, timeout_s=max(900.0, 10.0 * tasks))
            tis = _task_instances(airflow, run_id)
            prefix = pod_name_prefix(DAG)
            left = _wait_for_pods_gone(cluster, namespace, prefix)
            names = shepherd_pod_names(tis) if stack is not None else None
            calls = pod_calls(audit_entries(cluster.audit_log, audit_start), namespace, prefix, names)
    finally:
        if stack is not None:
            stack.stop_all()
    started = parse_time(run["start_date"])
    assert started is not None, run
    figures = run_figures(
        RunTimes(
            state=str(run["state"]),
            started=started,
            ended=parse_time(run.get("end_date")),
            tasks=tuple(TaskTimes.from_api(ti) for ti in tis),
        )
    )
    figures.update(calls.figures())
    cpu = meter.used()
    services = round(sum(cpu[name] for name in SERVICES), 2) if stack is not None else None
    figures.update(
        {
            "executor": phase.executor.value,
            "kubernetes_executor_options": config.get("kubernetes_executor"),
            "run_id": run_id,
            "namespace": namespace,
            "pods_left_after_180s": left,
            "load_average_at_start": load,
            "scheduler_cpu_s": cpu["scheduler"],
            "scheduler_cpu_by_process": meter.ledgers["scheduler"].used_by_name(),
            "services_cpu_s": services,
            "services_cpu_by_service": {name: cpu[name] for name in SERVICES} if stack is not None else None,
            "scheduler_side_cpu_s": round(cpu["scheduler"] + (services or 0.0), 2),
            "other_cpu_s": {k: v for k, v in cpu.items() if k not in (*SERVICES, "scheduler")},
        }
    )
    return figures


def measure(workdir: Path, tasks: int, parallelism: int) -> dict[str, Any]:
    """Every phase on the shared local cluster (started, or reused when running); the figures of
    each, by phase name."""
    cluster = Cluster()
    info = cluster.up()
    if info.real_node is None:
        raise RuntimeError(f"the Airflow comparison needs the real node: {info.real_node_unavailable}")
    k8s = airflowk8s.prepare(cluster, workdir)
    phases: dict[str, Any] = {}
    try:
        for i, phase in enumerate(PHASES):
            phases[phase.name] = run_phase(
                phase, info, workdir / f"phase-{i}", k8s, tasks=tasks, parallelism=parallelism
            )
    finally:
        airflowk8s.remove(cluster, k8s.namespace)
    return {"tasks": tasks, "task_instances": tasks + 1, "parallelism": parallelism, "phases": phases}
