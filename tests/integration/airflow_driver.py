"""Plays the Airflow scheduler's side of the executor interface, inside the Airflow virtualenv.

Run by tests/integration/test_airflow_executor.py with the venv's Python (never the project's):
it imports the installed `shepherd_airflow` and the real Airflow, makes the real ShepherdExecutor,
and drives it as the scheduler does: queue task instances, heartbeat, read the event buffer,
revoke, adopt. It writes what it saw as JSON to the file named by its second argument; the test
checks that against Shepherd and the API server's audit log.

Usage: python airflow_driver.py SPEC.json RESULT.json   (SPEC: see `main`)
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import airflow
from airflow.models.taskinstancekey import TaskInstanceKey
from shepherd_airflow import ShepherdExecutor

AIRFLOW_3 = int(airflow.__version__.split(".")[0]) >= 3


def make_key(spec: dict[str, Any], task: dict[str, Any]) -> TaskInstanceKey:
    return TaskInstanceKey(spec["dag_id"], task["task_id"], spec["run_id"], task.get("try_number", 1), -1)


def executor_config(task: dict[str, Any]) -> dict[str, Any]:
    from kubernetes.client import models as k8s

    if "executor_config_raw" in task:
        return dict(task["executor_config_raw"])
    config: dict[str, Any] = {}
    if task.get("annotations"):
        config["pod_override"] = k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(annotations=task["annotations"]),
            spec=k8s.V1PodSpec(
                containers=[
                    k8s.V1Container(name="base", env=[k8s.V1EnvVar(name="FROM_OVERRIDE", value="yes")])
                ]
            ),
        )
    if task.get("pod_template_file"):
        config["pod_template_file"] = task["pod_template_file"]
    return config


def queue(executor: Any, spec: dict[str, Any], task: dict[str, Any]) -> None:
    key = make_key(spec, task)
    if AIRFLOW_3:
        from airflow.executors.workloads import ExecuteTask
        from airflow.executors.workloads.base import BundleInfo
        from airflow.executors.workloads.task import TaskInstanceDTO

        ti = TaskInstanceDTO(
            id=uuid.uuid4(),
            dag_id=key.dag_id,
            task_id=key.task_id,
            run_id=key.run_id,
            try_number=key.try_number,
            map_index=key.map_index,
            dag_version_id=uuid.uuid4(),
            queue="default",
            pool_slots=1,
            priority_weight=1,
            executor_config=executor_config(task),
        )
        workload = ExecuteTask(
            ti=ti,
            dag_rel_path="dags/shepherd_test.py",
            bundle_info=BundleInfo(name="dags-folder"),
            token="not-a-real-token",
            log_path=None,
        )
        executor.queue_workload(workload, session=None)
    else:
        command = ["airflow", "tasks", "run", key.dag_id, key.task_id, key.run_id, "--local"]
        # What Airflow 2.10's base class reads of a task instance when it hands the command over.
        ti = SimpleNamespace(
            key=key,
            executor_config=executor_config(task),
            priority_weight=1,
            queue="default",
            dag_run=SimpleNamespace(start_date=None),
        )
        executor.queue_command(ti, command, priority=1, queue="default")


def follow(executor: Any, spec: dict[str, Any], out: dict[str, Any]) -> None:
    """Heartbeat until every task named in `until` has a terminal event and every one in
    `until_running` a running one (or the deadline)."""
    terminal = {"success", "failed"}
    until = {make_key(spec, {"task_id": t}) for t in spec.get("until", [])}
    until_running = {make_key(spec, {"task_id": t}) for t in spec.get("until_running", [])}
    revoke = {make_key(spec, {"task_id": t}) for t in spec.get("revoke_when_running", [])}
    # Queued again under the same key after each terminal event, as Airflow does when a deferred
    # task resumes or a reschedule-mode sensor pokes again: the same try, a new run of it. With
    # "again_when_running", already at its first running event: Airflow 3 queues a resumed
    # deferral even while the run that deferred is still seen running.
    again = {make_key(spec, t): list(t.get("again", [])) for t in spec.get("tasks", [])}
    again_early = {make_key(spec, {"task_id": t}) for t in spec.get("again_when_running", [])}
    # The feed thread ends under the executor (as an unexpected death would) once these run.
    end_feed = {make_key(spec, {"task_id": t}) for t in spec.get("end_feed_when_running", [])}
    done: set[TaskInstanceKey] = set()
    seen_running: set[TaskInstanceKey] = set()
    deadline = time.monotonic() + spec.get("timeout_s", 120)
    first = True
    while time.monotonic() < deadline and not (
        until <= done and until_running <= seen_running and not revoke
    ):
        executor.heartbeat()
        if first:
            out["after_first_heartbeat"] = {
                "running": len(executor.running),
                "queued": len(executor.queued_tasks),
            }
            first = False
        out["max_running"] = max(out.get("max_running", 0), len(executor.running))
        for key, (state, info) in executor.get_event_buffer().items():
            state_name = str(getattr(state, "value", state))
            out["events"].append({"task_id": key.task_id, "state": state_name, "info": info})
            if again.get(key) and (
                state_name in terminal or (state_name == "running" and key in again_early)
            ):
                queue(executor, spec, {"task_id": key.task_id, **again[key].pop(0)})
            elif state_name in terminal and key not in executor.queued_tasks:
                done.add(key)  # (Airflow 2.10 holds a queueing back while the run before is running)
            elif state_name == "running" and not again.get(key):
                seen_running.add(key)  # the last queueing's run
            if state_name == "running" and key in end_feed and executor.feed is not None:
                executor.feed.stop()
                out["feed_ended"].append(key.task_id)
                end_feed.clear()
            if state_name == "running" and key in revoke:
                executor.revoke_task(ti=SimpleNamespace(key=key))
                out["revoked"].append(key.task_id)
                revoke.discard(key)
        time.sleep(0.2)
    out["running_at_end"] = sorted(k.task_id for k in executor.running)


def record_applied(executor: Any, into: list[dict[str, Any]]) -> None:
    """Every Shepherd task the executor is handed (from the feed, adoption or a catch-up read),
    whether or not it is one the executor tracks: what the feed delivered, seen from outside."""
    apply = executor._apply

    def recording(task: Any) -> None:
        into.append({"dag_id": task.key.dag_id, "task_id": task.key.task_id, "state": int(task.state)})
        apply(task)

    executor._apply = recording


def requeue(spec: dict[str, Any]) -> dict[str, Any]:
    """Airflow 3 only: in a migrated metadata database with the DAG `spec["dag_id"]` serialized,
    make a run whose instance `lost` is QUEUED and `moved_on` RUNNING under try 1, and hand both
    to the executor as Shepherd's UP_FOR_RESCHEDULE would. What the database then holds."""
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType
    from shepherd_airflow.translate import KeyFields
    from shepherd_airflow.v1 import task_pb2
    from sqlalchemy import select

    with create_session() as session:
        dag = SerializedDagModel.get_dag(spec["dag_id"], session=session)
        dag.create_dagrun(
            run_id=spec["run_id"],
            run_after=datetime.now(UTC),
            run_type=DagRunType.MANUAL,
            triggered_by=DagRunTriggeredByType.TEST,
            state=DagRunState.RUNNING,
            session=session,
        )
        session.flush()
        for ti in session.scalars(select(TaskInstance).where(TaskInstance.run_id == spec["run_id"])):
            ti.try_number, ti.max_tries = 1, 0
            ti.state = TaskInstanceState.QUEUED if ti.task_id == "lost" else TaskInstanceState.RUNNING
    executor = ShepherdExecutor()
    for task_id in ("lost", "moved_on"):
        key = TaskInstanceKey(spec["dag_id"], task_id, spec["run_id"], 1, -1)
        executor.running.add(key)
        shepherd_task = task_pb2.Task(
            key=task_pb2.TaskKey(**KeyFields(*key)._asdict()),
            state=task_pb2.TASK_STATE_UP_FOR_RESCHEDULE,
            failure=task_pb2.FailureDetails(reason="PodLostBeforeStart", message="evicted while Pending"),
        )
        executor._apply(shepherd_task)
    out: dict[str, Any] = {
        "events": {
            k.task_id: [str(getattr(s, "value", s)), i] for k, (s, i) in executor.event_buffer.items()
        },
        "running": len(executor.running),
    }
    with create_session() as session:
        rows = session.scalars(select(TaskInstance).where(TaskInstance.run_id == spec["run_id"]))
        out["tis"] = {
            ti.task_id: [ti.state and str(getattr(ti.state, "value", ti.state)), ti.try_number, ti.max_tries]
            for ti in rows
        }
    return out


