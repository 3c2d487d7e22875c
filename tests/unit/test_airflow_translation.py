"""The Airflow executor's pure decisions, table by table, without Airflow: which Shepherd task a
task instance is, which Airflow event each Shepherd state becomes and with what text, how
executor_config becomes the launch's template and override, and the [shepherd_executor] settings."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from kubernetes.client import ApiClient
from kubernetes.client import models as k8s
from shepherd_airflow import translate
from shepherd_airflow.config import Settings, SettingsError
from shepherd_airflow.translate import ExecutorConfigError, Outcome
from shepherd_airflow.v1 import task_pb2 as T  # noqa: N812


class TaskInstanceKey(NamedTuple):
    """The shape of Airflow's own TaskInstanceKey (2.10 and 3.x): five fields in this order."""

    dag_id: str
    task_id: str
    run_id: str
    try_number: int = 1
    map_index: int = -1


AIRFLOW_KEY = TaskInstanceKey("etl", "load", "scheduled__2026-12-01T00:00:00+00:00", 3, 7)


def test_a_task_instance_key_is_a_shepherd_key_field_for_field() -> None:
    key = translate.task_key(AIRFLOW_KEY)
    assert (key.dag_id, key.task_id, key.run_id, key.try_number, key.map_index) == tuple(AIRFLOW_KEY)
    assert TaskInstanceKey(*translate.key_fields(key)) == AIRFLOW_KEY
    unmapped = TaskInstanceKey("etl", "load", "r1")
    assert TaskInstanceKey(*translate.key_fields(translate.task_key(unmapped))) == unmapped
    assert translate.key_text(AIRFLOW_KEY) == "etl/load/scheduled__2026-12-01T00:00:00+00:00/3/7"


def task(state: int, failure: T.FailureDetails | None = None) -> T.Task:
    made = T.Task(
        key=translate.task_key(AIRFLOW_KEY), namespace="work", pod_name="etl-load-abc", failure=failure
    )
    made.state = state  # type: ignore[assignment]
    return made


@pytest.mark.parametrize(
    ("state", "outcome", "terminal"),
    [
        (T.TASK_STATE_QUEUED, None, False),
        (T.TASK_STATE_ADOPTED, None, False),
        (T.TASK_STATE_RUNNING, Outcome.RUNNING, False),
        (T.TASK_STATE_SUCCEEDED, Outcome.SUCCESS, True),
        (T.TASK_STATE_FAILED, Outcome.FAILED, True),
        # The pod was lost before it ran: Airflow gets the instance back without losing a retry.
        (T.TASK_STATE_UP_FOR_RESCHEDULE, Outcome.REQUEUE, True),
        # Cancelled outside this executor (its own revokes are never reported): not a failure.
        (T.TASK_STATE_REVOKED, Outcome.REQUEUE, True),
    ],
)
def test_each_shepherd_state_becomes_one_airflow_event(
    state: int, outcome: Outcome | None, terminal: bool
) -> None:
    event = translate.event_for(task(state))
    if outcome is None:
        assert event is None
        return
    assert event is not None
    assert event.outcome is outcome
    assert event.terminal is terminal
    assert TaskInstanceKey(*event.key) == AIRFLOW_KEY


def test_running_and_success_carry_the_pod_as_the_external_id() -> None:
    for state in (T.TASK_STATE_RUNNING, T.TASK_STATE_SUCCEEDED):
        event = translate.event_for(task(state))
        assert event is not None
        assert event.info == "work/etl-load-abc"


def test_a_failure_says_why_in_one_line() -> None:
    failed = task(
        T.TASK_STATE_FAILED,
        failure=T.FailureDetails(
            reason="PodFailed",
            message="container base exited 3",
            pod_phase="Failed",
            container=T.ContainerStatus(
                name="base",
                kind=T.CONTAINER_KIND_MAIN,
                phase=T.CONTAINER_PHASE_TERMINATED,
                exit_code=3,
                reason="Error",
                message="boom",
            ),
        ),
    )
    event = translate.event_for(failed)
    assert event is not None
    assert event.info == (
        "shepherd: PodFailed: container base exited 3; pod work/etl-load-abc; pod phase Failed; "
        "container base exited with code 3 (Error: boom)"
    )


