"""The engine applies events durably and idempotently, and times out stuck Pending pods."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import structlog

from services.reconciler.engine import Engine, LaunchItem, PodItem, UnknownTask
from services.reconciler.forgotten import LaunchGap
from services.reconciler.statemachine import Policy
from services.reconciler.store import PodActionRow, TaskStore, prune_finished
from shepherd import podmeta
from shepherd.retention import Pruner, Retention
from shepherd.v1 import launcher_service_pb2, task_pb2, watcher_service_pb2
from tests.helpers import task_key
from tests.helpers.pods import container, pod_event

S = task_pb2


class Harness:
    def __init__(self, store: TaskStore, *, pending_timeout_s: float) -> None:
        self.actions: list[PodActionRow] = []
        self.relaunches: list[tuple[task_pb2.TaskKey, int]] = []
        self.engine = Engine(
            store=store,
            policy=Policy(),
            executor_id="e",
            on_actions=self.actions.extend,
            pending_timeout_s=pending_timeout_s,
            on_relaunch=self.relaunches.extend,
        )
        self.store = store

    async def feed(self, *events: watcher_service_pb2.PodEvent) -> None:
        for event in events:
            await self.engine.submit(PodItem(event))
        await self.settle()

    async def settle(self) -> None:
        await asyncio.sleep(0)  # let the engine take what was just queued
        await self.engine.idle()

    async def until_relaunched(self, timeout_s: float = 10.0) -> None:
        """Wait (without blocking the loop) until a relaunch was asked for, then settle."""
        deadline = time.monotonic() + timeout_s
        while not self.relaunches and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.settle()

    def states(self, key: task_pb2.TaskKey) -> list[int]:
        return [
            change.task.state
            for _, change in self.store.transitions.read_after(0, 1000)
            if change.task.key == key
        ]


@contextlib.asynccontextmanager
async def running(store: TaskStore, *, pending_timeout_s: float = 0.5) -> AsyncIterator[Harness]:
    """An engine applying events to `store` until the block ends (the store stays open)."""
    h = Harness(store, pending_timeout_s=pending_timeout_s)
    runner = asyncio.create_task(h.engine.run())
    timer = asyncio.create_task(h.engine.run_pending_timer())
    try:
        yield h
    finally:
        runner.cancel()
        timer.cancel()
        await asyncio.gather(runner, timer, return_exceptions=True)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    async with running(store) as h:
        yield h
    await store.close()


async def test_a_pod_life_becomes_queued_running_succeeded_and_one_delete(harness: Harness) -> None:
    key = task_key()
    await harness.feed(pod_event(key, "Pending"), pod_event(key, "Running"), pod_event(key, "Succeeded"))
    assert harness.states(key) == [S.TASK_STATE_QUEUED, S.TASK_STATE_RUNNING, S.TASK_STATE_SUCCEEDED]
    assert [a.action for a in harness.actions] == ["delete"]


async def test_duplicate_and_out_of_order_events_never_move_a_task_backwards(harness: Harness) -> None:
    key = task_key()
    await harness.feed(
        pod_event(key, "Running"),
        pod_event(key, "Pending"),
        pod_event(key, "Succeeded"),
        pod_event(key, "Running"),
        pod_event(key, "Succeeded"),
        pod_event(key, "Failed"),
    )
    assert harness.states(key) == [S.TASK_STATE_RUNNING, S.TASK_STATE_SUCCEEDED]
    assert len(harness.actions) == 1


async def test_a_pod_stuck_pending_past_the_timeout_fails_and_is_deleted(harness: Harness) -> None:
    key = task_key(task_id="stuck")
    await harness.feed(pod_event(key, "Pending", uid="stuck-1"))
    deadline = time.monotonic() + 10
    while S.TASK_STATE_FAILED not in harness.states(key) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await harness.settle()
    assert harness.states(key) == [S.TASK_STATE_QUEUED, S.TASK_STATE_FAILED]
    task, _ = harness.store.get(podmeta.key_string(key)) or (None, None)
    assert task is not None
    assert task.failure.reason == "PendingTimeout"
    assert [(a.pod_uid, a.action) for a in harness.actions] == [("stuck-1", "delete")]


async def test_many_pending_pods_each_time_out_once(harness: Harness) -> None:
    keys = [task_key(task_id=f"p{i}") for i in range(50)]
    await harness.feed(*(pod_event(k, "Pending", uid=f"u{i}") for i, k in enumerate(keys)))
    deadline = time.monotonic() + 10
    while len(harness.actions) < 50 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await harness.settle()
    assert all(harness.states(k) == [S.TASK_STATE_QUEUED, S.TASK_STATE_FAILED] for k in keys)
    assert sorted(a.pod_uid for a in harness.actions) == sorted(f"u{i}" for i in range(50))


async def test_a_pod_that_starts_in_time_is_not_timed_out(harness: Harness) -> None:
    key = task_key(task_id="quick")
    await harness.feed(pod_event(key, "Pending", uid="q"), pod_event(key, "Running", uid="q"))
    await asyncio.sleep(1.0)
    await harness.settle()
    assert harness.states(key) == [S.TASK_STATE_QUEUED, S.TASK_STATE_RUNNING]


async def test_a_pod_lost_before_it_ran_is_relaunched_once_then_rescheduled(harness: Harness) -> None:
    key = task_key(task_id="lost")
    deleted = watcher_service_pb2.POD_EVENT_TYPE_DELETED
    await harness.feed(
        pod_event(key, "Pending", uid="a1"), pod_event(key, "Pending", uid="a1", kind=deleted, deleting=True)
    )
    assert harness.relaunches == [(key, 1)]
    assert harness.states(key) == [S.TASK_STATE_QUEUED]
    await harness.feed(pod_event(key, "Pending", uid="a2", attempt=2))  # the launcher's new attempt
    await harness.feed(pod_event(key, "Pending", uid="a2", attempt=2, kind=deleted, deleting=True))
    assert harness.relaunches == [(key, 1)]  # the budget (1) is spent
    assert harness.states(key) == [S.TASK_STATE_QUEUED, S.TASK_STATE_UP_FOR_RESCHEDULE]


async def test_events_of_an_earlier_attempts_pod_only_clean_it_up(harness: Harness) -> None:
    key = task_key(task_id="stale")
    await harness.feed(
        pod_event(key, "Pending", uid="new", attempt=2), pod_event(key, "Failed", uid="old", attempt=1)
    )
    assert harness.states(key) == [S.TASK_STATE_QUEUED]
    assert [(a.pod_uid, a.action) for a in harness.actions] == [("old", "delete")]


async def test_a_refused_relaunch_reschedules_the_task(harness: Harness) -> None:
    key = task_key(task_id="refused")
    deleted = watcher_service_pb2.POD_EVENT_TYPE_DELETED
    await harness.feed(
        pod_event(key, "Pending", uid="r1"), pod_event(key, "Pending", uid="r1", kind=deleted, deleting=True)
    )
    await harness.engine.relaunch_refused(key, "NOT_FOUND")
    await harness.settle()
    assert harness.states(key) == [S.TASK_STATE_QUEUED, S.TASK_STATE_UP_FOR_RESCHEDULE]


async def test_a_batch_reads_the_stored_tasks_it_does_not_hold_in_one_query(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    done = task_key(task_id="done")
    async with running(store) as first:
        await first.feed(pod_event(done, "Running", uid="d"), pod_event(done, "Succeeded", uid="d"))
    reads: list[list[str]] = []
    get_many = store.get_many

    def counted(keys: Sequence[str]) -> dict[str, tuple[task_pb2.Task, str]]:
        reads.append(list(keys))
        return get_many(keys)

    store.get_many = counted  # type: ignore[method-assign]
    new = [task_key(task_id=f"new{i}") for i in range(3)]
    async with running(store) as second:  # a restart: the finished task is no longer in memory
        for event in (pod_event(done, "Running", uid="d"), *(pod_event(k, "Pending") for k in new)):
            await second.engine.submit(PodItem(event))  # all queued before the engine takes a batch
        await second.settle()
        assert [sorted(keys) for keys in reads] == [sorted(podmeta.key_string(k) for k in [done, *new])]
        assert second.states(done) == [S.TASK_STATE_RUNNING, S.TASK_STATE_SUCCEEDED]  # still final
        assert all(second.states(k) == [S.TASK_STATE_QUEUED] for k in new)
    await store.close()


def _launch(
    key: task_pb2.TaskKey, state: launcher_service_pb2.LaunchState.ValueType, *, attempt: int = 1
) -> launcher_service_pb2.Launch:
    launch = launcher_service_pb2.Launch(
        state=state, namespace="shepherd", pod_name=podmeta.pod_name(key, attempt), attempt=attempt
    )
    launch.key.CopyFrom(key)
    launch.accept_time.GetCurrentTime()
    return launch


async def _launch_events(harness: Harness, *launches: launcher_service_pb2.Launch) -> None:
    for launch in launches:
        _launch_cursor[0] += 1
        await harness.engine.submit(LaunchItem(_launch_cursor[0], launch))
    await harness.settle()


_launch_cursor = [0]
L = launcher_service_pb2
DELETED = watcher_service_pb2.POD_EVENT_TYPE_DELETED


async def test_a_launch_cancelled_before_its_pod_exists_revokes_the_task(harness: Harness) -> None:
    key = task_key(task_id="cancelled-early")
    await _launch_events(
        harness, _launch(key, L.LAUNCH_STATE_ACCEPTED), _launch(key, L.LAUNCH_STATE_CANCELLED)
    )
    assert harness.states(key) == [S.TASK_STATE_QUEUED, S.TASK_STATE_REVOKED]
    assert harness.actions == []
    # A create that was already in flight makes the pod anyway: it is deleted, once.
    await harness.feed(pod_event(key, "Pending", uid="late"), pod_event(key, "Running", uid="late"))
    assert harness.states(key) == [S.TASK_STATE_QUEUED, S.TASK_STATE_REVOKED]
    assert [(a.pod_uid, a.action) for a in harness.actions] == [("late", "delete")]


async def test_a_launch_cancelled_after_its_pod_was_seen_deletes_the_pod_once(harness: Harness) -> None:
    key = task_key(task_id="cancelled-seen")
    await _launch_events(harness, _launch(key, L.LAUNCH_STATE_ACCEPTED))
    await harness.feed(pod_event(key, "Pending", uid="seen"))
    await _launch_events(harness, _launch(key, L.LAUNCH_STATE_CANCELLED))
    await harness.feed(
        pod_event(key, "Running", uid="seen"), pod_event(key, "Running", uid="seen", kind=DELETED)
    )
    assert harness.states(key) == [S.TASK_STATE_QUEUED, S.TASK_STATE_REVOKED]
    assert [(a.pod_uid, a.action) for a in harness.actions] == [("seen", "delete")]


async def test_a_pod_seen_before_its_launch_event_still_gets_the_queued_time(harness: Harness) -> None:
    key = task_key(task_id="pod-first")
    launch = _launch(key, L.LAUNCH_STATE_ACCEPTED)
    await harness.feed(pod_event(key, "Pending", uid="early"))  # the watcher was faster
    await _launch_events(harness, launch, _launch(key, L.LAUNCH_STATE_CREATED))
    await harness.feed(pod_event(key, "Running", uid="early"), pod_event(key, "Succeeded", uid="early"))
    task, _ = harness.store.get(podmeta.key_string(key)) or (None, None)
    assert task is not None
    assert task.queued_time == launch.accept_time
    final = [c.task for _, c in harness.store.transitions.read_after(0, 1000) if c.task.key == key][-1]
    assert (final.state, final.queued_time) == (S.TASK_STATE_SUCCEEDED, launch.accept_time)


async def test_a_running_pod_found_deleted_after_a_watch_gap_fails_its_task(harness: Harness) -> None:
    key = task_key(task_id="gap-running")
    vanished = pod_event(key, "Running", uid="g", kind=DELETED, gone=watcher_service_pb2.POD_GONE_DELETED)
    vanished.synthetic = True
    await harness.feed(pod_event(key, "Running", uid="g"), vanished)
    assert harness.states(key) == [S.TASK_STATE_RUNNING, S.TASK_STATE_FAILED]
    assert harness.actions == []  # the pod is gone: nothing to clean up


async def test_a_pending_pod_found_deleted_after_a_watch_gap_is_relaunched(harness: Harness) -> None:
    key = task_key(task_id="gap-pending")
    vanished = pod_event(key, "Pending", uid="p", kind=DELETED, gone=watcher_service_pb2.POD_GONE_DELETED)
    vanished.synthetic = True
    await harness.feed(pod_event(key, "Pending", uid="p"), vanished)
    assert harness.relaunches == [(key, 1)]
    assert harness.states(key) == [S.TASK_STATE_QUEUED]


async def test_a_pod_we_marked_done_leaving_view_unexplained_changes_nothing(harness: Harness) -> None:
    key = task_key(task_id="evicted")
    # Evicted before it ran: relaunched, and the kept pod is marked done, so it leaves our selector.
    await harness.feed(
        pod_event(key, "Pending", uid="ev"), pod_event(key, "Failed", uid="ev", reason="Evicted")
    )
    assert harness.relaunches == [(key, 1)]
    assert [(a.pod_uid, a.action) for a in harness.actions] == [("ev", "mark-done")]
    await harness.feed(pod_event(key, "Failed", uid="ev", reason="Evicted", kind=DELETED))
    assert harness.relaunches == [(key, 1)]
    assert harness.states(key) == [S.TASK_STATE_QUEUED]


async def test_a_task_whose_base_container_ended_beside_a_sidecar_finishes_once(harness: Harness) -> None:
    key = task_key(task_id="sidecar")
    base_done = [
        container("base", phase=S.CONTAINER_PHASE_TERMINATED, reason="Completed"),
        container("istio-proxy", phase=S.CONTAINER_PHASE_RUNNING),
    ]
    await harness.feed(
        pod_event(key, "Running", uid="sc", containers=[container("base"), container("istio-proxy")]),
        pod_event(key, "Running", uid="sc", containers=base_done),
    )
    assert harness.states(key) == [S.TASK_STATE_RUNNING, S.TASK_STATE_SUCCEEDED]
    assert [(a.pod_uid, a.action) for a in harness.actions] == [("sc", "delete")]
    # Our delete stops the sidecar, which may end the pod Failed: the task stays SUCCEEDED.
    killed = [base_done[0], container("istio-proxy", phase=S.CONTAINER_PHASE_TERMINATED, exit_code=137)]
    await harness.feed(
        pod_event(key, "Running", uid="sc", containers=base_done, deleting=True),
        pod_event(key, "Failed", uid="sc", containers=killed, deleting=True),
        pod_event(key, "Failed", uid="sc", containers=killed, kind=DELETED, deleting=True),
    )
    assert harness.states(key) == [S.TASK_STATE_RUNNING, S.TASK_STATE_SUCCEEDED]
    assert [(a.pod_uid, a.action) for a in harness.actions] == [("sc", "delete")]


async def test_a_cancel_of_an_unknown_task_is_refused_without_an_error_log(harness: Harness) -> None:
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(UnknownTask):
            await harness.engine.cancel(task_key(task_id="never-launched"), "no reason")
        await harness.settle()
    assert [entry for entry in logs if entry["log_level"] in ("error", "exception", "critical")] == []


async def test_a_created_pod_never_seen_is_noticed_after_a_restart(tmp_path: Path) -> None:
    """The deadline of a pod the launcher created but the watcher never reported survives a
    reconciler restart (it used to live in memory only, so the task stayed QUEUED forever)."""
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    key = task_key(task_id="created-unseen")
    async with running(store, pending_timeout_s=0.5) as first:
        await _launch_events(first, _launch(key, L.LAUNCH_STATE_ACCEPTED))
        created = _launch(key, L.LAUNCH_STATE_CREATED)
        created.create_time.GetCurrentTime()
        await _launch_events(first, created)
    async with running(store, pending_timeout_s=0.5) as second:
        second.engine.watcher_live = True  # the watcher is connected and has not seen the pod
        await second.until_relaunched()
        assert second.relaunches == [(key, 1)]
    await store.close()


async def test_a_launch_event_gap_is_checked_once_and_again_after_a_restart_cut_it_short(
    tmp_path: Path,
) -> None:
    """A gap is committed with the events after it; its check (engine.gap_unchecked) is owed
    until GapChecked is committed, also by the engine of a restart."""
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    key = task_key(task_id="queued")
    async with running(store) as h:
        assert not h.engine.gap_unchecked.is_set()
        await h.engine.submit(LaunchItem(5, _launch(key, L.LAUNCH_STATE_ACCEPTED)))
        await h.engine.submit(LaunchGap(5, 40))
        await h.settle()
        assert h.engine.gap_unchecked.is_set()
        assert [k.task_id for k in h.engine.queued_without_pod()] == ["queued"]
        await h.engine.launch_lost(key)
        await h.settle()
        assert h.states(key) == [S.TASK_STATE_QUEUED, S.TASK_STATE_FAILED]
    restarted = Harness(store, pending_timeout_s=1)
    assert restarted.engine.gap == LaunchGap(5, 40)
    assert restarted.engine.gap_unchecked.is_set()  # the check never finished: owed again
    async with running(store) as h:
        await h.engine.gap_checked(40)
        await h.settle()
    assert not Harness(store, pending_timeout_s=1).engine.gap_unchecked.is_set()
    await store.close()


async def test_a_launch_event_read_after_its_task_was_pruned_does_not_bring_it_back(tmp_path: Path) -> None:
    """By count, a task the watcher's events finished can be pruned before the reconciler has read
    its launch events (the launcher's stream lagged). After a restart, its memory of finished
    tasks empty, those events used to make the task anew, QUEUED, and relaunch it once its pod,
    long gone, was not seen: it ran twice."""
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    key, filler, sentinel = (task_key(task_id=name) for name in ("pruned", "filler", "sentinel"))
    began = time.time() - 1  # when its launch was accepted and its pod created: before the pruning
    async with running(store) as first:
        await first.feed(*(pod_event(key, phase) for phase in ("Pending", "Running", "Succeeded")))
        await first.feed(pod_event(filler, "Pending"), pod_event(filler, "Succeeded"))
    bounds = Retention(24 * 3600.0, max_entries=2)
    pruner = Pruner(
        store.db, store.transitions, "change", bounds, functools.partial(prune_finished, bounds=bounds)
    )
    await pruner.tick()
    assert store.get(podmeta.key_string(key)) is None, "the task was not pruned"
    async with running(store, pending_timeout_s=0.5) as second:
        second.engine.watcher_live = True
        for late in (key, sentinel):  # the sentinel's pod is never seen either, and created later
            accepted, created = _launch(late, L.LAUNCH_STATE_ACCEPTED), _launch(late, L.LAUNCH_STATE_CREATED)
            for launch in (accepted, created):
                launch.accept_time.FromNanoseconds(int(began * 1e9))
            created.create_time.GetCurrentTime()
            await _launch_events(second, accepted, created)
        # The barrier: the sentinel's deadline, later than the pruned task's, has fired.
        await second.until_relaunched()
        assert second.relaunches == [(sentinel, 1)]
        # A pod of it turns up too: cleaned up as a finished task's pod, the task left pruned.
        await second.feed(pod_event(key, "Succeeded", uid="stray-1", created=began))
        assert [(a.pod_uid, a.action) for a in second.actions] == [("stray-1", "delete")]
        assert store.get(podmeta.key_string(key)) is None, "a pruned task was stored again"
        assert second.states(key) == [], "a pruned task changed state again"
        assert second.engine.is_finished(key)  # so the cleanup sweep treats a pod of it as finished's
        # Launched again after it was pruned (the launcher forgot it too): a new task, run anew.
        await _launch_events(second, _launch(key, L.LAUNCH_STATE_ACCEPTED))
        await second.feed(
            pod_event(key, "Running", uid="again-1"), pod_event(key, "Succeeded", uid="again-1")
        )
        assert second.states(key) == [S.TASK_STATE_QUEUED, S.TASK_STATE_RUNNING, S.TASK_STATE_SUCCEEDED]
    await store.close()


async def test_a_key_launched_again_after_its_task_ended_is_a_new_task_and_runs(harness: Harness) -> None:
    """The launcher forgot the launch of a task that ended (pruned) and took the key again: a new
    launch, accepted later. It used to be applied to the ended task, still remembered here: no
    state, its pod deleted as a finished task's, and GetTask answered the old run's outcome."""
    key = task_key(task_id="again")
    first = _launch(key, L.LAUNCH_STATE_ACCEPTED)
    await _launch_events(harness, first)
    await harness.feed(pod_event(key, "Running", uid="first"), pod_event(key, "Succeeded", uid="first"))
    late = _launch(key, L.LAUNCH_STATE_CREATED)
    late.accept_time.CopyFrom(first.accept_time)  # an event of the same launch, read late: ignored
    await _launch_events(harness, late)
    assert harness.states(key) == [S.TASK_STATE_QUEUED, S.TASK_STATE_RUNNING, S.TASK_STATE_SUCCEEDED]
    again = _launch(key, L.LAUNCH_STATE_ACCEPTED)
    again.accept_time.FromNanoseconds(first.accept_time.ToNanoseconds() + 1000)
    await _launch_events(harness, again)
    await harness.feed(pod_event(key, "Running", uid="second"), pod_event(key, "Failed", uid="second"))
    assert harness.states(key)[3:] == [S.TASK_STATE_QUEUED, S.TASK_STATE_RUNNING, S.TASK_STATE_FAILED]
    assert [(a.pod_uid, a.action) for a in harness.actions] == [("first", "delete"), ("second", "mark-done")]
