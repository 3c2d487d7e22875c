"""Pure translation between Airflow's executor vocabulary and Shepherd's contract.

Everything the executor decides without a network or a scheduler lives here, so it can be tested
table by table without Airflow installed: which Shepherd task a task instance is, which Airflow
event a Shepherd transition becomes (and with what text), how `executor_config` turns into the
launch request's template and override, and what the worker pod runs. The module imports neither
Airflow nor gRPC; Airflow's objects reach it only as duck-typed values.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from shepherd_airflow.v1 import task_pb2

# What the worker pod runs for an Airflow 3 workload: the Task SDK's own entry point, which reads
# the workload, talks to the API server for its state and runs the task.
WORKLOAD_ENTRYPOINT = ("python", "-m", "airflow.sdk.execution_time.execute_workload", "--json-string")

# Shepherd's own limits on one launch (protos: LaunchTaskRequest).
MAX_BATCH = 1000
MAX_COMMAND_ITEM = 32768
MAX_RESUMPTION = 1_000_000  # TaskKey.resumption
# How far apart the scheduler's and the launcher's clocks may be when telling whether a Shepherd
# task was launched for an instance's current queueing (see `predates`).
CLOCK_SKEW = dt.timedelta(seconds=2)


class KeyLike(Protocol):
    """Airflow's TaskInstanceKey (a NamedTuple in 2.10 and 3.x) as far as Shepherd needs it."""

    @property
    def dag_id(self) -> str: ...
    @property
    def task_id(self) -> str: ...
    @property
    def run_id(self) -> str: ...
    @property
    def try_number(self) -> int: ...
    @property
    def map_index(self) -> int: ...


class KeyFields(NamedTuple):
    """A TaskInstanceKey's fields in its own order, so `TaskInstanceKey(*fields)` rebuilds it."""

    dag_id: str
    task_id: str
    run_id: str
    try_number: int
    map_index: int


def task_key(key: KeyLike, resumption: int = 0) -> task_pb2.TaskKey:
    """The Shepherd task of one queueing of a task-instance try: the same five fields, one to
    one, and the resumption: how many times Airflow queued this try before (a deferred task
    resuming, a reschedule-mode sensor poking again, both under the same TaskInstanceKey)."""
    return task_pb2.TaskKey(
        dag_id=key.dag_id,
        task_id=key.task_id,
        run_id=key.run_id,
        try_number=int(key.try_number),
        map_index=int(key.map_index),
        resumption=resumption,
    )


def key_fields(key: task_pb2.TaskKey) -> KeyFields:
    return KeyFields(key.dag_id, key.task_id, key.run_id, key.try_number, key.map_index)


def key_text(key: KeyLike | task_pb2.TaskKey) -> str:
    """The key as Shepherd's CLI spells it (dag/task/run/try/map[/resumption]), for log lines
    and messages."""
    text = f"{key.dag_id}/{key.task_id}/{key.run_id}/{key.try_number}/{key.map_index}"
    resumption = getattr(key, "resumption", 0)
    return f"{text}/{resumption}" if resumption else text


def latest_resumption(lookup: Callable[[int], task_pb2.Task | None], known: task_pb2.Task) -> task_pb2.Task:
    """The task of the highest resumption Shepherd has of `known`'s try, `known` being one it has.

    Resumptions of a try are launched one after the other, so those Shepherd still has are a run
    of consecutive numbers (the oldest may have been pruned): probe upwards in doubling steps
    until one is missing, then halve the gap. A sensor poked a thousand times costs some twenty
    reads, once per scheduler start.
    """
    found, low = known, known.key.resumption
    high = None  # the lowest resumption known to be missing
    step = 1
    while high is None:
        probe = low + step
        if probe > MAX_RESUMPTION:
            high = MAX_RESUMPTION + 1
        elif (task := lookup(probe)) is not None:
            found, low, step = task, probe, step * 2
        else:
            high = probe
    while high - low > 1:
        middle = (low + high) // 2
        if (task := lookup(middle)) is not None:
            found, low = task, middle
        else:
            high = middle
    return found


def predates(task: task_pb2.Task, queued_at: dt.datetime | None) -> bool:
    """Whether Shepherd accepted `task` before the task instance was last queued (its
    `queued_dttm`): then it was launched for an earlier queueing of the same try, and is not the
    run the instance now waits for. Unknown times count as not earlier."""
    if queued_at is None or not task.HasField("queued_time"):
        return False
    accepted = task.queued_time.ToDatetime(tzinfo=dt.UTC)
    if queued_at.tzinfo is None:
        queued_at = queued_at.replace(tzinfo=dt.UTC)
    return accepted < queued_at - CLOCK_SKEW


