"""The pod-event -> task-state mapping, row by row of the reference table, with its gaps fixed."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from services.reconciler.statemachine import (
    PodAction,
    Policy,
    decide,
    decide_cancel,
    decide_launch,
    decide_launch_lost,
    is_new_life,
    moves_forward,
)
from shepherd import podmeta
from shepherd.v1 import launcher_service_pb2, task_pb2, watcher_service_pb2
from tests.helpers import task_key
from tests.helpers.pods import container, pod_event

S = task_pb2
W = watcher_service_pb2
KEY = task_key()
WAITING = S.CONTAINER_PHASE_WAITING
RUNNING = S.CONTAINER_PHASE_RUNNING
TERMINATED = S.CONTAINER_PHASE_TERMINATED
L = launcher_service_pb2


def test_a_revoked_pod_is_deleted_whatever_it_does() -> None:
    event = pod_event(KEY, "Running", labels={podmeta.LABEL_REVOKED: "true"})
    decision = decide(S.TASK_STATE_RUNNING, event, Policy())
    assert (decision.state, decision.action) == (None, PodAction.DELETE)


def test_a_pod_that_left_the_selector_changes_nothing() -> None:
    event = pod_event(KEY, "Running", kind=W.POD_EVENT_TYPE_DELETED, gone=W.POD_GONE_LEFT_SELECTOR)
    decision = decide(S.TASK_STATE_RUNNING, event, Policy())
    assert (decision.state, decision.action, decision.lost_before_start) == (None, PodAction.NONE, False)


def test_a_running_pod_found_deleted_after_a_watch_gap_fails_the_task() -> None:
    # The watcher rebuilds a vanished pod's DELETED from its last known state: no deletionTimestamp,
    # but the watcher read the pod by name and says it was deleted.
    event = pod_event(KEY, "Running", kind=W.POD_EVENT_TYPE_DELETED, gone=W.POD_GONE_DELETED)
    event.synthetic = True
    decision = decide(S.TASK_STATE_RUNNING, event, Policy())
    assert decision.state == S.TASK_STATE_FAILED
    assert decision.failure is not None
    assert decision.failure.reason == "DeletedWhileRunning"


def test_a_pending_pod_found_deleted_after_a_watch_gap_is_a_loss() -> None:
    event = pod_event(KEY, "Pending", kind=W.POD_EVENT_TYPE_DELETED, gone=W.POD_GONE_DELETED)
    event.synthetic = True
    decision = decide(S.TASK_STATE_QUEUED, event, Policy())
    assert decision.lost_before_start
    assert decision.state is None


@pytest.mark.parametrize(("acted", "state"), [(False, S.TASK_STATE_FAILED), (True, None)])
def test_an_unexplained_disappearance_is_a_deletion_unless_we_acted_on_the_pod(
    acted: bool, state: int | None
) -> None:
    # The watcher could not read the pod: only our own record says whether we took it away.
    event = pod_event(KEY, "Running", kind=W.POD_EVENT_TYPE_DELETED)
    assert decide(S.TASK_STATE_RUNNING, event, Policy(), acted_on_pod=acted).state == state


def test_provider_failed_fails_the_task() -> None:
    decision = decide(S.TASK_STATE_RUNNING, pod_event(KEY, "Pending", reason="ProviderFailed"), Policy())
    assert decision.state == S.TASK_STATE_FAILED
    assert decision.failure is not None
    assert decision.failure.reason == "ProviderFailed"


def test_a_pending_pod_deleted_before_it_ran_is_a_loss_not_a_failure() -> None:
    event = pod_event(KEY, "Pending", kind=W.POD_EVENT_TYPE_DELETED, deleting=True)
    decision = decide(S.TASK_STATE_QUEUED, event, Policy())
    assert decision.state is None
    assert decision.lost_before_start


@pytest.mark.parametrize(
    "reason",
    [
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    ],
)
def test_a_fatal_waiting_reason_fails_the_task_at_once(reason: str) -> None:
    event = pod_event(KEY, "Pending", containers=[container(phase=WAITING, reason=reason, message="nope")])
    decision = decide(S.TASK_STATE_QUEUED, event, Policy())
    assert decision.state == S.TASK_STATE_FAILED
    assert decision.failure is not None
    assert decision.failure.reason == "FatalContainerState"
    assert decision.failure.container.reason == reason


def test_every_container_is_checked_not_only_the_first() -> None:
    event = pod_event(
        KEY,
        "Pending",
        containers=[
            container("base", phase=WAITING, reason="ContainerCreating"),
            container("sidecar", phase=WAITING, reason="ErrImagePull"),
        ],
    )
    decision = decide(S.TASK_STATE_QUEUED, event, Policy())
    assert decision.failure is not None
    assert decision.failure.container.name == "sidecar"


def test_an_init_container_in_a_fatal_state_fails_the_task() -> None:
    event = pod_event(
        KEY,
        "Pending",
        init_containers=[container("fetch", phase=WAITING, reason="CreateContainerConfigError", init=True)],
    )
    decision = decide(S.TASK_STATE_QUEUED, event, Policy())
    assert decision.failure is not None
    assert decision.failure.container.kind == S.CONTAINER_KIND_INIT


def test_the_kubelets_own_pull_rate_limit_is_not_fatal() -> None:
    event = pod_event(
        KEY,
        "Pending",
        containers=[container(phase=WAITING, reason="ErrImagePull", message="pull QPS exceeded")],
    )
    assert decide(S.TASK_STATE_QUEUED, event, Policy()).state == S.TASK_STATE_QUEUED


def test_the_fatal_reasons_are_configurable() -> None:
    event = pod_event(KEY, "Pending", containers=[container(phase=WAITING, reason="ErrImagePull")])
    assert decide(S.TASK_STATE_QUEUED, event, Policy(fatal_reasons=frozenset())).state == S.TASK_STATE_QUEUED


def test_a_failed_pod_blames_the_failing_init_container_first() -> None:
    event = pod_event(
        KEY,
        "Failed",
        init_containers=[container("fetch", phase=TERMINATED, reason="Error", exit_code=3, init=True)],
        containers=[container("base", phase=WAITING, reason="PodInitializing")],
    )
    decision = decide(S.TASK_STATE_QUEUED, event, Policy())
    assert decision.failure is not None
    assert (decision.failure.container.name, decision.failure.container.exit_code) == ("fetch", 3)
    assert "init container 'fetch' exited with code 3" in decision.failure.message


def test_a_succeeded_pod_succeeds_and_is_deleted() -> None:
    decision = decide(S.TASK_STATE_RUNNING, pod_event(KEY, "Succeeded"), Policy())
    assert (decision.state, decision.action) == (S.TASK_STATE_SUCCEEDED, PodAction.DELETE)


@pytest.mark.parametrize(
    ("policy", "action"),
    [
        (Policy(delete_worker_pods=True, delete_worker_pods_on_failure=False), PodAction.MARK_DONE),
        (Policy(delete_worker_pods=True, delete_worker_pods_on_failure=True), PodAction.DELETE),
        (Policy(delete_worker_pods=False, delete_worker_pods_on_failure=True), PodAction.MARK_DONE),
    ],
)
def test_failed_pods_are_deleted_or_marked_done_by_policy(policy: Policy, action: PodAction) -> None:
    assert decide(S.TASK_STATE_RUNNING, pod_event(KEY, "Failed"), policy).action == action


def test_kept_successful_pods_are_marked_done() -> None:
    decision = decide(S.TASK_STATE_RUNNING, pod_event(KEY, "Succeeded"), Policy(delete_worker_pods=False))
    assert decision.action == PodAction.MARK_DONE


def test_a_running_pod_is_reported_running() -> None:
    assert decide(S.TASK_STATE_QUEUED, pod_event(KEY, "Running"), Policy()).state == S.TASK_STATE_RUNNING


def test_a_running_pod_that_is_deleted_fails_the_task() -> None:
    event = pod_event(KEY, "Running", kind=W.POD_EVENT_TYPE_DELETED, deleting=True)
    decision = decide(S.TASK_STATE_RUNNING, event, Policy())
    assert decision.state == S.TASK_STATE_FAILED
    assert decision.failure is not None
    assert decision.failure.reason == "DeletedWhileRunning"


def test_an_eviction_before_the_task_ran_is_a_loss() -> None:
    event = pod_event(KEY, "Failed", reason="Evicted")
    assert decide(S.TASK_STATE_QUEUED, event, Policy()).lost_before_start


def test_an_unknown_phase_decides_nothing() -> None:
    assert decide(S.TASK_STATE_RUNNING, pod_event(KEY, "Unknown"), Policy()).state is None


@pytest.mark.parametrize(
    ("current", "new", "forward"),
    [
        (S.TASK_STATE_UNSPECIFIED, S.TASK_STATE_QUEUED, True),
        (S.TASK_STATE_QUEUED, S.TASK_STATE_RUNNING, True),
        (S.TASK_STATE_RUNNING, S.TASK_STATE_QUEUED, False),
        (S.TASK_STATE_RUNNING, S.TASK_STATE_RUNNING, False),
        (S.TASK_STATE_QUEUED, S.TASK_STATE_SUCCEEDED, True),
        (S.TASK_STATE_SUCCEEDED, S.TASK_STATE_FAILED, False),
        (S.TASK_STATE_REVOKED, S.TASK_STATE_SUCCEEDED, False),
    ],
)
def test_transitions_only_move_forward_and_terminal_is_final(current: int, new: int, forward: bool) -> None:
    assert moves_forward(current, new) is forward  # type: ignore[arg-type]


def test_a_base_container_that_exits_zero_beside_a_running_sidecar_succeeds_the_task() -> None:
    event = pod_event(
        KEY,
        "Running",
        containers=[
            container("base", phase=TERMINATED, reason="Completed"),
            container("istio-proxy", phase=RUNNING),
        ],
    )
    decision = decide(S.TASK_STATE_RUNNING, event, Policy())
    assert (decision.state, decision.action) == (S.TASK_STATE_SUCCEEDED, PodAction.DELETE)


def test_a_base_container_that_fails_beside_a_running_sidecar_fails_the_task() -> None:
    event = pod_event(
        KEY,
        "Running",
        containers=[
            container("log-shipper", phase=RUNNING),
            container("base", phase=TERMINATED, reason="Error", exit_code=3),
        ],
    )
    decision = decide(S.TASK_STATE_RUNNING, event, Policy())
    assert (decision.state, decision.action) == (S.TASK_STATE_FAILED, PodAction.MARK_DONE)
    assert decision.failure is not None
    assert (decision.failure.container.name, decision.failure.container.exit_code) == ("base", 3)
    assert "container 'base' exited with code 3 (Error)" in decision.failure.message


def test_a_sidecar_that_fails_after_base_succeeded_does_not_fail_the_task() -> None:
    event = pod_event(
        KEY,
        "Failed",
        containers=[
            container("base", phase=TERMINATED, reason="Completed"),
            container("istio-proxy", phase=TERMINATED, reason="Error", exit_code=137),
        ],
    )
    assert decide(S.TASK_STATE_RUNNING, event, Policy()).state == S.TASK_STATE_SUCCEEDED


def test_a_native_sidecar_keeps_running_while_base_runs() -> None:
    event = pod_event(
        KEY,
        "Running",
        init_containers=[container("istio-proxy", phase=RUNNING, init=True)],
        containers=[container("base", phase=RUNNING)],
    )
    assert decide(S.TASK_STATE_QUEUED, event, Policy()).state == S.TASK_STATE_RUNNING


def test_a_running_sidecar_alone_does_not_finish_the_task() -> None:
    event = pod_event(
        KEY,
        "Running",
        containers=[
            container("base", phase=RUNNING),
            container("istio-proxy", phase=TERMINATED, reason="Completed"),
        ],
    )
    assert decide(S.TASK_STATE_RUNNING, event, Policy()).state == S.TASK_STATE_RUNNING


def _launch(state: int) -> launcher_service_pb2.Launch:
    launch = L.Launch(state=state, attempt=1)  # type: ignore[arg-type]
    launch.key.CopyFrom(KEY)
    return launch


@pytest.mark.parametrize(
    ("current", "state", "action"),
    [
        (S.TASK_STATE_UNSPECIFIED, S.TASK_STATE_REVOKED, PodAction.DELETE),
        (S.TASK_STATE_QUEUED, S.TASK_STATE_REVOKED, PodAction.DELETE),
        (S.TASK_STATE_RUNNING, S.TASK_STATE_REVOKED, PodAction.DELETE),
        (S.TASK_STATE_SUCCEEDED, None, PodAction.NONE),
    ],
)
def test_a_cancelled_launch_revokes_an_unfinished_task_and_removes_its_pod(
    current: int, state: int | None, action: PodAction
) -> None:
    decision = decide_launch(current, _launch(L.LAUNCH_STATE_CANCELLED))  # type: ignore[arg-type]
    assert (decision.state, decision.action) == (state, action)


def test_launch_outcomes_queue_or_fail_the_task() -> None:
    assert decide_launch(S.TASK_STATE_UNSPECIFIED, _launch(L.LAUNCH_STATE_ACCEPTED)).state == (
        S.TASK_STATE_QUEUED
    )
    failed = _launch(L.LAUNCH_STATE_FAILED)
    failed.failure.reason = "LaunchRejected"
    decision = decide_launch(S.TASK_STATE_QUEUED, failed)
    assert decision.state == S.TASK_STATE_FAILED
    assert decision.failure is not None
    assert decision.failure.reason == "LaunchRejected"
    assert decide_launch(S.TASK_STATE_RUNNING, _launch(L.LAUNCH_STATE_CREATED)).state is None


def test_a_cancel_revokes_only_an_unfinished_task() -> None:
    assert (decide_cancel(S.TASK_STATE_RUNNING).state, decide_cancel(S.TASK_STATE_RUNNING).action) == (
        S.TASK_STATE_REVOKED,
        PodAction.DELETE,
    )
    assert decide_cancel(S.TASK_STATE_FAILED).state is None
    assert decide_cancel(S.TASK_STATE_FAILED).action is PodAction.NONE


def test_a_launch_lost_in_a_gap_fails_only_a_task_still_queued() -> None:
    lost = decide_launch_lost(S.TASK_STATE_QUEUED)
    assert lost.state == S.TASK_STATE_FAILED
    assert lost.failure is not None
    assert lost.failure.reason == "LaunchOutcomeLost"
    assert lost.action is PodAction.NONE
    for state in (S.TASK_STATE_RUNNING, S.TASK_STATE_ADOPTED, S.TASK_STATE_SUCCEEDED, S.TASK_STATE_REVOKED):
        assert decide_launch_lost(state).state is None


def test_a_launch_is_a_new_life_of_its_key_only_if_accepted_after_the_ended_task_was() -> None:
    def at(seconds: float) -> Timestamp:
        stamp = Timestamp()
        stamp.FromNanoseconds(int(seconds * 1e9))
        return stamp

    ended = task_pb2.Task(state=S.TASK_STATE_SUCCEEDED, queued_time=at(100))
    assert is_new_life(ended, at(101))
    assert not is_new_life(ended, at(100))  # the same launch: every event carries its accept time
    assert not is_new_life(ended, at(99))
    assert not is_new_life(ended, Timestamp())  # unknown
    running = task_pb2.Task(state=S.TASK_STATE_RUNNING, queued_time=at(100))
    assert not is_new_life(running, at(101))  # a task still going on is never replaced
    # Made from its pod's events, its launch never read: only after its pruning can a launch be new.
    unknown = task_pb2.Task(state=S.TASK_STATE_FAILED)
    assert not is_new_life(unknown, at(101))
    assert not is_new_life(unknown, at(101), pruned_at=200)
    assert is_new_life(unknown, at(201), pruned_at=200)
