"""Applying events to tasks, in batches, through one applier so no two changes race.

Launch events (from the launcher), pod events (from the watcher) and commands (cancel) enter one
queue. The applier takes whatever is waiting (up to `batch_size`), asks the state machine what
each item means for its task (every decision is made there; this module keeps the books: which
pod belongs to which task, deadlines, attempts), and commits the batch's task rows, transitions,
pod actions and stream cursors in one transaction. Only then are the new pod actions handed to
the action runner and the transitions visible to WatchTaskStates. Per event the work is O(1): a
dict lookup, a pure decision, and a share of one commit.

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

from opentelemetry.trace import Span

from services.reconciler import metrics
from services.reconciler.forgotten import LaunchGap
from services.reconciler.postmortem import ran_in_a_runtime
from services.reconciler.statemachine import (
    TERMINAL,
    Decision,
    PodAction,
    Policy,
    after_loss,
    decide,
    decide_adoption,
    decide_cancel,
    decide_launch,
    decide_launch_lost,
    decide_pending_timeout,
    decide_relaunch_refused,
    decide_stale_pod,
    decide_unseen,
    decide_vanished,
    is_new_life,
    is_new_pod_life,
    moves_forward,
)
from services.reconciler.store import Batch, PodActionRow, TaskStore, Tombstone
from shepherd import podmeta, timestamps, tracing
from shepherd.logging import BoundLogger, get_logger
from shepherd.sqlite import is_store_fault
from shepherd.v1 import launcher_service_pb2, task_pb2, watcher_service_pb2

PodEvent = watcher_service_pb2.PodEvent
Launch = launcher_service_pb2.Launch
SOURCE_LAUNCHER = "launcher"
SOURCE_WATCHER = "watcher"
# Cursor rows of the latest gap in the launcher stream (forgotten.LaunchGap), and up to where the
# tasks it may have left QUEUED were checked against the launcher.
GAP_AFTER = "launcher-gap-after"
GAP_UPTO = "launcher-gap-upto"
GAP_CHECKED = "launcher-gap-checked"
_TERMINAL_CACHE = 20_000  # finished tasks kept in memory to answer late events without a read
_TASK_DEADLINE = "task:"  # deadline handles for tasks (not pods): created, but never seen


def _transition_span(
    key: str,
    tracked: Tracked,
    previous: task_pb2.TaskState.ValueType,
    failure: task_pb2.FailureDetails | None,
) -> Span:
    """The span of a transition in its task's trace: from the decision until it is committed."""
    task = tracked.task
    return tracing.start(
        tracing.SpanName.TRANSITION,
        tracked.traceparent,
        {
            tracing.Attr.TASK_KEY: podmeta.log_key(key),
            tracing.Attr.PREVIOUS_STATE: task_pb2.TaskState.Name(previous),
            tracing.Attr.STATE: task_pb2.TaskState.Name(task.state),
            tracing.Attr.REASON: failure.reason if failure is not None else "",
            tracing.Attr.NAMESPACE: task.namespace,
            tracing.Attr.POD: task.pod_name,
        },
    )


class Refused(Exception):
    """A command the engine declines for an ordinary reason (the caller answers it): not an error."""


class UnknownTask(Refused, LookupError):
    """No task with that key."""


@dataclass
class Tracked:
    task: task_pb2.Task
    pod_uid: str = ""
    pending_note: str = ""  # why the pod is still Pending (the scheduler's message), for timeouts
    state_since: float = 0.0  # epoch seconds it entered its state, if this process saw it (metrics)
    # The W3C trace context of its launch, while tracing is on (shepherd/tracing.py): from the
    # launch events and the pod's events, so kept in memory only (a restart's snapshot brings it back).
    traceparent: str = ""
    # A tombstone's stand-in (store.prune_finished): the task was pruned in `task.state`. Decided
    # on as the finished task it was, never stored again, never answered as known; but a launch
    # or a pod that began after it was pruned is a new life of the key (statemachine.is_new_life,
    # is_new_pod_life).
    pruned: Tombstone | None = None


@dataclass(frozen=True)
class PodRef:
    """The pod a decision's action is for."""

    uid: str
    namespace: str
    name: str


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


@dataclass(frozen=True)
class KnownLaunch:
    """A launch read from the launcher (GetLaunch) for a key the engine did not know yet: the
    launcher answered LaunchTask before its event stream brought the launch here, and a caller
    who got that answer must find the task. Applied like the stream's events, which it repeats."""

    launch: Launch
    done: asyncio.Future[task_pb2.Task | None]


