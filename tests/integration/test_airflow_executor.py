"""The Airflow executor, as a real Airflow runs it: the package installed into a virtualenv of its
own with a real Airflow release (and nothing of the services), its ShepherdExecutor class driven
the way the scheduler drives it, against the three services on the local cluster.

What is checked is the outcome, from outside the executor: the event buffer Airflow would read,
the task's state in Shepherd, and the API server's audit log (one create per pod, the revoked
task's pod deleted, an adopted task's pod never created again).

Every test runs once per supported release: Airflow 3.3.2 (workloads) and 2.10.5 (commands).
Slow on a first run: each release's virtualenv is built once (pip install of Airflow and the
Kubernetes provider: 76 s for 3.3.2 with pip's download cache warm, 246 s for 2.10.5 with it cold,
on the 2-core machine) and cached under ~/.cache/shepherd/airflow/; after that each session
reinstalls the package (about 10 s per release) and the tests take about 4 minutes.
`pytest -m "not airflow"` leaves them out.
"""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import channels, podmeta
from shepherd.v1 import reconciler_service_pb2, reconciler_service_pb2_grpc, task_pb2
from tests.helpers import airflow_venv, eventually, task_key, unique_name
from tests.helpers.audit import RECONCILER, AuditLog

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

DRIVER = Path(__file__).with_name("airflow_driver.py")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(
    scope="session", params=[airflow_venv.AIRFLOW_3, airflow_venv.AIRFLOW_2], ids=lambda p: f"airflow-{p[0]}"
)
def airflow(request: pytest.FixtureRequest) -> airflow_venv.AirflowVenv:
    """Each release the executor supports: Airflow 3 (workloads) and 2.10 (commands)."""
    version, extras = request.param
    venv = airflow_venv.ensure(version, extras)
    if venv.build_seconds is not None:
        print(f"\nbuilt the Airflow {version} virtualenv in {venv.build_seconds:.0f}s at {venv.path}")
    return venv


def executor_env(stack: ServiceStack, cluster: ClusterInfo) -> dict[str, str]:
    """[shepherd_executor] as environment variables: the addresses and a scheduler certificate."""
    issued = stack.authority.scheduler("airflow")
    section = "AIRFLOW__SHEPHERD_EXECUTOR__"
    return {
        f"{section}LAUNCHER_ADDRESS": stack.address("launcher"),
        f"{section}RECONCILER_ADDRESS": stack.address("reconciler"),
        f"{section}TLS_CA": str(issued.ca),
        f"{section}TLS_CERT": str(issued.cert),
        f"{section}TLS_KEY": str(issued.key),
        f"{section}RPC_TIMEOUT_S": "30",
    }