def test_failure_details_name_init_containers_waiting_and_api_answers() -> None:
    pulled = task(
        T.TASK_STATE_FAILED,
        failure=T.FailureDetails(
            reason="FatalContainerState",
            pod_phase="Pending",
            container=T.ContainerStatus(
                name="fetch",
                kind=T.CONTAINER_KIND_INIT,
                phase=T.CONTAINER_PHASE_WAITING,
                reason="ErrImagePull",
            ),
        ),
    )
    assert translate.failure_info(pulled).endswith("init container fetch was waiting (ErrImagePull)")
    refused = T.Task(
        key=translate.task_key(AIRFLOW_KEY),
        state=T.TASK_STATE_FAILED,
        failure=T.FailureDetails(reason="LaunchRejected", message="namespace gone", api_status=404),
    )
    refused.ClearField("pod_name")
    assert translate.failure_info(refused) == (
        "shepherd: LaunchRejected: namespace gone; Kubernetes API answered 404"
    )
    lost = task(T.TASK_STATE_UP_FOR_RESCHEDULE, failure=T.FailureDetails(reason="PodLostBeforeStart"))
    event = translate.event_for(lost)
    assert event is not None
    assert event.info.startswith("shepherd: PodLostBeforeStart")


def layers(config: dict[str, object] | None, **settings: str) -> translate.PodLayers:
    files = {"/t/team.yaml": "kind: Pod\n", "/t/default.yaml": "kind: Pod # default\n"}

    def read(path: str) -> str:
        if path not in files:
            raise FileNotFoundError(path)
        return files[path]

    return translate.pod_layers(
        config,
        default_template_file=settings.get("file", ""),
        default_template_name=settings.get("name", ""),
        read_file=read,
    )


def test_the_template_comes_from_the_task_then_the_executor_file_then_its_named_template() -> None:
    assert layers(None) == translate.PodLayers()
    assert layers(None, name="gpu") == translate.PodLayers(template_name="gpu")
    assert layers({}, file="/t/default.yaml", name="gpu") == translate.PodLayers(
        template_yaml="kind: Pod # default\n"
    )
    per_task = layers({"pod_template_file": "/t/team.yaml"}, file="/t/default.yaml", name="gpu")
    assert per_task == translate.PodLayers(template_yaml="kind: Pod\n")


def test_a_v1pod_override_is_sent_as_the_apis_json() -> None:
    pod = k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(annotations={"team": "data"}, namespace="etl"),
        spec=k8s.V1PodSpec(
            service_account_name="etl-worker",
            containers=[
                k8s.V1Container(
                    name="base",
                    resources=k8s.V1ResourceRequirements(requests={"cpu": "2", "memory": "1Gi"}),
                    env=[k8s.V1EnvVar(name="MODE", value="full")],
                )
            ],
        ),
    )
    sent = layers({"pod_override": pod}).pod_override_yaml
    assert json.loads(sent) == ApiClient().sanitize_for_serialization(pod)
    assert '"serviceAccountName":"etl-worker"' in sent


def test_dict_and_text_overrides_pass_through() -> None:
    as_dict = {"metadata": {"labels": {"team": "data"}}, "spec": {"nodeSelector": None}}
    assert json.loads(layers({"pod_override": as_dict}).pod_override_yaml) == {
        "metadata": {"labels": {"team": "data"}},
        "spec": {},
    }
    text = "metadata: {annotations: {a: b}}"
    assert layers({"pod_override": text}).pod_override_yaml == text


def test_pod_to_dict_handles_nested_lists_and_times() -> None:
    when = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(creation_timestamp=when, finalizers=["x"]))
    assert translate.pod_to_dict(pod) == {
        "metadata": {"creationTimestamp": "2026-12-01T00:00:00+00:00", "finalizers": ["x"]}
    }
    with pytest.raises(ExecutorConfigError, match="not a kubernetes model"):
        translate.pod_to_dict(object())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"KubernetesExecutor": {"image": "x"}}, "pre-2.0 form"),
        ({"pod_overide": {}}, r"\['pod_overide'\] are not understood"),
        ({"pod_template_file": "/t/missing.yaml"}, "cannot read pod_template_file /t/missing.yaml"),
    ],
)
def test_an_executor_config_shepherd_cannot_honour_is_refused_by_name(
    config: dict[str, object], message: str
) -> None:
    with pytest.raises(ExecutorConfigError, match=message):
        layers(config)


