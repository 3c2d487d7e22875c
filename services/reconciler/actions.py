"""Carrying out pod actions: delete a finished pod, or mark a kept one done.

Each action was recorded (once per pod UID) in the same transaction as the transition that caused
it, so it is neither forgotten by a crash nor repeated by a replayed event: one delete call per
pod, against Airflow's two or three. Deletes carry the pod's UID as a precondition, so a newer pod
that reuses the name is never deleted by mistake.

An action is never given up: a pod whose delete is dropped leaks for good. A failing call is
asked again by time, with capped backoff: transient errors (shepherd.kube.errors) from a short
delay up, and refusals an operator has to lift (a Role without `delete`, an admission webhook)
at the cap. Until it succeeds the action stays not done in the store, so a restart takes it up
again. Retrying actions wait off the workers, so a stuck one never holds up the others, and
they are visible: a warning per action (its pod, how long it has been failing) at most once a
`report_interval_s`, a summary of the backlog as often, and the counts in `stats`. The marks
that an action is done are what keep a restart from carrying it out again, so a mark the store
cannot take is kept and written again.

Around the action, collector.py reads what the pod leaves behind: the end of its log before (a
bounded wait, once, not on retries) and, for a failed task, its Events after, off the workers.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp

from services.reconciler import metrics
from services.reconciler.collector import PostMortems
from services.reconciler.metrics import Action, ActionOutcome
from services.reconciler.store import PodActionRow, TaskStore
from shepherd import podmeta, tracing
from shepherd.kube import ApiError, KubeClient
from shepherd.kube.client import sleep_backoff
from shepherd.kube.errors import Retries
from shepherd.logging import get_logger
from shepherd.sqlite import StoreUnavailable


@dataclass
class ActionStats:
    delete_calls: int = 0
    patch_calls: int = 0
    already_gone: int = 0
    failed_calls: int = 0  # calls that failed and were (or will be) asked again
    retrying: int = 0  # actions failing right now, waiting for their next try
    oldest_retry_s: float = 0.0  # how long the longest-failing of them has been failing


@dataclass
class _Failing:
    """An action whose calls have failed so far."""

    retries: Retries = field(default_factory=lambda: Retries(max_retries=-1))  # no count limit
    since: float = field(default_factory=time.monotonic)
    calls: int = 0
    last_error: str = ""
    warned_at: float = 0.0


@dataclass
class PodActions:
    kube: KubeClient
    store: TaskStore
    concurrency: int = 256
    backoff_cap_s: float = 60.0
    report_interval_s: float = 60.0
    post_mortems: PostMortems | None = None  # what to read of a finished pod around its action
    stats: ActionStats = field(default_factory=ActionStats)
    _queue: asyncio.Queue[PodActionRow] = field(default_factory=asyncio.Queue)
    _done: list[str] = field(default_factory=list)
    _flush: asyncio.Event = field(default_factory=asyncio.Event)
    _failing: dict[str, _Failing] = field(default_factory=dict)  # pod uid -> its failures so far
    _waits: set[asyncio.Task[None]] = field(default_factory=set)
    _pending: set[str] = field(default_factory=set)  # uids queued, in progress or failing

    def submit(self, rows: list[PodActionRow]) -> None:
        for row in rows:
            if row.pod_uid in self._pending:
                continue  # already on its way: one action per pod at a time, never two calls at once
            self._pending.add(row.pod_uid)
            self._queue.put_nowait(row)

    @property
    def backlog(self) -> int:
        """Actions not carried out yet: queued, or failing and waiting to be asked again."""
        return self._queue.qsize() + len(self._failing)

    def retrying(self) -> int:
        """Actions failing now, waiting to be asked again."""
        return len(self._failing)

    def refresh_stats(self) -> ActionStats:
        now = time.monotonic()
        self.stats.retrying = len(self._failing)
        self.stats.oldest_retry_s = round(
            max((now - f.since for f in self._failing.values()), default=0.0), 1
        )
        return self.stats

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._record_done(), name="pod-actions-recorder")
                group.create_task(self._report(), name="pod-actions-report")
                if self.post_mortems is not None:
                    group.create_task(self.post_mortems.run(), name="post-mortems")
                for i in range(self.concurrency):
                    group.create_task(self._worker(), name=f"pod-actions-{i}")
        finally:
            for wait in list(self._waits):
                wait.cancel()

    async def _record_done(self) -> None:
        """Batch the 'done' marks: one commit for many finished actions. Marks the store cannot
        take are written again, with backoff, until it takes them (they bear repeating)."""
        failures = 0
        while True:
            await self._flush.wait()
            self._flush.clear()
            done, self._done = self._done, []
            if not done:
                continue
            try:
                await self.store.finish_actions(done)
            except StoreUnavailable:
                self._done[:0] = done
                self._flush.set()
                failures += 1
                await sleep_backoff(failures, cap_s=5.0)
                continue
            failures = 0

    async def _report(self) -> None:
        """While actions are failing, say so: how many, and for how long the oldest has."""
        log = get_logger(component="pod-actions")
        while True:
            await asyncio.sleep(self.report_interval_s)
            stats = self.refresh_stats()
            if stats.retrying:
                log.warning(
                    "pod actions are failing and being retried",
                    retrying=stats.retrying,
                    oldest_retry_s=stats.oldest_retry_s,
                    queued=self._queue.qsize(),
                )

    async def _worker(self) -> None:
        while True:
            row = await self._queue.get()
            try:
                await self._carry_out(row)
            except Exception as err:  # one bad pod must not stop the others; it is asked again
                get_logger(component="pod-actions").exception(
                    "pod action failed unexpectedly", pod=row.name, error=str(err)
                )
                self._again(row, err)

    async def _carry_out(self, row: PodActionRow) -> None:
        if self.post_mortems is not None and row.keep_log and row.pod_uid not in self._failing:
            # Bounded (collector.py): the log goes with the pod, so it is read first, once.
            await self.post_mortems.keep_log(row)
        action = Action.DELETE if row.action == "delete" else Action.MARK_DONE
        name = tracing.SpanName.POD_DELETE if action is Action.DELETE else tracing.SpanName.POD_MARK_DONE
        with tracing.span(name, row.traceparent) as span:  # each call, in the trace of the pod's launch
            outcome = await self._call(row, action)
            span.set_attribute(tracing.Attr.OUTCOME, outcome)
            if outcome is ActionOutcome.FAILED:
                tracing.fail(span, self._failing[row.pod_uid].last_error)

    async def _call(self, row: PodActionRow, action: Action) -> ActionOutcome:
        """One call of the action; FAILED ones are asked again later (_again)."""
        outcome = ActionOutcome.DONE
        try:
            if action is Action.DELETE:
                self.stats.delete_calls += 1
                if not await self.kube.delete_pod(row.namespace, row.name, uid=row.pod_uid):
                    self.stats.already_gone += 1
                    outcome = ActionOutcome.ALREADY_GONE
            else:
                self.stats.patch_calls += 1
                await self.kube.patch_pod(
                    row.namespace, row.name, {"metadata": {"labels": {podmeta.LABEL_DONE: "true"}}}
                )
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as err:
            if not (isinstance(err, ApiError) and err.status == 404):
                metrics.actions[(action, ActionOutcome.FAILED)].inc()
                self._again(row, err)
                return ActionOutcome.FAILED
            self.stats.already_gone += 1
            outcome = ActionOutcome.ALREADY_GONE
        metrics.actions[(action, outcome)].inc()
        failing = self._failing.pop(row.pod_uid, None)
        if failing is not None:
            get_logger(component="pod-actions", pod=row.name, namespace=row.namespace).info(
                "pod action went through after failing",
                action=row.action,
                calls=failing.calls + 1,
                failed_for_s=round(time.monotonic() - failing.since, 1),
            )
        self._pending.discard(row.pod_uid)
        self._done.append(row.pod_uid)
        self._flush.set()
        if self.post_mortems is not None:
            self.post_mortems.read_events_later(row)  # Events outlive the pod: read them after
        return outcome

    def _again(self, row: PodActionRow, err: BaseException) -> None:
        """Ask again later, off the workers: soon for a transient error, at the cap for a refusal."""
        failing = self._failing.setdefault(row.pod_uid, _Failing())
        failing.calls += 1
        failing.last_error = str(err)
        self.stats.failed_calls += 1
        transient = failing.retries.another(err)
        now = time.monotonic()
        if now - failing.warned_at >= self.report_interval_s:
            failing.warned_at = now
            get_logger(component="pod-actions", pod=row.name, namespace=row.namespace).warning(
                "pod action failed; retrying until it goes through",
                action=row.action,
                error=failing.last_error,
                transient=transient,
                calls=failing.calls,
                failing_for_s=round(now - failing.since, 1),
            )
        if transient:
            attempt, floor = failing.retries.attempt, getattr(err, "retry_after_s", None) or 0.0
        else:
            attempt, floor = 64, 0.0  # a refusal: it needs someone to lift it, so ask at the cap
        wait = asyncio.create_task(self._requeue_after(row, attempt, floor))
        self._waits.add(wait)
        wait.add_done_callback(self._waits.discard)

    async def _requeue_after(self, row: PodActionRow, attempt: int, floor_s: float) -> None:
        await sleep_backoff(attempt, cap_s=self.backoff_cap_s, floor_s=floor_s)
        self._queue.put_nowait(row)