class Outcome(enum.Enum):
    """What the executor tells Airflow about a task instance after a Shepherd transition."""

    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    # The pod was lost before it ran (UP_FOR_RESCHEDULE) or the task was cancelled (REVOKED):
    # the try never ran its code. Airflow gets the instance back to schedule again; see
    # executor.py for how each Airflow version is told so.
    REQUEUE = "requeue"


@dataclass(frozen=True)
class Event:
    """One event for Airflow's event buffer: which instance, what happened, and the info text."""

    key: KeyFields
    outcome: Outcome
    info: str
    terminal: bool


_OUTCOMES: Mapping[int, Outcome] = {
    task_pb2.TASK_STATE_RUNNING: Outcome.RUNNING,
    task_pb2.TASK_STATE_SUCCEEDED: Outcome.SUCCESS,
    task_pb2.TASK_STATE_FAILED: Outcome.FAILED,
    task_pb2.TASK_STATE_UP_FOR_RESCHEDULE: Outcome.REQUEUE,
    task_pb2.TASK_STATE_REVOKED: Outcome.REQUEUE,
}

TERMINAL_STATES = frozenset(
    {
        task_pb2.TASK_STATE_SUCCEEDED,
        task_pb2.TASK_STATE_FAILED,
        task_pb2.TASK_STATE_UP_FOR_RESCHEDULE,
        task_pb2.TASK_STATE_REVOKED,
    }
)


def event_for(task: task_pb2.Task) -> Event | None:
    """The Airflow event a task in this state means, or None when Airflow need not hear of it
    (QUEUED: Airflow already has it queued; ADOPTED: it changed owners inside Shepherd)."""
    outcome = _OUTCOMES.get(task.state)
    if outcome is None:
        return None
    if task.state == task_pb2.TASK_STATE_REVOKED:
        info = f"shepherd: task {key_text(task.key)} was cancelled before it finished"
    elif outcome in (Outcome.RUNNING, Outcome.SUCCESS):
        info = f"{task.namespace}/{task.pod_name}" if task.pod_name else ""
    else:
        info = failure_info(task)
    return Event(key_fields(task.key), outcome, info, task.state in TERMINAL_STATES)


def failure_info(task: task_pb2.Task) -> str:
    """One line a person can act on: Shepherd's reason and message, then the pod's and the
    failing container's view, each part only when Shepherd knows it."""
    failure = task.failure
    parts = [f"shepherd: {failure.reason or task_pb2.TaskState.Name(task.state)}"]
    if failure.message:
        parts[0] += f": {failure.message}"
    if task.pod_name:
        parts.append(f"pod {task.namespace}/{task.pod_name}")
    pod = " ".join(p for p in (failure.pod_phase, failure.pod_reason) if p)
    if pod:
        parts.append(f"pod phase {pod}" + (f" ({failure.pod_message})" if failure.pod_message else ""))
    if failure.HasField("container"):
        c = failure.container
        kind = "init container" if c.kind == task_pb2.CONTAINER_KIND_INIT else "container"
        text = f"{kind} {c.name}"
        if c.phase == task_pb2.CONTAINER_PHASE_TERMINATED:
            text += f" exited with code {c.exit_code}"
        elif c.phase == task_pb2.CONTAINER_PHASE_WAITING:
            text += " was waiting"
        if c.reason:
            text += f" ({c.reason}" + (f": {c.message}" if c.message else "") + ")"
        parts.append(text)
    if failure.api_status:
        parts.append(f"Kubernetes API answered {failure.api_status}")
    return "; ".join(parts)


class ExecutorConfigError(ValueError):
    """An `executor_config` Shepherd cannot launch; the task fails at once with this message."""


@dataclass(frozen=True)
class PodLayers:
    """The launch request's pod fields: a named template or a whole one, and the override."""

    template_name: str = ""
    template_yaml: str = ""
    pod_override_yaml: str = ""