def test_commands_for_both_airflow_generations() -> None:
    assert translate.workload_command('{"ti": {}}') == [
        "python",
        "-m",
        "airflow.sdk.execution_time.execute_workload",
        "--json-string",
        '{"ti": {}}',
    ]
    with pytest.raises(ExecutorConfigError, match="at most 32768"):
        translate.workload_command("x" * 40000)
    assert translate.legacy_command(("airflow", "tasks", "run", "d", "t", "r")) == [
        "airflow",
        "tasks",
        "run",
        "d",
        "t",
        "r",
    ]
    with pytest.raises(ExecutorConfigError, match="airflow tasks run"):
        translate.legacy_command(["bash", "-c", "rm -rf /"])


def test_launches_go_in_batches_within_shepherds_limit() -> None:
    items = list(range(2500))
    assert [len(b) for b in translate.batches(items, 500)] == [500] * 5
    assert [len(b) for b in translate.batches(items, 5000)] == [1000, 1000, 500]
    assert translate.batches([], 10) == []


def options(**values: str) -> Settings:
    return Settings.from_options(values.get)


def test_settings_default_to_a_local_shepherd_and_insist_on_mutual_tls(tmp_path: Path) -> None:
    plain = options(insecure="true")
    assert (plain.launcher_address, plain.reconciler_address) == ("localhost:50051", "localhost:50053")
    with pytest.raises(SettingsError, match=r"tls_ca, tls_cert, tls_key unset"):
        options()
    for name in ("ca", "crt", "key"):
        (tmp_path / name).write_text("x")
    tls = options(tls_ca=str(tmp_path / "ca"), tls_cert=str(tmp_path / "crt"), tls_key=str(tmp_path / "key"))
    assert tls.insecure is False
    with pytest.raises(SettingsError, match=r"tls_key: no file at"):
        options(tls_ca=str(tmp_path / "ca"), tls_cert=str(tmp_path / "crt"), tls_key=str(tmp_path / "nope"))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"launch_batch_size": "0"}, "launch_batch_size must be 1 to 1000"),
        ({"launch_batch_size": "many"}, r"launch_batch_size = 'many' is not a valid int"),
        ({"rpc_timeout_s": "-1"}, "rpc_timeout_s must be positive"),
        ({"insecure": "perhaps"}, "insecure = 'perhaps' is not a valid bool"),
        ({"launcher_address": "launcher"}, "launcher_address must be host:port"),
        ({"log_tail_lines": "20000"}, "log_tail_lines must be 1 to 10000"),
        ({"pod_template_file": "/nonexistent.yaml"}, "pod_template_file: no file at"),
    ],
)
def test_a_bad_setting_is_named(values: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        options(**{"insecure": "true", **values})


def test_the_connection_file_of_shepherd_serve_fills_in_what_the_section_leaves_unset(tmp_path: Path) -> None:
    for name in ("ca", "crt", "key"):
        (tmp_path / name).write_text("x")
    connection = tmp_path / "connection.json"
    connection.write_text(
        json.dumps(
            {
                "launcher": "10.0.0.1:50051",
                "watcher": "10.0.0.1:50052",
                "reconciler": "10.0.0.1:50053",
                "executor_id": "shepherd",
                "ca": str(tmp_path / "ca"),
                "cert": str(tmp_path / "crt"),
                "key": str(tmp_path / "key"),
            }
        )
    )
    settings = options(connection_file=str(connection), reconciler_address="elsewhere:1")
    assert settings.launcher_address == "10.0.0.1:50051"
    assert settings.reconciler_address == "elsewhere:1"  # the section wins
    assert settings.tls_cert == str(tmp_path / "crt")
    connection.write_text(yaml.safe_dump({"launcher": "a:1", "reconciler": "b:2"}))  # YAML is not JSON
    with pytest.raises(SettingsError, match="connection_file"):
        options(connection_file=str(connection))
