"""Applying events to tasks, in batches, through one applier so no two changes race.

Launch events (from the launcher), pod events (from the watcher) and commands (cancel) enter one
queue. The applier takes whatever is waiting (up to `batch_size`), runs each item through the
state machine against its task, and commits the batch's task rows, transitions, pod actions and
stream cursors in one transaction. Only then are the new pod actions handed to the action runner
and the transitions visible to WatchTaskStates. Per event the work is O(1): a dict lookup, a
pure decision, and a share of one commit.

A commit that fails (the store cannot write) ends `run` with its error, and the service stops
(crash-only; see shepherd/supervisor.py). Memory had already moved on, but nothing of the batch
became visible: no transition was published, no pod action or relaunch handed out, and no later
batch can commit (TaskStore.commit). The restart rebuilds memory from the store and replays the
events from the last committed cursors, so one action per pod and "committed before visible"
both hold. Retrying the commit instead would have to hold back every later batch, which the
engine applies while the previous one commits, for as long as the disk stays broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.reconciler.statemachine import TERMINAL, PodAction, Policy, decide, moves_forward
from services.reconciler.store import Batch, PodActionRow, TaskStore
from shepherd import podmeta, timestamps
from shepherd.logging import BoundLogger, get_logger
from shepherd.sqlite import is_store_fault
from shepherd.v1 import launcher_service_pb2, task_pb2, watcher_service_pb2

PodEvent = watcher_service_pb2.PodEvent
Launch = launcher_service_pb2.Launch
SOURCE_LAUNCHER = "launcher"
SOURCE_WATCHER = "watcher"
_TERMINAL_CACHE = 20_000  # finished tasks kept in memory to answer late events without a read
_TASK_DEADLINE = "task:"  # deadline handles for tasks (not pods): created, but never seen


class UnknownTask(LookupError):
    """No task with that key."""


@dataclass
class Tracked:
    task: task_pb2.Task
    pod_uid: str = ""
    pending_note: str = ""  # why the pod is still Pending (the scheduler's message), for timeouts


@dataclass(frozen=True)
class LaunchItem:
    cursor: int
    launch: Launch


@dataclass(frozen=True)
class PodItem:
    event: PodEvent


@dataclass(frozen=True)
class SnapshotStart:
    """The watcher stream is about to send a full snapshot of current pods."""


@dataclass(frozen=True)
class CancelItem:
    key: task_pb2.TaskKey
    reason: str
    done: asyncio.Future[tuple[task_pb2.Task, Tracked]]


@dataclass(frozen=True)
class PendingExpired:
    key: str
    pod_uid: str


@dataclass(frozen=True)
class RelaunchRefused:
    """The launcher cannot relaunch a task whose pod was lost: it is rescheduled instead."""

    key: task_pb2.TaskKey
    why: str


Item = LaunchItem | PodItem | SnapshotStart | CancelItem | PendingExpired | RelaunchRefused


@dataclass
class EngineStats:
    batches: int = 0
    items: int = 0
    transitions: int = 0
    ignored_events: int = 0


@dataclass
class Engine:
    store: TaskStore
    policy: Policy
    executor_id: str
    on_actions: Callable[[list[PodActionRow]], None]
    batch_size: int = 1000
    queue_size: int = 20_000
    pending_timeout_s: float = 300.0
    launch_failure_retries: int = 1
    on_relaunch: Callable[[list[tuple[task_pb2.TaskKey, int]]], None] = lambda _: None
    stats: EngineStats = field(default_factory=EngineStats)
    _active: dict[str, Tracked] = field(default_factory=dict)
    _finished: OrderedDict[str, Tracked] = field(default_factory=OrderedDict)
    _queue: asyncio.Queue[Item] = field(init=False)
    _snapshot_seen: set[str] | None = None
    _last: dict[str, int] = field(default_factory=dict)  # last cursor enqueued per source
    _deadlines: dict[str, tuple[float, str]] = field(default_factory=dict)  # pod uid -> (deadline, task key)
    _deadline_heap: list[tuple[float, str]] = field(default_factory=list)
    _deadline_added: asyncio.Event = field(default_factory=asyncio.Event)
    synced: asyncio.Event = field(default_factory=asyncio.Event)  # a watcher snapshot has been applied
    _adopting: set[str] = field(default_factory=set)  # uids of pods being relabelled to this executor
    watcher_live: bool = False  # the watcher stream is connected: a pod that exists would be seen
    _unstored: set[str] = field(default_factory=set)  # keys the batch being applied found not stored
    # One logger for the per-transition lines: binding a new one per line costs more than the line.
    _log: BoundLogger = field(default_factory=lambda: get_logger(component="engine"))
    _last_commit: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        for task, uid in self.store.unfinished():
            self._active[podmeta.key_string(task.key)] = Tracked(task, uid)
        self._last[SOURCE_LAUNCHER] = self.store.cursor(SOURCE_LAUNCHER)
        # After a start, the watcher is always asked for a snapshot: it brings every unfinished
        # task's pod back into view (re-arming Pending deadlines, noticing pods that vanished)
        # however long we were away, and the forward-only state machine makes the replay harmless.
        self._last[SOURCE_WATCHER] = 0

    # ---- inputs --------------------------------------------------------------------------------

    def resume_cursor(self, source: str) -> int:
        """Where a (re)connecting stream consumer should continue."""
        return self._last[source]

    async def submit(self, item: Item, *, source: str | None = None, cursor: int = 0) -> None:
        await self._queue.put(item)
        if source is not None and cursor:
            self._last[source] = cursor

    def forget_watcher_position(self) -> None:
        """The watcher cannot resume our cursor (it restarted): the next connection asks for a snapshot."""
        self._last[SOURCE_WATCHER] = 0

    async def relaunch_refused(self, key: task_pb2.TaskKey, why: str) -> None:
        await self._queue.put(RelaunchRefused(key, why))

    async def cancel(self, key: task_pb2.TaskKey, reason: str) -> tuple[task_pb2.Task, Tracked]:
        done: asyncio.Future[tuple[task_pb2.Task, Tracked]] = asyncio.get_running_loop().create_future()
        await self._queue.put(CancelItem(key, reason, done))
        return await done

    def expect_adoption(self, pod_uid: str) -> None:
        """The pod is about to be relabelled to us: its task is reported ADOPTED when it comes into view."""
        self._adopting.add(pod_uid)

    def forget_adoption(self, pod_uid: str) -> None:
        self._adopting.discard(pod_uid)

    @property
    def active_tasks(self) -> int:
        return len(self._active)

    # ---- the applier ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Apply batches back to back. A batch's commit runs while the next batch is applied (the
        database joins waiting commits into one transaction); what depends on a commit (pod actions,
        relaunches, cancel replies) still happens strictly after it and in batch order. A failed
        commit ends this with its error (see the module's docstring)."""
        log = get_logger(component="engine")
        previous: asyncio.Task[None] | None = None
        async with asyncio.TaskGroup() as commits:
            while True:
                items = [await self._queue.get()]
                while len(items) < self.batch_size and not self._queue.empty():
                    items.append(self._queue.get_nowait())
                batch = Batch()
                replies: list[tuple[CancelItem, Any]] = []
                self._prefetch(items)
                for item in items:
                    try:
                        reply = self._apply(item, batch)
                    except Exception as err:  # a malformed event must not stop the reconciler
                        if is_store_fault(err):
                            raise  # but a store that cannot be read must: the event is not at fault
                        log.exception(
                            "could not apply an event; skipping it", item=type(item).__name__, error=str(err)
                        )
                        reply = err
                    if isinstance(item, CancelItem):
                        replies.append((item, reply))
                self._unstored.clear()
                self.stats.batches += 1
                self.stats.items += len(items)
                previous = self._last_commit = commits.create_task(
                    self._commit_then_dispatch(batch, replies, previous), name="engine-commit"
                )

    async def idle(self) -> None:
        """Return once every queued item is applied, committed and followed up (for tests and drains)."""
        while not self._queue.empty() or (self._last_commit is not None and not self._last_commit.done()):
            if self._last_commit is not None and not self._last_commit.done():
                await self._last_commit
            else:
                await asyncio.sleep(0.01)

    async def _commit_then_dispatch(
        self, batch: Batch, replies: list[tuple[CancelItem, Any]], previous: asyncio.Task[None] | None
    ) -> None:
        try:
            committed = await self.store.commit(batch) if batch else None
            if previous is not None:
                await previous  # follow-ups keep batch order even when commits are joined
        except BaseException as err:  # not committed (or an earlier batch was not): nobody is told
            for item, _ in replies:
                if item.done.done():
                    continue  # the caller gave up
                if isinstance(err, asyncio.CancelledError):
                    item.done.cancel()
                else:
                    item.done.set_exception(err)
            raise
        if batch.relaunches:
            self.on_relaunch(batch.relaunches)
        if committed is not None:
            self.stats.transitions += len(committed.changes)
            if committed.new_actions:
                self.on_actions(committed.new_actions)
        for item, reply in replies:
            if item.done.done():
                continue  # the caller gave up
            if isinstance(reply, BaseException):
                item.done.set_exception(reply)
            else:
                item.done.set_result(reply)

    def _apply(self, item: Item, batch: Batch) -> Any:
        if isinstance(item, LaunchItem):
            self._apply_launch(item, batch)
            batch.cursors[SOURCE_LAUNCHER] = item.cursor
        elif isinstance(item, PodItem):
            self._apply_pod(item.event, batch)
        elif isinstance(item, SnapshotStart):
            self._snapshot_seen = set()
        elif isinstance(item, PendingExpired):
            self._expire_pending(item, batch)
        elif isinstance(item, RelaunchRefused):
            key = podmeta.key_string(item.key)
            tracked = self._lookup(key)
            if tracked is not None and tracked.task.state not in TERMINAL and not tracked.pod_uid:
                failure = task_pb2.FailureDetails(
                    reason="PodLostBeforeStart",
                    message=f"the pod was lost and cannot be relaunched: {item.why}",
                )
                self._transition(key, tracked, task_pb2.TASK_STATE_UP_FOR_RESCHEDULE, batch, failure)
        else:
            return self._apply_cancel(item, batch)
        return None

    # ---- per-item logic ------------------------------------------------------------------------

    def _prefetch(self, items: list[Item]) -> None:
        """Read the batch's tasks that are not in memory in one query, instead of one read per
        task: under load nearly every launch is of a task never seen before."""
        keys = []
        for item in items:
            if isinstance(item, LaunchItem):
                keys.append(podmeta.key_string(item.launch.key))
            elif isinstance(item, PodItem) and item.event.HasField("task_key"):
                keys.append(podmeta.key_string(item.event.task_key))
        missing = list({key for key in keys if key not in self._active and key not in self._finished})
        if not missing:
            return
        stored = self.store.get_many(missing)
        for key, row in stored.items():
            self._remember(key, Tracked(*row))
        self._unstored.update(key for key in missing if key not in stored)

    def _lookup(self, key: str) -> Tracked | None:
        tracked = self._active.get(key) or self._finished.get(key)
        if tracked is None and key not in self._unstored and (row := self.store.get(key)) is not None:
            tracked = Tracked(*row)
            self._remember(key, tracked)
        return tracked

    def _remember(self, key: str, tracked: Tracked) -> None:
        if tracked.task.state in TERMINAL:
            self._active.pop(key, None)
            self._finished[key] = tracked
            self._finished.move_to_end(key)
            while len(self._finished) > _TERMINAL_CACHE:
                self._finished.popitem(last=False)
        else:
            self._active[key] = tracked

    def _save(self, key: str, tracked: Tracked, batch: Batch) -> None:
        copy = task_pb2.Task()
        copy.CopyFrom(tracked.task)
        batch.tasks[key] = (copy, tracked.pod_uid)
        self._remember(key, tracked)

    def _transition(
        self,
        key: str,
        tracked: Tracked,
        state: task_pb2.TaskState.ValueType,
        batch: Batch,
        failure: task_pb2.FailureDetails | None = None,
    ) -> None:
        task = tracked.task
        previous = task.state
        now = timestamps.now()
        task.state = state
        if failure is not None:
            task.failure.CopyFrom(failure)
        if state == task_pb2.TASK_STATE_RUNNING and not task.HasField("start_time"):
            task.start_time.CopyFrom(now)
        if state in TERMINAL:
            task.end_time.CopyFrom(now)
        change = task_pb2.TaskStateChange(previous_state=previous, change_time=now)
        change.task.CopyFrom(task)
        batch.changes.append(change)
        self._save(key, tracked, batch)
        self._log.info(
            "transition",
            task_key=podmeta.log_key(key),
            pod=task.pod_name,
            previous=task_pb2.TaskState.Name(previous),
            state=task_pb2.TaskState.Name(state),
            reason=failure.reason if failure is not None else "",
        )

    def _new_task(self, key: task_pb2.TaskKey, namespace: str, pod_name: str, attempt: int) -> Tracked:
        task = task_pb2.Task(
            namespace=namespace,
            pod_name=pod_name,
            executor_id=self.executor_id,
            launch_attempts=max(attempt, 1),
        )
        task.key.CopyFrom(key)
        return Tracked(task)

    def _apply_launch(self, item: LaunchItem, batch: Batch) -> None:
        launch = item.launch
        key = podmeta.key_string(launch.key)
        tracked = self._lookup(key)
        if tracked is None:
            tracked = self._new_task(launch.key, launch.namespace, launch.pod_name, launch.attempt)
            tracked.task.queued_time.CopyFrom(launch.accept_time)
        target = {
            launcher_service_pb2.LAUNCH_STATE_ACCEPTED: task_pb2.TASK_STATE_QUEUED,
            launcher_service_pb2.LAUNCH_STATE_FAILED: task_pb2.TASK_STATE_FAILED,
        }.get(launch.state)
        if launch.attempt > tracked.task.launch_attempts:
            # A relaunch: the task now waits for the new attempt's pod.
            tracked.task.launch_attempts = launch.attempt
            tracked.task.pod_name = launch.pod_name
            tracked.pod_uid = ""
            self._save(key, tracked, batch)
        if target is not None and moves_forward(tracked.task.state, target):
            failure = launch.failure if target == task_pb2.TASK_STATE_FAILED else None
            self._transition(key, tracked, target, batch, failure)
        if (
            launch.state == launcher_service_pb2.LAUNCH_STATE_CREATED
            and not tracked.pod_uid
            and launch.attempt == tracked.task.launch_attempts
            and tracked.task.state not in TERMINAL
        ):
            # Created but not yet seen: if the watcher never reports it, the pod was lost unseen.
            created = (
                launch.create_time.ToNanoseconds() / 1e9 if launch.HasField("create_time") else time.time()
            )
            self._arm(_TASK_DEADLINE + key, created + self.pending_timeout_s, key)

    def _apply_pod(self, event: PodEvent, batch: Batch) -> None:
        kind = event.type
        if kind == watcher_service_pb2.POD_EVENT_TYPE_SNAPSHOT_COMPLETE:
            self._finish_snapshot(batch)
            return
        if kind == watcher_service_pb2.POD_EVENT_TYPE_SNAPSHOT and self._snapshot_seen is not None:
            self._snapshot_seen.add(event.pod_uid)
        if not event.HasField("task_key"):
            self.stats.ignored_events += 1
            return
        key = podmeta.key_string(event.task_key)
        tracked = self._lookup(key)
        if tracked is None:
            tracked = self._new_task(event.task_key, event.namespace, event.pod_name, event.launch_attempt)
        deleted = kind == watcher_service_pb2.POD_EVENT_TYPE_DELETED
        if event.pod_uid in self._adopting and not deleted:
            self._adopting.discard(event.pod_uid)
            if tracked.task.state == task_pb2.TASK_STATE_UNSPECIFIED:
                tracked.pod_uid = event.pod_uid
                self._transition(key, tracked, task_pb2.TASK_STATE_ADOPTED, batch)
        if (
            event.launch_attempt > tracked.task.launch_attempts
            and tracked.task.state != task_pb2.TASK_STATE_UNSPECIFIED
        ):
            # The watcher can be ahead of the launcher's stream: this pod proves the new attempt exists.
            tracked.task.launch_attempts = event.launch_attempt
        if event.launch_attempt and event.launch_attempt < tracked.task.launch_attempts:
            # A pod of an earlier launch attempt: it no longer speaks for the task, it only goes away.
            if not deleted:
                batch.actions.append(PodActionRow(event.pod_uid, event.namespace, event.pod_name, "delete"))
            return
        if not deleted and tracked.pod_uid != event.pod_uid:
            tracked.pod_uid = event.pod_uid
            tracked.task.pod_name, tracked.task.namespace = event.pod_name, event.namespace
            if tracked.task.state != task_pb2.TASK_STATE_UNSPECIFIED:
                self._save(key, tracked, batch)
        decision = decide(tracked.task.state, event, self.policy)
        self._track_pending(key, tracked, event, deleted)
        self._disarm(_TASK_DEADLINE + key)  # its pod is in view: the pod's own deadline applies now
        if decision.lost_before_start and tracked.task.state not in TERMINAL:
            self._lost(key, tracked, batch, decision.failure)
        elif decision.state is not None and moves_forward(tracked.task.state, decision.state):
            self._transition(key, tracked, decision.state, batch, decision.failure)
        if decision.action is not PodAction.NONE and not deleted and event.pod_uid:
            batch.actions.append(
                PodActionRow(event.pod_uid, event.namespace, event.pod_name, decision.action.value)
            )

    # ---- lost before start --------------------------------------------------------------------

    def _lost(
        self, key: str, tracked: Tracked, batch: Batch, failure: task_pb2.FailureDetails | None
    ) -> None:
        """The task's pod is gone and it never ran: relaunch it, or, out of budget, reschedule it."""
        relaunched = tracked.task.launch_attempts - 1
        if relaunched < self.launch_failure_retries:
            batch.relaunches.append((tracked.task.key, tracked.task.launch_attempts))
            tracked.pod_uid = ""
            get_logger(component="engine", task_key=podmeta.log_key(key), pod=tracked.task.pod_name).info(
                "pod lost before it ran: relaunching",
                attempt=tracked.task.launch_attempts + 1,
                reason=failure.reason if failure is not None else "",
            )
            return
        self._transition(key, tracked, task_pb2.TASK_STATE_UP_FOR_RESCHEDULE, batch, failure)

    # ---- pending timeout ---------------------------------------------------------------------

    def _arm(self, handle: str, deadline: float, key: str) -> None:
        if handle not in self._deadlines:
            self._deadlines[handle] = (deadline, key)
            heapq.heappush(self._deadline_heap, (deadline, handle))
            self._deadline_added.set()

    def _disarm(self, handle: str) -> None:
        self._deadlines.pop(handle, None)  # its heap entry is skipped when it comes up

    def _track_pending(self, key: str, tracked: Tracked, event: PodEvent, deleted: bool) -> None:
        """Arm a deadline the first time a pod is seen Pending; disarm it when it moves on."""
        uid = event.pod_uid
        if event.phase == "Pending" and not deleted and tracked.task.state not in TERMINAL:
            scheduled = next((c for c in event.conditions if c.type == "PodScheduled"), None)
            if scheduled is not None and scheduled.status == "False":
                tracked.pending_note = f"{scheduled.reason}: {scheduled.message}"
            if event.HasField("creation_time"):
                self._arm(uid, event.creation_time.ToNanoseconds() / 1e9 + self.pending_timeout_s, key)
        else:
            self._disarm(uid)

    async def run_pending_timer(self) -> None:
        """Wake at the earliest deadline (never scanning all pods) and expire what is due."""
        while True:
            self._deadline_added.clear()
            if not self._deadline_heap:
                await self._deadline_added.wait()
                continue
            wait = self._deadline_heap[0][0] - time.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._deadline_added.wait(), timeout=min(wait, 60.0))
                continue
            deadline, uid = heapq.heappop(self._deadline_heap)
            armed = self._deadlines.get(uid)
            if armed is not None and armed[0] == deadline:
                del self._deadlines[uid]
                await self._queue.put(PendingExpired(armed[1], uid))

    def _expire_pending(self, item: PendingExpired, batch: Batch) -> None:
        tracked = self._lookup(item.key)
        if item.pod_uid.startswith(_TASK_DEADLINE):
            if not self.watcher_live:
                # Unseen proves nothing while we cannot see: look again one timeout later.
                self._arm(item.pod_uid, time.time() + self.pending_timeout_s, item.key)
                return
            if tracked is not None and not tracked.pod_uid and tracked.task.state not in TERMINAL:
                failure = task_pb2.FailureDetails(
                    reason="PodLostBeforeStart",
                    message=f"the pod was created but never seen within {self.pending_timeout_s:g}s",
                )
                self._lost(item.key, tracked, batch, failure)
            return
        if tracked is None or tracked.pod_uid != item.pod_uid or tracked.task.state in TERMINAL:
            return
        if tracked.task.state == task_pb2.TASK_STATE_RUNNING:
            return
        message = f"the pod stayed Pending for more than {self.pending_timeout_s:g}s"
        if tracked.pending_note:
            message += f" ({tracked.pending_note})"
        failure = task_pb2.FailureDetails(reason="PendingTimeout", message=message, pod_phase="Pending")
        self._transition(item.key, tracked, task_pb2.TASK_STATE_FAILED, batch, failure)
        batch.actions.append(
            PodActionRow(item.pod_uid, tracked.task.namespace, tracked.task.pod_name, "delete")
        )

    def _finish_snapshot(self, batch: Batch) -> None:
        """Tasks whose pod we had seen but which the snapshot no longer has: the pod vanished unseen."""
        seen, self._snapshot_seen = self._snapshot_seen, None
        self.synced.set()
        if seen is None:
            return
        for key, tracked in list(self._active.items()):
            if not tracked.pod_uid or tracked.pod_uid in seen:
                continue
            if tracked.task.state == task_pb2.TASK_STATE_RUNNING:
                failure = task_pb2.FailureDetails(
                    reason="DeletedWhileRunning", message="the pod disappeared while it was running"
                )
                self._transition(key, tracked, task_pb2.TASK_STATE_FAILED, batch, failure)
            else:
                failure = task_pb2.FailureDetails(
                    reason="PodLostBeforeStart", message="the pod disappeared before it started"
                )
                self._lost(key, tracked, batch, failure)

    def _apply_cancel(self, item: CancelItem, batch: Batch) -> tuple[task_pb2.Task, Tracked]:
        key = podmeta.key_string(item.key)
        tracked = self._lookup(key)
        if tracked is None or tracked.task.state == task_pb2.TASK_STATE_UNSPECIFIED:
            raise UnknownTask("key: no task with this key")
        if tracked.task.state not in TERMINAL:
            self._transition(key, tracked, task_pb2.TASK_STATE_REVOKED, batch)
            if tracked.pod_uid:
                batch.actions.append(
                    PodActionRow(tracked.pod_uid, tracked.task.namespace, tracked.task.pod_name, "delete")
                )
        return tracked.task, tracked
