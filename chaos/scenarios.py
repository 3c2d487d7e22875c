"""The task mix: what each kind of task asks its pod to do, and how the task must end.

Pods steer their life on the kwok nodes with the annotations of docs/local-cluster.md; an
unschedulable pod asks for more CPU than any node has. The expectations are the contract a
scheduler relies on, stated once here so the checks and the report agree on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from shepherd.v1 import task_pb2

S = task_pb2
FAILURE_EXIT_CODE = 3


class Kind(Enum):
    SUCCESS = "success"
    # Runs 20-40 s, so a fault can find it Running: the etcd-compaction fault deletes some of these.
    LONG_SUCCESS = "long-success"
    FAILURE = "failure"
    IMAGE_PULL_ERROR = "image-pull-error"
    UNSCHEDULABLE = "unschedulable"
    CANCEL_RUNNING = "cancel-running"  # cancelled by the scheduler once it is reported RUNNING
    CANCEL_AT_LAUNCH = "cancel-at-launch"  # cancelled the moment the launcher acknowledged it


# Share of the tasks of each kind.
WEIGHTS: dict[Kind, float] = {
    Kind.SUCCESS: 0.45,
    Kind.LONG_SUCCESS: 0.10,
    Kind.FAILURE: 0.12,
    Kind.IMAGE_PULL_ERROR: 0.08,
    Kind.UNSCHEDULABLE: 0.08,
    Kind.CANCEL_RUNNING: 0.09,
    Kind.CANCEL_AT_LAUNCH: 0.08,
}

# kwok's first status write puts these pods Running (its start stage goes Pending -> Running in
# one write). An image-pull pod's first write leaves it Pending with a waiting container, and an
# unschedulable pod is never bound, so kwok never writes it: those pods never run.
RUNS_WHEN_STARTED = frozenset(
    {Kind.SUCCESS, Kind.LONG_SUCCESS, Kind.FAILURE, Kind.CANCEL_RUNNING, Kind.CANCEL_AT_LAUNCH}
)


def pod_override(kind: Kind, run_time_s: float) -> str:
    """The task's pod override (YAML), which decides what its pod does on a kwok node."""
    run = f"sim.shepherd.dev/run-time: {run_time_s:.1f}s"
    if kind in (Kind.SUCCESS, Kind.LONG_SUCCESS):
        return f"metadata: {{annotations: {{{run}}}}}"
    if kind is Kind.FAILURE:
        return (
            "metadata: {annotations: {sim.shepherd.dev/outcome: fail, "
            f"sim.shepherd.dev/exit-code: '{FAILURE_EXIT_CODE}', {run}}}}}"
        )
    if kind is Kind.IMAGE_PULL_ERROR:
        return "metadata: {annotations: {sim.shepherd.dev/outcome: waiting}}"
    if kind is Kind.UNSCHEDULABLE:
        return "spec: {containers: [{name: base, resources: {requests: {cpu: '100000'}}}]}"
    return "metadata: {annotations: {sim.shepherd.dev/outcome: run-forever}}"


@dataclass(frozen=True)
class Expectation:
    """How a task must end: its state, and (where the scenario decides it) the failure reason and
    the failing container's exit code."""

    state: task_pb2.TaskState.ValueType
    reason: str | None = None  # None: any reason
    exit_code: int | None = None

    def describe(self) -> str:
        text = S.TaskState.Name(self.state)
        if self.reason:
            text += (
                f" ({self.reason}" + (f", exit {self.exit_code}" if self.exit_code is not None else "") + ")"
            )
        return text

    def met_by(self, task: task_pb2.Task) -> bool:
        if task.state != self.state:
            return False
        if self.reason is not None and task.failure.reason != self.reason:
            return False
        return self.exit_code is None or task.failure.container.exit_code == self.exit_code


EXPECTED: dict[Kind, Expectation] = {
    Kind.SUCCESS: Expectation(S.TASK_STATE_SUCCEEDED),
    Kind.LONG_SUCCESS: Expectation(S.TASK_STATE_SUCCEEDED),
    Kind.FAILURE: Expectation(S.TASK_STATE_FAILED, "PodFailed", FAILURE_EXIT_CODE),
    Kind.IMAGE_PULL_ERROR: Expectation(S.TASK_STATE_FAILED, "FatalContainerState"),
    # Any reason: an outage can also fail it another way first (e.g. a launch deadline); it must
    # fail, and must not hang Pending.
    Kind.UNSCHEDULABLE: Expectation(S.TASK_STATE_FAILED),
    Kind.CANCEL_RUNNING: Expectation(S.TASK_STATE_REVOKED),
    Kind.CANCEL_AT_LAUNCH: Expectation(S.TASK_STATE_REVOKED),
}

# A long-running task whose Running pod the compaction fault deleted behind the watcher's back.
DELETED_WHILE_RUNNING = Expectation(S.TASK_STATE_FAILED, "DeletedWhileRunning")

# Failed tasks whose pods the reconciler keeps (marked done) under its default policy
# (delete_worker_pods_on_failure=false): the pod failed, or a container could not start.
KEPT_FAILURE_REASONS = frozenset({"PodFailed", "FatalContainerState"})