def pod_layers(
    executor_config: Mapping[str, Any] | None,
    *,
    default_template_file: str,
    default_template_name: str,
    read_file: Callable[[str], str],
) -> PodLayers:
    """The pod fields for one task, from its `executor_config` and the executor's settings.

    Template: the task's `pod_template_file`, else the executor's, else the executor's named
    template (empty: the launcher's default). Override: `pod_override`, a kubernetes V1Pod (or a
    dict of one, or YAML/JSON text), sent as JSON. Airflow's long-gone `{"KubernetesExecutor":
    {...}}` form and unknown keys are refused by name rather than ignored, so a DAG never runs
    silently without the pod it asked for.
    """
    config = dict(executor_config or {})
    if "KubernetesExecutor" in config:
        raise ExecutorConfigError(
            'executor_config["KubernetesExecutor"] is the pre-2.0 form; give a pod_override (a V1Pod) instead'
        )
    unknown = sorted(set(config) - {"pod_override", "pod_template_file"})
    if unknown:
        raise ExecutorConfigError(
            f"executor_config keys {unknown} are not understood; "
            "Shepherd reads pod_override and pod_template_file"
        )
    template_file = config.get("pod_template_file") or default_template_file
    layers = PodLayers(template_name="" if template_file else default_template_name)
    if template_file:
        try:
            layers = PodLayers(template_yaml=read_file(str(template_file)))
        except OSError as err:
            raise ExecutorConfigError(f"cannot read pod_template_file {template_file}: {err}") from None
    override = config.get("pod_override")
    if override is None:
        return layers
    if isinstance(override, str):
        text = override
    else:
        text = json.dumps(pod_to_dict(override), sort_keys=True, separators=(",", ":"))
    return PodLayers(layers.template_name, layers.template_yaml, text)


def pod_to_dict(obj: Any) -> Any:
    """A kubernetes client model (V1Pod and everything in it) as the API's JSON, with the wire
    names (`serviceAccountName`, not `service_account_name`) and no unset fields.

    Done by reading the models' own `openapi_types` and `attribute_map`, so the package needs no
    kubernetes client of its own: a DAG that builds a V1Pod has one installed already.
    """
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): pod_to_dict(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, Sequence):
        return [pod_to_dict(v) for v in obj]
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    types = getattr(obj, "openapi_types", None)
    names = getattr(obj, "attribute_map", None)
    if not isinstance(types, Mapping) or not isinstance(names, Mapping):
        raise ExecutorConfigError(f"pod_override holds a {type(obj).__name__}, not a kubernetes model")
    out: dict[str, Any] = {}
    for attr in types:
        value = getattr(obj, attr, None)
        if value is not None:
            out[names.get(attr, attr)] = pod_to_dict(value)
    return out


def workload_command(workload_json: str) -> list[str]:
    """What the `base` container runs for an Airflow 3 ExecuteTask workload (given as its JSON)."""
    command = [*WORKLOAD_ENTRYPOINT, workload_json]
    if len(workload_json) > MAX_COMMAND_ITEM:
        raise ExecutorConfigError(
            f"the workload is {len(workload_json)} characters; "
            f"Shepherd takes at most {MAX_COMMAND_ITEM} per argument"
        )
    return command


def legacy_command(command: Sequence[str]) -> list[str]:
    """An Airflow 2 command (`airflow tasks run ...`), checked the way Airflow's own executors do."""
    items = [str(c) for c in command]
    if items[:3] != ["airflow", "tasks", "run"]:
        raise ExecutorConfigError(f"the command must start with 'airflow tasks run', got {items[:3]}")
    return items


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """`items` in launch calls of at most `size` (and never more than Shepherd's batch limit)."""
    step = max(1, min(size, MAX_BATCH))
    return [items[i : i + step] for i in range(0, len(items), step)]


def state_rank(state: int) -> int:
    """How far along QUEUED -> RUNNING -> terminal a state is; a task's state never goes down.
    ADOPTED (a task that changed owners before it ran or while it ran) ranks with QUEUED, as in
    the reconciler: it is followed by RUNNING or a terminal state."""
    if state in TERMINAL_STATES:
        return 3
    if state == task_pb2.TASK_STATE_RUNNING:
        return 2
    return 1 if state in (task_pb2.TASK_STATE_QUEUED, task_pb2.TASK_STATE_ADOPTED) else 0


class ReadFloors:
    """Keeps a task's re-read state from being followed by an older one off the stream.

    The feed subscribes first and reads the tracked tasks with GetTask second, so nothing falls
    between the two; but a read may already show a state whose transitions the stream has still
    to send (RUNNING after a SUCCEEDED read). Each read sets a floor for its task: a transition
    below it is stale and dropped, the read state's own transition is a duplicate (dropped, and
    the stream has caught up: the floor goes), anything above it is news. Floors live only until
    the next re-read, so there are never more than the tasks tracked.
    """

    def __init__(self) -> None:
        self._floors: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._floors)

    def clear(self) -> None:
        self._floors.clear()

    def read(self, task: task_pb2.Task) -> None:
        self._floors[task.key.SerializeToString(deterministic=True)] = task.state

    def is_news(self, task: task_pb2.Task) -> bool:
        """Whether a streamed transition says more than the task's re-read did."""
        name = task.key.SerializeToString(deterministic=True)
        floor = self._floors.get(name)
        if floor is None:
            return True
        rank, floor_rank = state_rank(task.state), state_rank(floor)
        if rank < floor_rank:
            return False
        del self._floors[name]
        return task.state != floor
