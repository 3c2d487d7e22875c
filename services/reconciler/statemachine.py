"""Every task-state decision, as pure functions tested table by table.

Whatever moves a task (a pod event, a launch event, a cancel, a pending deadline, a pod that
vanished from a snapshot, a refused relaunch), the decision is made here, from the task's current
state and the facts of the input; the engine only applies decisions, durably and in order. So
there is one place to read what a task can go through.

The mapping keeps the intent of Airflow's KubernetesExecutor and fixes its known gaps:
- transitions only move forward (QUEUED -> RUNNING -> terminal), so duplicate, replayed or
  out-of-order events are harmless, and a terminal state is final;
- a Running pod is reported RUNNING (Airflow only logged it);
- the `base` container decides the outcome: when it ends, the task ends, even while sidecars (a
  mesh proxy, a log shipper) keep the pod Running;
- fatal waiting reasons are checked in every init and main container, not only the first;
- a pod lost before it ever ran is not a task failure: it is relaunched or rescheduled;
- a pod that left the executor's selector is told from a deleted one by facts (the watcher's
  reading of the pod, or our own action on it), never by a missing field;
- failed pods are always either deleted or marked done, so nothing replays them later.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeAlias

from google.protobuf.timestamp_pb2 import Timestamp

from shepherd import podmeta, taskstates
from shepherd.v1 import launcher_service_pb2, task_pb2, watcher_service_pb2

PodEvent = watcher_service_pb2.PodEvent
Launch = launcher_service_pb2.Launch
S = task_pb2
W = watcher_service_pb2
TaskState: TypeAlias = task_pb2.TaskState.ValueType

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


def rank(state: TaskState) -> int:
    return _RANK.get(state, 3)


def moves_forward(current: TaskState, new: TaskState) -> bool:
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
    """What one input means for its task."""

    state: TaskState | None = None  # None: no transition
    failure: task_pb2.FailureDetails | None = None
    action: PodAction = PodAction.NONE  # for the pod the input is about (or the task's pod)
    lost_before_start: bool = False  # pod gone before it ran: settle it with after_loss()
    relaunch: bool = False  # ask the launcher for a new pod (only after_loss() sets it)
    note: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def _deleted(event: PodEvent) -> bool:
    return event.type == watcher_service_pb2.POD_EVENT_TYPE_DELETED


def _containers(event: PodEvent) -> Iterable[task_pb2.ContainerStatus]:
    yield from event.init_containers
    yield from event.containers


def base_container(event: PodEvent) -> task_pb2.ContainerStatus | None:
    """The status of the container that runs the task, once the pod reports one."""
    return next((c for c in event.containers if c.name == podmeta.BASE_CONTAINER), None)


def how_gone(event: PodEvent, *, acted_on_pod: bool) -> W.PodGone.ValueType:
    """Whether a DELETED pod was deleted or only left the executor's selector. The watcher says so
    (it reads the pod); when it could not, a requested deletion means deleted, and so does any
    other disappearance unless we ourselves took the pod out of view (marked it done)."""
    if event.gone != W.POD_GONE_UNSPECIFIED:
        return event.gone
    if event.HasField("deletion_time") or not acted_on_pod:
        return W.POD_GONE_DELETED
    return W.POD_GONE_LEFT_SELECTOR


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


def _base_ended(event: PodEvent, base: task_pb2.ContainerStatus, policy: Policy) -> Decision:
    """The task's container has terminated: its exit is the task's outcome, whatever sidecars do."""
    if base.exit_code == 0:
        return Decision(S.TASK_STATE_SUCCEEDED, action=_finished(policy, failed=False))
    message = f"container {base.name!r} exited with code {base.exit_code} ({base.reason or 'no reason'})"
    if event.reason:
        message += f"; pod: {event.reason}" + (f": {event.message}" if event.message else "")
    return Decision(
        S.TASK_STATE_FAILED,
        failure_details(event, "PodFailed", message, base),
        _finished(policy, failed=True),
    )


def _finished(policy: Policy, failed: bool) -> PodAction:
    if policy.delete_worker_pods and (not failed or policy.delete_worker_pods_on_failure):
        return PodAction.DELETE
    return PodAction.MARK_DONE


def decide(current: TaskState, event: PodEvent, policy: Policy, *, acted_on_pod: bool = False) -> Decision:
    """The decision for one pod event of a task currently in `current`. `acted_on_pod`: this
    reconciler has already deleted the pod or marked it done (consulted only when the watcher could
    not tell how a pod went out of view)."""
    phase = event.phase
    if event.labels.get(podmeta.LABEL_REVOKED) == "true" or current == S.TASK_STATE_REVOKED:
        # A cancelled task's pod: whatever it does, it goes away; the task stays REVOKED.
        return Decision(action=PodAction.NONE if _deleted(event) else PodAction.DELETE, note="revoked")
    if _deleted(event) and how_gone(event, acted_on_pod=acted_on_pod) == W.POD_GONE_LEFT_SELECTOR:
        # The pod still exists, out of our selector: marked done by us, or relabelled by an
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
    if (
        phase == "Failed"
        and event.reason == "Evicted"
        and current in (S.TASK_STATE_QUEUED, S.TASK_STATE_ADOPTED)
    ):
        return Decision(
            lost_before_start=True,
            action=_finished(policy, failed=True),
            note="evicted before it ever ran",
            failure=failure_details(event, "PodLostBeforeStart", event.message or "evicted"),
        )
    if (base := base_container(event)) is not None and base.phase == S.CONTAINER_PHASE_TERMINATED:
        # Sidecars may keep the pod Running (or fail it once stopped): `base` alone decides.
        return _base_ended(event, base, policy)
    if phase == "Failed":
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


def after_loss(attempts: int, relaunch_budget: int, failure: task_pb2.FailureDetails | None) -> Decision:
    """A task whose pod was lost before it ran, on launch attempt `attempts`: relaunch it while the
    budget lasts, then hand it back to the scheduler as UP_FOR_RESCHEDULE (not a failure)."""
    if attempts - 1 < relaunch_budget:
        return Decision(relaunch=True, failure=failure, note="pod lost before it ran: relaunching")
    return Decision(S.TASK_STATE_UP_FOR_RESCHEDULE, failure)


def decide_launch(current: TaskState, launch: Launch) -> Decision:
    """The decision for one launch event (from the launcher's log) of a task in `current`."""
    state = launch.state
    if state == launcher_service_pb2.LAUNCH_STATE_ACCEPTED and moves_forward(current, S.TASK_STATE_QUEUED):
        return Decision(S.TASK_STATE_QUEUED)
    if state == launcher_service_pb2.LAUNCH_STATE_FAILED and moves_forward(current, S.TASK_STATE_FAILED):
        return Decision(S.TASK_STATE_FAILED, launch.failure)
    if state == launcher_service_pb2.LAUNCH_STATE_CANCELLED and current not in TERMINAL:
        # Cancelled at the launcher (CancelLaunch): the task will never run. A pod whose create
        # was already in flight may exist or still appear: it goes away.
        return Decision(S.TASK_STATE_REVOKED, action=PodAction.DELETE, note="launch cancelled")
    return Decision()


def is_new_life(task: task_pb2.Task, accepted: Timestamp, *, pruned_at: float = 0.0) -> bool:
    """Whether a launch accepted at `accepted` is a new launch of the key of `task`, which ended
    (the launcher forgot the old launch and took the key again), rather than an event of the
    launch `task` came from, read late.

    Every event of one launch carries the time it was accepted, relaunches included, and so does
    the task made from it (`queued_time`): on the launcher's own clock, both. A task made from its
    pod's events before its launch's were read has none; for a pruned one (its tombstone), only a
    launch accepted after the pruning is new (the reconciler's clock: clocks far apart may take a
    new launch for a late event, never the other way round, which would run a task twice); for
    one still kept, no launch is taken for a new one."""
    if task.state not in TERMINAL or not _is_set(accepted):
        return False
    if task.HasField("queued_time"):
        return accepted.ToNanoseconds() > task.queued_time.ToNanoseconds()
    return bool(pruned_at) and accepted.ToNanoseconds() / 1e9 > pruned_at


def is_new_pod_life(created: Timestamp, *, pruned_at: float) -> bool:
    """Whether a pod created at `created`, of a key whose task was pruned at `pruned_at`, belongs
    to a new life of the key: only a pod created after the pruning does (unset: unknown, so not)."""
    return _is_set(created) and created.ToNanoseconds() / 1e9 > pruned_at


def _is_set(stamp: Timestamp) -> bool:
    return bool(stamp.seconds or stamp.nanos)


def decide_cancel(current: TaskState) -> Decision:
    """CancelTask: an unfinished task is revoked and its pod deleted; a finished one stays as it is."""
    if current in TERMINAL:
        return Decision(note="already finished")
    return Decision(S.TASK_STATE_REVOKED, action=PodAction.DELETE)


def decide_adoption(current: TaskState) -> Decision:
    """A pod relabelled to this executor came into view: its task, new to us, is ADOPTED."""
    return Decision(S.TASK_STATE_ADOPTED) if current == S.TASK_STATE_UNSPECIFIED else Decision()


def decide_stale_pod(event: PodEvent) -> Decision:
    """A pod of an earlier launch attempt no longer speaks for its task: it only goes away."""
    return Decision(action=PodAction.NONE if _deleted(event) else PodAction.DELETE, note="earlier attempt")


def decide_pending_timeout(current: TaskState, timeout_s: float, why_pending: str) -> Decision:
    """The task's pod stayed Pending past the timeout: the task fails and the pod is deleted."""
    if current in TERMINAL or current == S.TASK_STATE_RUNNING:
        return Decision()
    message = f"the pod stayed Pending for more than {timeout_s:g}s"
    if why_pending:
        message += f" ({why_pending})"
    failure = task_pb2.FailureDetails(reason="PendingTimeout", message=message, pod_phase="Pending")
    return Decision(S.TASK_STATE_FAILED, failure, PodAction.DELETE)


def decide_unseen(current: TaskState, timeout_s: float) -> Decision:
    """The launcher created the pod but the watcher never reported it within the timeout."""
    if current in TERMINAL:
        return Decision()
    failure = task_pb2.FailureDetails(
        reason="PodLostBeforeStart", message=f"the pod was created but never seen within {timeout_s:g}s"
    )
    return Decision(lost_before_start=True, failure=failure)


def decide_vanished(current: TaskState) -> Decision:
    """A snapshot of current pods no longer has the task's pod: it went away while nobody watched."""
    if current in TERMINAL:
        return Decision()
    if current == S.TASK_STATE_RUNNING:
        failure = task_pb2.FailureDetails(
            reason="DeletedWhileRunning", message="the pod disappeared while it was running"
        )
        return Decision(S.TASK_STATE_FAILED, failure)
    failure = task_pb2.FailureDetails(
        reason="PodLostBeforeStart", message="the pod disappeared before it started"
    )
    return Decision(lost_before_start=True, failure=failure)


def decide_launch_lost(current: TaskState) -> Decision:
    """A QUEUED task without a pod whose launch the launcher no longer has: its launch ended (the
    launcher forgets a launch that failed or was cancelled with its last event) while the
    reconciler was not reading, and the outcome was pruned unread. No pod was made: it failed."""
    if current != S.TASK_STATE_QUEUED:
        return Decision()
    failure = task_pb2.FailureDetails(
        reason="LaunchOutcomeLost",
        message="the launch ended without a pod (it failed or was cancelled) while the reconciler "
        "was not reading the launcher's events, which were pruned before it could",
    )
    return Decision(S.TASK_STATE_FAILED, failure)


def decide_relaunch_refused(current: TaskState, why: str) -> Decision:
    """The launcher cannot relaunch the task's lost pod (e.g. it never launched it): reschedule."""
    if current in TERMINAL:
        return Decision()
    failure = task_pb2.FailureDetails(
        reason="PodLostBeforeStart", message=f"the pod was lost and cannot be relaunched: {why}"
    )
    return Decision(S.TASK_STATE_UP_FOR_RESCHEDULE, failure)