@dataclass(frozen=True)
class FailureEvents:
    """The Kubernetes Events read about a failed task's pod once it was cleaned up: they go into
    the task's failure details (no transition: the task stays FAILED)."""

    key: str
    pod_uid: str
    events: list[task_pb2.KubernetesEvent]


@dataclass(frozen=True)
class LaunchLost:
    """After a gap: the launcher no longer has the launch of a task still QUEUED here."""

    key: task_pb2.TaskKey


@dataclass(frozen=True)
class GapChecked:
    """Every task a gap may have left QUEUED was checked against the launcher."""

    upto: int


Item = (
    LaunchItem
    | LaunchGap
    | LaunchLost
    | GapChecked
    | PodItem
    | SnapshotStart
    | CancelItem
    | PendingExpired
    | RelaunchRefused
    | KnownLaunch
    | FailureEvents
)
Answered = CancelItem | KnownLaunch  # items whose caller waits for the commit and a reply


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
    # The latest gap in the launcher stream (committed), and whether its check is still to do.
    gap: LaunchGap = field(default_factory=LaunchGap)
    gap_unchecked: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_size)
        self.gap = LaunchGap(self.store.cursor(GAP_AFTER), self.store.cursor(GAP_UPTO))
        if self.gap.upto > self.store.cursor(GAP_CHECKED):
            self.gap_unchecked.set()  # the check was cut short by a restart: do it again
        for task, uid in self.store.unfinished():
            key = podmeta.key_string(task.key)
            self._active[key] = Tracked(task, uid)
            if not uid and task.HasField("pod_create_time"):
                # Created, never seen: the deadline that notices a pod lost unseen outlives us.
                created = task.pod_create_time.ToNanoseconds() / 1e9
                self._arm(_TASK_DEADLINE + key, created + self.pending_timeout_s, key)
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

    async def failure_events(self, key: str, pod_uid: str, events: list[task_pb2.KubernetesEvent]) -> None:
        await self._queue.put(FailureEvents(key, pod_uid, events))

    async def relaunch_refused(self, key: task_pb2.TaskKey, why: str) -> None:
        await self._queue.put(RelaunchRefused(key, why))

    async def cancel(self, key: task_pb2.TaskKey, reason: str) -> tuple[task_pb2.Task, Tracked]:
        done: asyncio.Future[tuple[task_pb2.Task, Tracked]] = asyncio.get_running_loop().create_future()
        await self._queue.put(CancelItem(key, reason, done))
        return await done

    async def learn_launch(self, launch: Launch) -> task_pb2.Task | None:
        """Apply a launch fetched from the launcher, as its stream events would be (idempotent,
        forward-only); once committed, the task as it now stands (None if still unknown)."""
        done: asyncio.Future[task_pb2.Task | None] = asyncio.get_running_loop().create_future()
        await self._queue.put(KnownLaunch(launch, done))
        return await done

    def queued_without_pod(self) -> list[task_pb2.TaskKey]:
        """Tasks QUEUED with no pod seen: after a gap, the ones whose launch outcome may be lost."""
        return [
            t.task.key
            for t in self._active.values()
            if t.task.state == task_pb2.TASK_STATE_QUEUED and not t.pod_uid
        ]

    async def launch_lost(self, key: task_pb2.TaskKey) -> None:
        await self._queue.put(LaunchLost(key))

    async def gap_checked(self, upto: int) -> None:
        await self._queue.put(GapChecked(upto))

    def expect_adoption(self, pod_uid: str) -> None:
        """The pod is about to be relabelled to us: its task is reported ADOPTED when it comes into view."""
        self._adopting.add(pod_uid)

    def forget_adoption(self, pod_uid: str) -> None:
        self._adopting.discard(pod_uid)

    def is_finished(self, key: task_pb2.TaskKey) -> bool:
        """Whether the task is known and terminal (read only: for the safety sweep)."""
        name = podmeta.key_string(key)
        tracked = self._active.get(name) or self._finished.get(name)
        if tracked is not None:
            return tracked.task.state in TERMINAL
        row = self.store.get(name)
        if row is not None:
            return row[0].state in TERMINAL
        return bool(self.store.tombstones([name]))  # pruned: it had ended

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

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
                replies: list[tuple[Answered, Any]] = []
                self._prefetch(items)
                for item in items:
                    try:
                        reply = self._apply(item, batch)
                    except Refused as err:  # an ordinary refusal (e.g. cancel of an unknown key)
                        reply = err
                    except Exception as err:  # a malformed event must not stop the reconciler
                        if is_store_fault(err):
                            raise  # but a store that cannot be read must: the event is not at fault
                        log.exception(
                            "could not apply an event; skipping it", item=type(item).__name__, error=str(err)
                        )
                        reply = err
                    if isinstance(item, Answered):
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
        self, batch: Batch, replies: list[tuple[Answered, Any]], previous: asyncio.Task[None] | None
    ) -> None:
        try:
            committed = await self.store.commit(batch) if batch else None
            if previous is not None:
                await previous  # follow-ups keep batch order even when commits are joined
        except BaseException as err:  # not committed (or an earlier batch was not): nobody is told
            for span in batch.spans:
                tracing.fail(span, f"not committed: {err}")
                span.end()
            for item, _ in replies:
                if item.done.done():
                    continue  # the caller gave up
                if isinstance(err, asyncio.CancelledError):
                    item.done.cancel()
                else:
                    item.done.set_exception(err)
            raise
        for span in batch.spans:  # a transition's span ends when it is committed, visible to all
            span.end()
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
        elif isinstance(item, LaunchGap):
            # Committed with the first event after it, so a restart knows what was never read.
            batch.cursors[GAP_AFTER], batch.cursors[GAP_UPTO] = item.after, item.upto
            self.gap = item
            self.gap_unchecked.set()
        elif isinstance(item, LaunchLost):
            key = podmeta.key_string(item.key)
            tracked = self._lookup(key)
            if tracked is not None and not tracked.pod_uid:
                self._enact(key, tracked, decide_launch_lost(tracked.task.state), batch)
        elif isinstance(item, GapChecked):
            batch.cursors[GAP_CHECKED] = item.upto
        elif isinstance(item, SnapshotStart):
            self._snapshot_seen = set()
        elif isinstance(item, PendingExpired):
            self._expire_pending(item, batch)
        elif isinstance(item, RelaunchRefused):
            key = podmeta.key_string(item.key)
            tracked = self._lookup(key)
            if tracked is not None and not tracked.pod_uid:
                self._enact(key, tracked, decide_relaunch_refused(tracked.task.state, item.why), batch)
        elif isinstance(item, KnownLaunch):
            return self._apply_known_launch(item.launch, batch)
        elif isinstance(item, FailureEvents):
            self._attach_events(item, batch)
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
        unstored = [key for key in missing if key not in stored]
        if unstored:
            pruned = self._tombstones(unstored)
            self._unstored.update(key for key in unstored if key not in pruned)

    def _lookup(self, key: str) -> Tracked | None:
        tracked = self._active.get(key) or self._finished.get(key)
        if tracked is None and key not in self._unstored:
            if (row := self.store.get(key)) is not None:
                tracked = Tracked(*row)
                self._remember(key, tracked)
            else:
                tracked = self._tombstones([key]).get(key)
        return tracked

    def _tombstones(self, keys: list[str]) -> dict[str, Tracked]:
        """Stand-ins for the tasks among `keys` that pruning deleted, remembered as finished."""
        found = {}
        for key, tombstone in self.store.tombstones(keys).items():
            task = task_pb2.Task(executor_id=self.executor_id)
            task.MergeFrom(tombstone.task)
            found[key] = tracked = Tracked(task, pruned=tombstone)
            self._remember(key, tracked)
        return found

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
        # Counted as applied: a batch that then fails to commit stops the service (crash-only),
        # and its counts go with the process.
        seconds = time.time()
        if tracked.state_since and previous != task_pb2.TASK_STATE_UNSPECIFIED:
            metrics.time_in_state[previous].observe(seconds - tracked.state_since)
        tracked.state_since = seconds
        metrics.transitions[state].inc()
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
        if tracing.enabled and tracked.traceparent:
            batch.spans.append(_transition_span(key, tracked, previous, failure))
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
        if tracked is None or is_new_life(
            tracked.task, launch.accept_time, pruned_at=tracked.pruned.pruned_at if tracked.pruned else 0.0
        ):
            tracked = self._new_task(launch.key, launch.namespace, launch.pod_name, launch.attempt)
        if tracing.enabled and launch.traceparent:
            tracked.traceparent = launch.traceparent
        fill_queued = not tracked.task.HasField("queued_time") and launch.HasField("accept_time")
        if fill_queued:
            # Also when the watcher's report of the pod made the task first: its launch event is
            # the only source of the accept time.
            tracked.task.queued_time.CopyFrom(launch.accept_time)
        if launch.attempt > tracked.task.launch_attempts:
            # A relaunch: the task now waits for the new attempt's pod.
            tracked.task.launch_attempts = launch.attempt
            tracked.task.pod_name = launch.pod_name
            tracked.task.ClearField("pod_create_time")
            tracked.pod_uid = ""
            self._save(key, tracked, batch)
        elif fill_queued and tracked.task.state != task_pb2.TASK_STATE_UNSPECIFIED:
            self._save(key, tracked, batch)
        pod = (
            PodRef(tracked.pod_uid, tracked.task.namespace, tracked.task.pod_name)
            if tracked.pod_uid
            else None
        )
        self._enact(key, tracked, decide_launch(tracked.task.state, launch), batch, pod)
        if (
            launch.state == launcher_service_pb2.LAUNCH_STATE_CREATED
            and not tracked.pod_uid
            and launch.attempt == tracked.task.launch_attempts
            and tracked.task.state not in TERMINAL
        ):
            # Created but not yet seen: if the watcher never reports it, the pod was lost unseen.
            # The create time is stored with the task, so a restart re-arms the deadline.
            if launch.HasField("create_time"):
                tracked.task.pod_create_time.CopyFrom(launch.create_time)
            else:
                timestamps.stamp_now(tracked.task.pod_create_time)
            if tracked.task.state != task_pb2.TASK_STATE_UNSPECIFIED:
                self._save(key, tracked, batch)
            created = tracked.task.pod_create_time.ToNanoseconds() / 1e9
            self._arm(_TASK_DEADLINE + key, created + self.pending_timeout_s, key)

    def _apply_known_launch(self, launch: Launch, batch: Batch) -> task_pb2.Task | None:
        if launch.state != launcher_service_pb2.LAUNCH_STATE_ACCEPTED:
            # The stream reports the acceptance before any later state: replay it first, so the
            # task exists (QUEUED) whatever the launch has reached since.
            accepted = Launch(
                key=launch.key,
                state=launcher_service_pb2.LAUNCH_STATE_ACCEPTED,
                namespace=launch.namespace,
                pod_name=launch.pod_name,
                executor_id=launch.executor_id,
                accept_time=launch.accept_time,
                attempt=launch.attempt,
            )
            self._apply_launch(LaunchItem(0, accepted), batch)
        self._apply_launch(LaunchItem(0, launch), batch)  # no cursor: the stream's position stays
        tracked = self._lookup(podmeta.key_string(launch.key))
        if (
            tracked is None
            or tracked.pruned is not None
            or tracked.task.state == task_pb2.TASK_STATE_UNSPECIFIED
        ):
            return None
        task = task_pb2.Task()
        task.CopyFrom(tracked.task)
        return task

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
        if tracked is None or (
            tracked.pruned is not None
            and is_new_pod_life(event.creation_time, pruned_at=tracked.pruned.pruned_at)
        ):
            tracked = self._new_task(event.task_key, event.namespace, event.pod_name, event.launch_attempt)
        if tracing.enabled and event.traceparent:
            tracked.traceparent = event.traceparent
        deleted = kind == watcher_service_pb2.POD_EVENT_TYPE_DELETED
        pod = (
            PodRef(event.pod_uid, event.namespace, event.pod_name) if event.pod_uid and not deleted else None
        )
        if event.pod_uid in self._adopting and not deleted:
            self._adopting.discard(event.pod_uid)
            adopted = decide_adoption(tracked.task.state)
            if adopted.state is not None:
                tracked.pod_uid = event.pod_uid
            self._enact(key, tracked, adopted, batch)
        if (
            event.launch_attempt > tracked.task.launch_attempts
            and tracked.task.state != task_pb2.TASK_STATE_UNSPECIFIED
        ):
            # The watcher can be ahead of the launcher's stream: this pod proves the new attempt exists.
            tracked.task.launch_attempts = event.launch_attempt
        if event.launch_attempt and event.launch_attempt < tracked.task.launch_attempts:
            self._enact(key, tracked, decide_stale_pod(event), batch, pod)
            return
        if not deleted and tracked.pod_uid != event.pod_uid:
            tracked.pod_uid = event.pod_uid
            tracked.task.pod_name, tracked.task.namespace = event.pod_name, event.namespace
            if tracked.task.state != task_pb2.TASK_STATE_UNSPECIFIED:
                self._save(key, tracked, batch)
        acted = (
            deleted
            and event.gone == watcher_service_pb2.POD_GONE_UNSPECIFIED
            and self._acted_on(event.pod_uid, batch)
        )
        decision = decide(tracked.task.state, event, self.policy, acted_on_pod=acted)
        self._track_pending(key, tracked, event, deleted)
        self._disarm(_TASK_DEADLINE + key)  # its pod is in view: the pod's own deadline applies now
        self._enact(key, tracked, decision, batch, pod, keep_log=ran_in_a_runtime(event))

    def _attach_events(self, item: FailureEvents, batch: Batch) -> None:
        tracked = self._lookup(item.key)
        if (
            tracked is None
            or tracked.task.state != task_pb2.TASK_STATE_FAILED
            or tracked.pod_uid != item.pod_uid
            or not item.events
        ):
            return  # relaunched, or a pod of another attempt: these events are not its failure's
        del tracked.task.failure.events[:]
        tracked.task.failure.events.extend(item.events)
        self._save(item.key, tracked, batch)

    def _acted_on(self, pod_uid: str, batch: Batch) -> bool:
        """Whether this reconciler has deleted the pod or marked it done (a rare read: only for a
        pod that went out of view when the watcher could not tell how)."""
        return any(row.pod_uid == pod_uid for row in batch.actions) or self.store.acted_on(pod_uid)

    # ---- applying decisions -------------------------------------------------------------------

    def _enact(
        self,
        key: str,
        tracked: Tracked,
        decision: Decision,
        batch: Batch,
        pod: PodRef | None = None,
        *,
        keep_log: bool = False,
    ) -> None:
        """Apply one decision of the state machine: the transition if it moves the task forward,
        a relaunch for a pod lost before it ran, and the pod action (recorded once per pod). An
        action that cleans up the pod of a task this decision finished also keeps its log tail
        (`keep_log`: its `base` container ran in a runtime) and, for a failure, reads its Events."""
        before = tracked.task.state
        if decision.lost_before_start and tracked.task.state not in TERMINAL:
            self._enact(
                key,
                tracked,
                after_loss(tracked.task.launch_attempts, self.launch_failure_retries, decision.failure),
                batch,
            )
        elif decision.relaunch and tracked.task.state not in TERMINAL:
            batch.relaunches.append((tracked.task.key, tracked.task.launch_attempts))
            tracked.pod_uid = ""
            self._log.info(
                "pod lost before it ran: relaunching",
                task_key=podmeta.log_key(key),
                pod=tracked.task.pod_name,
                attempt=tracked.task.launch_attempts + 1,
                reason=decision.failure.reason if decision.failure is not None else "",
            )
        elif decision.state is not None and moves_forward(tracked.task.state, decision.state):
            self._transition(key, tracked, decision.state, batch, decision.failure)
        if decision.action is not PodAction.NONE and pod is not None:
            now = tracked.task.state
            finished = now != before and now in (task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_FAILED)
            batch.actions.append(
                PodActionRow(
                    pod.uid,
                    pod.namespace,
                    pod.name,
                    decision.action.value,
                    task_key=key if finished else "",
                    keep_log=finished and keep_log,
                    read_events=finished and now == task_pb2.TASK_STATE_FAILED,
                    traceparent=tracked.traceparent,
                )
            )

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
            if tracked is not None and not tracked.pod_uid:
                self._enact(
                    item.key, tracked, decide_unseen(tracked.task.state, self.pending_timeout_s), batch
                )
            return
        if tracked is None or tracked.pod_uid != item.pod_uid:
            return
        decision = decide_pending_timeout(tracked.task.state, self.pending_timeout_s, tracked.pending_note)
        self._enact(
            item.key,
            tracked,
            decision,
            batch,
            PodRef(item.pod_uid, tracked.task.namespace, tracked.task.pod_name),
        )

    def _finish_snapshot(self, batch: Batch) -> None:
        """Tasks whose pod we had seen but which the snapshot no longer has: the pod vanished unseen."""
        seen, self._snapshot_seen = self._snapshot_seen, None
        self.synced.set()
        if seen is None:
            return
        for key, tracked in list(self._active.items()):
            if tracked.pod_uid and tracked.pod_uid not in seen:
                self._enact(key, tracked, decide_vanished(tracked.task.state), batch)

    def _apply_cancel(self, item: CancelItem, batch: Batch) -> tuple[task_pb2.Task, Tracked]:
        key = podmeta.key_string(item.key)
        tracked = self._lookup(key)
        if tracked is None or tracked.task.state == task_pb2.TASK_STATE_UNSPECIFIED:
            raise UnknownTask("key: no task with this key")
        if tracked.pruned is not None:
            raise UnknownTask("key: this task ended and was pruned by the retention")
        pod = (
            PodRef(tracked.pod_uid, tracked.task.namespace, tracked.task.pod_name)
            if tracked.pod_uid
            else None
        )
        self._enact(key, tracked, decide_cancel(tracked.task.state), batch, pod)
        return tracked.task, tracked