def main() -> None:
    with open(sys.argv[1]) as spec_file:
        spec = json.load(spec_file)
    if spec.get("requeue"):
        with open(sys.argv[2], "w") as result:
            json.dump(requeue(spec), result)
        return
    out: dict[str, Any] = {
        "airflow": airflow.__version__,
        "events": [],
        "revoked": [],
        "feed_ended": [],
        "applied": [],
    }
    executor = ShepherdExecutor(parallelism=spec.get("parallelism", 32))
    record_applied(executor, out["applied"])
    executor.job_id = spec.get("job_id", 1)
    executor.start()
    try:
        if spec.get("adopt"):
            # When the instances were last queued, as Airflow's TaskInstance.queued_dttm says.
            queued = spec.get("adopt_queued_at")
            queued_dttm = None if queued is None else datetime.fromisoformat(queued)
            tis = [
                SimpleNamespace(key=make_key(spec, {"task_id": t}), queued_dttm=queued_dttm)
                for t in spec["adopt"]
            ]
            out["not_adopted"] = sorted(ti.key.task_id for ti in executor.try_adopt_task_instances(tis))
        for task in spec.get("tasks", []):
            queue(executor, spec, task)
        follow(executor, spec, out)
        if spec.get("log_of"):
            # As Airflow's API server asks: an executor made for the purpose, never started.
            ti = SimpleNamespace(key=make_key(spec, {"task_id": spec["log_of"]}))
            out["log"] = ShepherdExecutor().get_task_log(ti, 1)
        if executor.feed is not None:
            out["feed"] = {"reconnects": executor.feed.reconnects, "resyncs": executor.feed.resyncs}
    finally:
        if spec.get("die"):
            executor.terminate()  # the scheduler goes away without handing anything over
        else:
            executor.end()
    with open(sys.argv[2], "w") as result:
        json.dump(out, result)


if __name__ == "__main__":
    main()