def start_driver(
    venv: airflow_venv.AirflowVenv, stack: ServiceStack, cluster: ClusterInfo, tmp: Path, spec: dict[str, Any]
) -> tuple[subprocess.Popen[str], Path]:
    home = tmp / f"airflow-home-{unique_name('h')[-6:]}"
    home.mkdir()
    (home / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.Popen(
        [str(venv.python), str(DRIVER), "spec.json", "result.json"],
        env=venv.env(home, executor_env(stack, cluster)),
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, home


def finish_driver(proc: subprocess.Popen[str], home: Path, spec: dict[str, Any]) -> dict[str, Any]:
    output, _ = proc.communicate(timeout=spec.get("timeout_s", 120) + 120)
    assert proc.returncode == 0, f"driver failed:\n{output[-6000:]}"
    out: dict[str, Any] = json.loads((home / "result.json").read_text())
    return out


def drive(
    venv: airflow_venv.AirflowVenv, stack: ServiceStack, cluster: ClusterInfo, tmp: Path, spec: dict[str, Any]
) -> dict[str, Any]:
    proc, home = start_driver(venv, stack, cluster, tmp, spec)
    return finish_driver(proc, home, spec)


def shepherd_task(stack: ServiceStack, key: task_pb2.TaskKey) -> task_pb2.Task:
    with channels.sync_channel(stack.address("reconciler"), stack.credentials()) as channel:
        stub = reconciler_service_pb2_grpc.ReconcilerServiceStub(channel)
        reply: reconciler_service_pb2.GetTaskResponse = stub.GetTask(
            reconciler_service_pb2.GetTaskRequest(key=key), timeout=30
        )
    return reply.task


def events_of(out: dict[str, Any], task_id: str) -> list[tuple[str, str]]:
    return [(e["state"], e["info"]) for e in out["events"] if e["task_id"] == task_id]


def test_the_package_installs_with_airflow_and_nothing_of_the_services(
    airflow: airflow_venv.AirflowVenv, tmp_path: Path
) -> None:
    check = airflow.run(["-m", "pip", "check"], tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    listed = airflow.run(["-m", "pip", "list", "--format", "json"], tmp_path)
    names = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert {"apache-airflow", "shepherd-airflow"} <= names
    assert "shepherd" not in names
    probe = airflow.run(
        [
            "-c",
            textwrap.dedent(
                """
                import importlib.util, airflow, shepherd_airflow.executor as e
                absent = [m for m in ("shepherd", "services", "controlplane", "shepherd_cli")
                          if importlib.util.find_spec(m) is not None]
                print(airflow.__version__, e.ShepherdExecutor.__module__, absent)
                """
            ),
        ],
        tmp_path,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.split()[0] == airflow.airflow_version
    assert probe.stdout.strip().endswith("shepherd_airflow.executor []"), probe.stdout


def test_tasks_succeed_fail_with_details_and_a_revoke_cancels(
    airflow: airflow_venv.AirflowVenv, stack: ServiceStack, cluster: ClusterInfo, tmp_path: Path
) -> None:
    dag, run = unique_name("afdag"), "manual__2026-12-01T00:00:00+00:00"
    # The template names an exit code the simulated kubelet uses; the override asks for a failure:
    # exit code 7 proves both reached the pod.
    template = tmp_path / "template.yaml"
    default = (REPO / "deploy" / "pod-templates" / "default.yaml").read_text()
    template.write_text(
        default.replace(
            "  labels:\n    app.kubernetes.io/name: shepherd-worker\n",
            "  labels:\n    app.kubernetes.io/name: shepherd-worker\n"
            "  annotations:\n    sim.shepherd.dev/exit-code: '7'\n",
            1,
        )
    )
    quick = {"sim.shepherd.dev/run-time": "1s"}
    spec = {
        "dag_id": dag,
        "run_id": run,
        "parallelism": 2,
        "tasks": [
            {"task_id": "ok1", "annotations": quick},
            {"task_id": "ok2", "annotations": quick},
            {
                "task_id": "bad",
                "annotations": {
                    **quick,
                    "sim.shepherd.dev/outcome": "fail",
                    "sim.shepherd.dev/exit-code": "3",
                },
            },
            {
                "task_id": "tmpl",
                "pod_template_file": str(template),
                "annotations": {**quick, "sim.shepherd.dev/outcome": "fail"},
            },
            {"task_id": "long", "annotations": {"sim.shepherd.dev/outcome": "run-forever"}},
            {"task_id": "legacy", "executor_config_raw": {"KubernetesExecutor": {"image": "x"}}},
        ],
        "until": ["ok1", "ok2", "bad", "tmpl", "legacy"],
        "revoke_when_running": ["long"],
        "log_of": "ok1",
        "timeout_s": 180,
    }
    audit = AuditLog.from_now(Cluster().audit_log)
    out = drive(airflow, stack, cluster, tmp_path, spec)

    # Parallelism 2: the first heartbeat launches two and keeps three queued; never more than two.
    assert out["after_first_heartbeat"] == {"running": 2, "queued": 4}
    assert out["max_running"] <= 2
    for ok in ("ok1", "ok2"):
        states = [s for s, _ in events_of(out, ok)]
        assert states[-1] == "success", states
        assert states.count("success") == 1, states
        running_info = [i for s, i in events_of(out, ok) if s == "running"]
        pod = podmeta.pod_name(task_key(dag_id=dag, task_id=ok, run_id=run))
        assert all(i == f"{cluster.namespace}/{pod}" for i in running_info), running_info
    (_, bad_info), *_ = [e for e in events_of(out, "bad") if e[0] == "failed"]
    assert "PodFailed" in bad_info, bad_info
    assert "exited with code 3" in bad_info, bad_info
    (_, tmpl_info), *_ = [e for e in events_of(out, "tmpl") if e[0] == "failed"]
    assert "exited with code 7" in tmpl_info, tmpl_info
    # An executor_config Shepherd cannot honour fails the task at once, by name, with no pod.
    assert [s for s, _ in events_of(out, "legacy")] == ["failed"]
    assert "pre-2.0 form" in events_of(out, "legacy")[0][1]
    legacy_pod = podmeta.pod_name(task_key(dag_id=dag, task_id="legacy", run_id=run))

    # The revoke: no event for it in Airflow's buffer after it, the Shepherd task REVOKED, its pod deleted.
    assert out["revoked"] == ["long"]
    assert [s for s, _ in events_of(out, "long")] == ["running"]
    long_key = task_key(dag_id=dag, task_id="long", run_id=run)
    eventually(
        lambda: shepherd_task(stack, long_key).state == task_pb2.TASK_STATE_REVOKED, what="long to be revoked"
    )
    long_pod = podmeta.pod_name(long_key)
    eventually(lambda: audit.calls("delete", {long_pod}, user=RECONCILER), what="the revoked pod's delete")

    # One pod per task instance, created once.
    pods = {
        podmeta.pod_name(task_key(dag_id=dag, task_id=t, run_id=run)) for t in ("ok1", "ok2", "bad", "tmpl")
    }
    pods.add(long_pod)
    assert dict(audit.creates(pods)) == dict.fromkeys(pods, 1)
    assert not audit.creates({legacy_pod})
    assert out["running_at_end"] == []

    # kwok nodes serve no logs: the UI gets Shepherd's reason as a message, not an exception.
    messages, logs = out["log"]
    assert logs == [], out["log"]
    assert "no log" in messages[0], out["log"]


def test_adoption_reattaches_without_a_second_pod(
    airflow: airflow_venv.AirflowVenv, stack: ServiceStack, cluster: ClusterInfo, tmp_path: Path
) -> None:
    dag, run = unique_name("afadopt"), "scheduled__2026-12-01T00:00:00+00:00"
    audit = AuditLog.from_now(Cluster().audit_log)
    # The first scheduler launches the task, sees it running, and dies without handing it over.
    first = drive(
        airflow,
        stack,
        cluster,
        tmp_path,
        {
            "dag_id": dag,
            "run_id": run,
            "tasks": [{"task_id": "adoptee", "annotations": {"sim.shepherd.dev/run-time": "8s"}}],
            "until_running": ["adoptee"],
            "die": True,
        },
    )
    assert [s for s, _ in events_of(first, "adoptee")] == ["running"]
    # The next one adopts it, and a task instance Shepherd never saw is handed back for reset.
    second = drive(
        airflow,
        stack,
        cluster,
        tmp_path,
        {"dag_id": dag, "run_id": run, "adopt": ["adoptee", "never_launched"], "until": ["adoptee"]},
    )
    assert second["not_adopted"] == ["never_launched"]
    assert [s for s, _ in events_of(second, "adoptee")][-1] == "success"
    key = task_key(dag_id=dag, task_id="adoptee", run_id=run)
    assert shepherd_task(stack, key).state == task_pb2.TASK_STATE_SUCCEEDED
    assert dict(audit.creates({podmeta.pod_name(key)})) == {podmeta.pod_name(key): 1}
    with pytest.raises(grpc.RpcError) as never:
        shepherd_task(stack, task_key(dag_id=dag, task_id="never_launched", run_id=run))
    assert never.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_try_queued_again_gets_a_new_pod_and_reports_that_run(
    airflow: airflow_venv.AirflowVenv, stack: ServiceStack, cluster: ClusterInfo, tmp_path: Path
) -> None:
    """A deferred task resuming, or a reschedule-mode sensor poking again: Airflow queues the same
    TaskInstanceKey (same try) again after the run before handed control back (its pod succeeded).
    Each queueing is a run of its own, as with the KubernetesExecutor: a new pod (the next
    resumption of the Shepherd task), and Airflow hears that run's outcome, never the old one's.
    A scheduler started afresh, which never saw the earlier runs, finds the next resumption from
    Shepherd."""
    dag, run = unique_name("afagain"), "manual__2026-12-01T00:00:00+00:00"
    quick = {"sim.shepherd.dev/run-time": "1s"}
    fails = {**quick, "sim.shepherd.dev/outcome": "fail", "sim.shepherd.dev/exit-code": "5"}
    audit = AuditLog.from_now(Cluster().audit_log)
    spec = {
        "dag_id": dag,
        "run_id": run,
        "tasks": [{"task_id": "poke", "annotations": quick, "again": [{"annotations": quick}]}],
        "until": ["poke"],
        "timeout_s": 180,
    }
    first = drive(airflow, stack, cluster, tmp_path, spec)
    assert [s for s, _ in events_of(first, "poke") if s != "running"] == ["success", "success"]
    assert first["running_at_end"] == []
    # A restarted scheduler: the third run of the same try, and this one fails.
    spec["tasks"] = [{"task_id": "poke", "annotations": fails}]
    second = drive(airflow, stack, cluster, tmp_path, spec)
    outcomes = [e for e in events_of(second, "poke") if e[0] != "running"]
    assert [s for s, _ in outcomes] == ["failed"], outcomes
    assert "exited with code 5" in outcomes[0][1], outcomes

    keys = [task_key(dag_id=dag, task_id="poke", run_id=run, resumption=r) for r in range(3)]
    states = [shepherd_task(stack, k).state for k in keys]
    succeeded, failed = task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_FAILED
    assert states == [succeeded, succeeded, failed], [task_pb2.TaskState.Name(s) for s in states]
    pods = [podmeta.pod_name(k) for k in keys]
    assert len(set(pods)) == 3
    running_info = {i for s, i in events_of(second, "poke") if s == "running"}
    assert running_info <= {f"{cluster.namespace}/{pods[2]}"}, running_info
    assert dict(audit.creates(set(pods))) == dict.fromkeys(pods, 1)
    with pytest.raises(grpc.RpcError) as never:
        shepherd_task(stack, task_key(dag_id=dag, task_id="poke", run_id=run, resumption=3))
    assert never.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_late_end_of_the_run_before_is_never_reported_for_the_next_queueing(
    airflow: airflow_venv.AirflowVenv, stack: ServiceStack, cluster: ClusterInfo, tmp_path: Path
) -> None:
    """The trigger fires while the pod of the run that deferred is still seen running. Airflow 3
    hands the instance over again at once: the next resumption is launched beside it, and the
    earlier run's success, arriving later, is not reported (the instance is queued again: that
    success would fail it). Airflow 2.10 waits for the earlier run's end first, so both ends are
    reported, each while the instance is its run's."""
    dag, run = unique_name("aflate"), "manual__2026-12-01T00:00:00+00:00"
    fails = {
        "sim.shepherd.dev/run-time": "1s",
        "sim.shepherd.dev/outcome": "fail",
        "sim.shepherd.dev/exit-code": "5",
    }
    spec = {
        "dag_id": dag,
        "run_id": run,
        "tasks": [
            {
                "task_id": "defer",
                "annotations": {"sim.shepherd.dev/run-time": "3s"},
                "again": [{"annotations": fails}],
            }
        ],
        "again_when_running": ["defer"],
        "until": ["defer"],
        "timeout_s": 180,
    }
    audit = AuditLog.from_now(Cluster().audit_log)
    out = drive(airflow, stack, cluster, tmp_path, spec)
    outcomes = [e for e in events_of(out, "defer") if e[0] != "running"]
    expected = ["failed"] if airflow.airflow_version.startswith("3.") else ["success", "failed"]
    assert [s for s, _ in outcomes] == expected, outcomes
    assert "exited with code 5" in outcomes[-1][1], outcomes
    assert out["running_at_end"] == []
    keys = [task_key(dag_id=dag, task_id="defer", run_id=run, resumption=r) for r in range(2)]
    # Both runs happened, each in its own pod, and the earlier one's success is kept in Shepherd.
    eventually(
        lambda: shepherd_task(stack, keys[0]).state == task_pb2.TASK_STATE_SUCCEEDED,
        what="the first run's end",
    )
    assert shepherd_task(stack, keys[1]).state == task_pb2.TASK_STATE_FAILED
    pods = {podmeta.pod_name(k) for k in keys}
    assert dict(audit.creates(pods)) == dict.fromkeys(pods, 1)


def test_adoption_attaches_to_the_latest_run_of_a_resumed_try(
    airflow: airflow_venv.AirflowVenv, stack: ServiceStack, cluster: ClusterInfo, tmp_path: Path
) -> None:
    """The scheduler dies while the second run of a try (a sensor's second poke) runs. The next
    scheduler adopts the instance onto that run (not the first, finished one) and makes no pod;
    an instance queued again after the latest run Shepherd has was never launched, and is handed
    back to be reset rather than told that run's outcome."""
    dag, run = unique_name("afadoptr"), "manual__2026-12-01T00:00:00+00:00"
    audit = AuditLog.from_now(Cluster().audit_log)
    first = drive(
        airflow,
        stack,
        cluster,
        tmp_path,
        {
            "dag_id": dag,
            "run_id": run,
            "tasks": [
                {
                    "task_id": "poke",
                    "annotations": {"sim.shepherd.dev/run-time": "1s"},
                    "again": [{"annotations": {"sim.shepherd.dev/run-time": "10s"}}],
                }
            ],
            "until_running": ["poke"],
            "die": True,
            "timeout_s": 180,
        },
    )
    assert [s for s, _ in events_of(first, "poke") if s != "running"] == ["success"]
    keys = [task_key(dag_id=dag, task_id="poke", run_id=run, resumption=r) for r in range(2)]
    second = drive(
        airflow,
        stack,
        cluster,
        tmp_path,
        {"dag_id": dag, "run_id": run, "adopt": ["poke"], "until": ["poke"], "timeout_s": 180},
    )
    assert second["not_adopted"] == []
    outcomes = [e for e in events_of(second, "poke") if e[0] != "running"]
    assert outcomes == [("success", f"{cluster.namespace}/{podmeta.pod_name(keys[1])}")], outcomes
    assert [shepherd_task(stack, k).state for k in keys] == [task_pb2.TASK_STATE_SUCCEEDED] * 2
    pods = {podmeta.pod_name(k) for k in keys}
    assert dict(audit.creates(pods)) == dict.fromkeys(pods, 1)
    # Queued again (a third poke) after that run was accepted, and the scheduler died before it
    # launched anything: nothing to adopt.
    third = drive(
        airflow,
        stack,
        cluster,
        tmp_path,
        {
            "dag_id": dag,
            "run_id": run,
            "adopt": ["poke"],
            "adopt_queued_at": datetime.now(UTC).isoformat(),
            "timeout_s": 5,
        },
    )
    assert third["not_adopted"] == ["poke"]
    assert events_of(third, "poke") == []
    with pytest.raises(grpc.RpcError) as never:
        shepherd_task(stack, task_key(dag_id=dag, task_id="poke", run_id=run, resumption=2))
    assert never.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_state_stream_resumes_after_the_reconciler_restarts(
    airflow: airflow_venv.AirflowVenv, cluster: ClusterInfo, tmp_path: Path
) -> None:
    """The reconciler of a stack of this test's own is killed and started again while the executor
    follows its running tasks: the stream breaks, the feed reconnects (and, the new run's log not
    knowing its cursor, re-reads its tasks), and every task still reaches Airflow exactly once, as
    a success."""
    own = ServiceStack(cluster, tmp_path / "stack", executor_id=f"af-{unique_name('r')[-8:]}")
    own.start()
    try:
        dag, run = unique_name("afresume"), "manual__2026-12-01T00:00:00+00:00"
        tasks = [f"t{i}" for i in range(4)]
        spec = {
            "dag_id": dag,
            "run_id": run,
            "tasks": [{"task_id": t, "annotations": {"sim.shepherd.dev/run-time": "20s"}} for t in tasks],
            "until": tasks,
            "timeout_s": 180,
        }
        pods = {podmeta.pod_name(task_key(dag_id=dag, task_id=t, run_id=run)) for t in tasks}
        audit = AuditLog.from_now(Cluster().audit_log)
        proc, home = start_driver(airflow, own, cluster, tmp_path, spec)
        eventually(lambda: set(audit.creates(pods)) == pods, what="every pod created", timeout=120)
        # Killed, not drained: a drained stream can outlive the tasks. The tasks run on meanwhile.
        own.restart("reconciler", sig=signal.SIGKILL)
        out = finish_driver(proc, home, spec)
    finally:
        own.stop_all()
    assert out["feed"]["reconnects"] + out["feed"]["resyncs"] >= 1, out["feed"]
    for t in tasks:
        assert [s for s, _ in events_of(out, t) if s != "running"] == ["success"], events_of(out, t)
    assert dict(audit.creates(pods)) == dict.fromkeys(pods, 1)


def test_a_pod_lost_before_it_ran_is_requeued_without_spending_a_retry(tmp_path: Path) -> None:
    """Shepherd's UP_FOR_RESCHEDULE, in a real Airflow 3 metadata database (SQLite): the instance
    still QUEUED under that try goes back to no state with one more try allowed (the scheduler
    then runs it under the next try number, a new Shepherd task); one that moved on is reported
    FAILED with the reason instead of being touched."""
    venv = airflow_venv.ensure(*airflow_venv.AIRFLOW_3)
    home = tmp_path / "airflow-home"
    (home / "dags").mkdir(parents=True)
    (home / "dags" / "shepherd_requeue.py").write_text(
        textwrap.dedent(
            """
            from airflow.providers.standard.operators.empty import EmptyOperator
            from airflow.sdk import DAG

            with DAG("shepherd_requeue", schedule=None):
                EmptyOperator(task_id="lost")
                EmptyOperator(task_id="moved_on")
            """
        )
    )
    env = venv.env(
        home,
        {"AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"), "AIRFLOW__SHEPHERD_EXECUTOR__INSECURE": "true"},
    )
    for step in (["db", "migrate"], ["dags", "reserialize"]):
        done = subprocess.run(
            [str(venv.path / "bin" / "airflow"), *step],
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (home / "spec.json").write_text(
        json.dumps({"requeue": True, "dag_id": "shepherd_requeue", "run_id": "r1"})
    )
    done = subprocess.run(
        [str(venv.python), str(DRIVER), "spec.json", "result.json"],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads((home / "result.json").read_text())
    assert out["tis"]["lost"] == [None, 1, 1]  # no state, one more try allowed
    assert "lost" not in out["events"]
    assert out["tis"]["moved_on"] == ["running", 1, 0]  # untouched
    state, info = out["events"]["moved_on"]
    assert state == "failed"
    assert "PodLostBeforeStart" in info
    assert out["running"] == 0


def test_a_restarted_executor_follows_from_now_and_replays_no_old_states(
    airflow: airflow_venv.AirflowVenv, stack: ServiceStack, cluster: ClusterInfo, tmp_path: Path
) -> None:
    """A scheduler that starts (or restarts) follows task states from the head of the log: the
    retained transitions of tasks that finished before it started (up to days of them) are not
    read again, let alone queued in the scheduler; its own task's states all arrive."""
    dag, run = unique_name("afhead"), "manual__2026-12-01T00:00:00+00:00"
    quick = {"sim.shepherd.dev/run-time": "1s"}
    audit = AuditLog.from_now(Cluster().audit_log)
    before = ["old0", "old1", "old2"]
    first = drive(
        airflow,
        stack,
        cluster,
        tmp_path,
        {
            "dag_id": dag,
            "run_id": run,
            "tasks": [{"task_id": t, "annotations": quick} for t in before],
            "until": before,
        },
    )
    for t in before:
        assert [s for s, _ in events_of(first, t) if s != "running"] == ["success"], events_of(first, t)
    # The next scheduler runs one task of the same DAG run; its terminal state is the barrier.
    second = drive(
        airflow,
        stack,
        cluster,
        tmp_path,
        {
            "dag_id": dag,
            "run_id": run,
            "tasks": [{"task_id": "new", "annotations": quick}],
            "until": ["new"],
        },
    )
    assert [s for s, _ in events_of(second, "new") if s != "running"] == ["success"], events_of(second, "new")
    replayed = [a for a in second["applied"] if a["dag_id"] == dag and a["task_id"] in before]
    assert replayed == [], f"{len(replayed)} old transitions handed to the new executor: {replayed[:5]}"
    mine = [a["state"] for a in second["applied"] if a["dag_id"] == dag and a["task_id"] == "new"]
    assert task_pb2.TASK_STATE_SUCCEEDED in mine, second["applied"]
    pods = {podmeta.pod_name(task_key(dag_id=dag, task_id=t, run_id=run)) for t in [*before, "new"]}
    assert dict(audit.creates(pods)) == dict.fromkeys(pods, 1)


def test_a_dead_state_feed_is_replaced_and_no_state_is_lost(
    airflow: airflow_venv.AirflowVenv, stack: ServiceStack, cluster: ClusterInfo, tmp_path: Path
) -> None:
    """The feed thread ends under the executor while its tasks run (as a thread killed by an
    unexpected error would): the next heartbeat notices, starts a new feed that re-reads the
    tracked tasks, and every task still reaches Airflow exactly once, as a success."""
    dag, run = unique_name("afdead"), "manual__2026-12-01T00:00:00+00:00"
    tasks = ["a", "b"]
    spec = {
        "dag_id": dag,
        "run_id": run,
        "tasks": [{"task_id": t, "annotations": {"sim.shepherd.dev/run-time": "6s"}} for t in tasks],
        "until": tasks,
        "end_feed_when_running": tasks,
        "timeout_s": 90,
    }
    audit = AuditLog.from_now(Cluster().audit_log)
    out = drive(airflow, stack, cluster, tmp_path, spec)
    assert len(out["feed_ended"]) == 1, out["feed_ended"]
    for t in tasks:
        assert [s for s, _ in events_of(out, t) if s != "running"] == ["success"], events_of(out, t)
        key = task_key(dag_id=dag, task_id=t, run_id=run)
        assert shepherd_task(stack, key).state == task_pb2.TASK_STATE_SUCCEEDED
    pods = {podmeta.pod_name(task_key(dag_id=dag, task_id=t, run_id=run)) for t in tasks}
    assert dict(audit.creates(pods)) == dict.fromkeys(pods, 1)
    assert out["running_at_end"] == []
