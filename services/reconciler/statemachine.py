"""From pod events to task states: a pure function, tested table by table.

The mapping keeps the intent of Airflow's KubernetesExecutor and fixes its known gaps:
- transitions only move forward (QUEUED -> RUNNING -> terminal), so duplicate, replayed or
  out-of-order events are harmless, and a terminal state is final;
- a Running pod is reported RUNNING (Airflow only logged it);
- fatal waiting reasons are checked in every init and main container, not only the first;
- a pod lost before it ever ran is not a task failure: it is relaunched or rescheduled;
- failed pods are always either deleted or marked done, so nothing replays them later.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from shepherd import podmeta, taskstates
from shepherd.v1 import task_pb2, watcher_service_pb2

PodEvent = watcher_service_pb2.PodEvent
S = task_pb2

DEFAULT_FATAL_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
TERMINAL = taskstates.TERMINAL
_RANK = {
    S.TASK_STATE_UNSPECIFIED: 0,
    S.TASK_STATE_QUEUED: 1,
    S.TASK_STATE_ADOPTED: 1,
    S.TASK_STATE_RUNNING: 2,
}


def rank(state: task_pb2.TaskState.ValueType) -> int:
    return _RANK.get(state, 3)


def moves_forward(current: task_pb2.TaskState.ValueType, new: task_pb2.TaskState.ValueType) -> bool:
    return current not in TERMINAL and rank(new) > rank(current)


class PodAction(Enum):
    NONE = "none"
    DELETE = "delete"
    MARK_DONE = "mark-done"  # keep the pod (for debugging) but take it out of every selector


@dataclass(frozen=True)
class Policy:
    """The knobs of the mapping, from the reconciler's settings."""

    delete_worker_pods: bool = True
    delete_worker_pods_on_failure: bool = False
    fatal_reasons: frozenset[str] = DEFAULT_FATAL_REASONS


@dataclass(frozen=True)
class Decision:
    """What one event means for its task."""

    state: task_pb2.TaskState.ValueType | None = None  # None: no transition
    failure: task_pb2.FailureDetails | None = None
    action: PodAction = PodAction.NONE
    lost_before_start: bool = False  # pod gone before it ran: relaunch or reschedule, not a failure
    note: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def _deleted(event: PodEvent) -> bool:
    return event.type == watcher_service_pb2.POD_EVENT_TYPE_DELETED


def _containers(event: PodEvent) -> Iterable[task_pb2.ContainerStatus]:
    yield from event.init_containers
    yield from event.containers


def fatal_waiting(event: PodEvent, reasons: frozenset[str]) -> task_pb2.ContainerStatus | None:
    """The first container (init containers first) waiting on a fatal reason, if any."""
    for status in _containers(event):
        if status.phase != S.CONTAINER_PHASE_WAITING or status.reason not in reasons:
            continue
        if status.reason == "ErrImagePull" and "pull QPS exceeded" in status.message:
            continue  # the kubelet's own rate limit: transient, it will pull again
        return status
    return None


def failing_container(event: PodEvent) -> task_pb2.ContainerStatus | None:
    """The container to blame: a non-zero, non-Completed exit (init first), else the last waiting one."""
    for status in _containers(event):
        if (
            status.phase == S.CONTAINER_PHASE_TERMINATED
            and status.exit_code != 0
            and status.reason != "Completed"
        ):
            return status
    waiting = [s for s in _containers(event) if s.phase == S.CONTAINER_PHASE_WAITING]
    return waiting[-1] if waiting else None


def failure_details(
    event: PodEvent, reason: str, message: str, container: task_pb2.ContainerStatus | None = None
) -> task_pb2.FailureDetails:
    details = task_pb2.FailureDetails(
        reason=reason,
        message=message,
        pod_phase=event.phase,
        pod_reason=event.reason,
        pod_message=event.message,
    )
    blamed = container if container is not None else failing_container(event)
    if blamed is not None:
        details.container.CopyFrom(blamed)
    return details


def _failed_message(event: PodEvent) -> str:
    blamed = failing_container(event)
    if blamed is not None and blamed.phase == S.CONTAINER_PHASE_TERMINATED:
        kind = "init container" if blamed.kind == S.CONTAINER_KIND_INIT else "container"
        text = f"{kind} {blamed.name!r} exited with code {blamed.exit_code} ({blamed.reason or 'no reason'})"
    elif blamed is not None:
        text = f"container {blamed.name!r} is waiting: {blamed.reason}"
    else:
        text = "the pod failed"
    if event.reason:
        text += f"; pod: {event.reason}" + (f": {event.message}" if event.message else "")
    return text


def _finished(policy: Policy, failed: bool) -> PodAction:
    if policy.delete_worker_pods and (not failed or policy.delete_worker_pods_on_failure):
        return PodAction.DELETE
    return PodAction.MARK_DONE


def decide(current: task_pb2.TaskState.ValueType, event: PodEvent, policy: Policy) -> Decision:
    """The decision for one pod event of a task currently in `current`."""
    phase = event.phase
    if event.labels.get(podmeta.LABEL_REVOKED) == "true" or current == S.TASK_STATE_REVOKED:
        # A cancelled task's pod: whatever it does, it goes away; the task stays REVOKED.
        return Decision(action=PodAction.NONE if _deleted(event) else PodAction.DELETE, note="revoked")
    if _deleted(event) and not event.HasField("deletion_time"):
        # The pod left our selector without being deleted: marked done by us, or relabelled by an
        # adopting executor. Either way there is nothing left to decide here.
        return Decision(note="left the executor's selector")
    if event.reason == "ProviderFailed":
        return Decision(
            S.TASK_STATE_FAILED,
            failure_details(event, "ProviderFailed", event.message or "provider failed"),
            _finished(policy, failed=True),
        )
    if phase == "Pending":
        if _deleted(event):
            return Decision(
                lost_before_start=True,
                note="deleted while Pending, before it ever ran",
                failure=failure_details(event, "PodLostBeforeStart", "the pod was deleted before it started"),
            )
        if (fatal := fatal_waiting(event, policy.fatal_reasons)) is not None:
            kind = "init container" if fatal.kind == S.CONTAINER_KIND_INIT else "container"
            return Decision(
                S.TASK_STATE_FAILED,
                failure_details(
                    event,
                    "FatalContainerState",
                    f"{kind} {fatal.name!r} cannot start: {fatal.reason}: {fatal.message}".rstrip(": "),
                    fatal,
                ),
                _finished(policy, failed=True),
            )
        return Decision(S.TASK_STATE_QUEUED)
    if phase == "Failed":
        if event.reason == "Evicted" and current in (S.TASK_STATE_QUEUED, S.TASK_STATE_ADOPTED):
            return Decision(
                lost_before_start=True,
                action=_finished(policy, failed=True),
                note="evicted before it ever ran",
                failure=failure_details(event, "PodLostBeforeStart", event.message or "evicted"),
            )
        return Decision(
            S.TASK_STATE_FAILED,
            failure_details(event, "PodFailed", _failed_message(event)),
            _finished(policy, failed=True),
        )
    if phase == "Succeeded":
        return Decision(S.TASK_STATE_SUCCEEDED, action=_finished(policy, failed=False))
    if phase == "Running":
        if _deleted(event):
            return Decision(
                S.TASK_STATE_FAILED,
                failure_details(event, "DeletedWhileRunning", "the pod was deleted while it was running"),
            )
        return Decision(S.TASK_STATE_RUNNING)
    return Decision(note=f"phase {phase or 'unknown'}: nothing to decide")
