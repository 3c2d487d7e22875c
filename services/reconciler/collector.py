"""Reading what a finished pod leaves behind, without ever holding up its clean-up for long.

Before the clean-up action of a finished task's pod (when its `base` container ran in a real
runtime, see postmortem.ran_in_a_runtime) the end of `base`'s log is read and kept in the store,
so GetTaskLogs still answers once the pod is deleted. After the action of a failed task's pod, the
pod's Events are read (they outlive the pod) and handed to the engine for the failure details.

Both are best effort and bounded: each read (waiting for one of `concurrency` slots included)
gives up after `timeout_s`, and a failed or timed-out read is counted and logged, never retried,
and never stops the action: a pod whose delete waited on a kubelet that does not answer would be
a pod leaked for that long. The action itself stays one per pod (actions.py); a restart that
carries out an unfinished action again reads the log again unless its tail was already kept.
Events are read off the action workers, from a bounded queue: under a burst of failures beyond
it, the excess failures get no events (counted in `stats.event_reads_dropped`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from services.reconciler import metrics
from services.reconciler.metrics import PostMortemOutcome, PostMortemRead
from services.reconciler.postmortem import TailBuffer, recent_events
from services.reconciler.store import PodActionRow, TaskStore
from shepherd import podmeta
from shepherd.kube import ApiError, KubeClient
from shepherd.logging import get_logger
from shepherd.sqlite import StoreUnavailable
from shepherd.v1 import task_pb2

OnEvents = Callable[[str, str, list[task_pb2.KubernetesEvent]], Awaitable[None]]
_READ_ERRORS = (ApiError, aiohttp.ClientError, OSError, TimeoutError)


@dataclass
class CollectorStats:
    logs_kept: int = 0
    log_reads_failed: int = 0
    events_read: int = 0
    event_reads_failed: int = 0
    event_reads_dropped: int = 0


@dataclass
class PostMortems:
    kube: KubeClient
    store: TaskStore
    on_events: OnEvents
    log_lines: int = 100
    log_bytes: int = 16 * 1024
    logs_kept_max: int = 10_000
    events_max: int = 10
    timeout_s: float = 5.0
    concurrency: int = 8
    queue_size: int = 10_000
    stats: CollectorStats = field(default_factory=CollectorStats)
    _slots: asyncio.Semaphore = field(init=False)
    _events: asyncio.Queue[PodActionRow] = field(init=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.concurrency)
        self._events = asyncio.Queue(maxsize=self.queue_size)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for i in range(self.concurrency):
                group.create_task(self._event_reader(), name=f"post-mortem-events-{i}")

    async def keep_log(self, row: PodActionRow) -> None:
        """Keep the end of the pod's `base` log, if the row asks for it. Returns within
        `timeout_s` (plus the store's write) and never raises."""
        if not (row.keep_log and self.log_lines > 0 and row.task_key):
            return
        log = get_logger(component="post-mortem", pod=row.name, namespace=row.namespace)
        try:
            kept = self.store.kept_log(row.task_key)
            if kept is not None and kept[0] == row.pod_uid:
                return  # kept before a restart: the action is being carried out again
            tail = TailBuffer(self.log_bytes)
            async with asyncio.timeout(self.timeout_s), self._slots:
                async for chunk in self.kube.pod_log(
                    row.namespace,
                    row.name,
                    container=podmeta.BASE_CONTAINER,
                    tail_lines=self.log_lines,
                    follow=False,
                ):
                    tail.add(chunk)
            await self.store.keep_log(
                row.task_key, row.pod_uid, tail.tail(self.log_lines), max_kept=self.logs_kept_max
            )
        except (*_READ_ERRORS, StoreUnavailable) as err:
            self.stats.log_reads_failed += 1
            metrics.post_mortems[(PostMortemRead.LOG_TAIL, PostMortemOutcome.FAILED)].inc()
            log.warning("could not keep the log tail of a finished pod", error=str(err) or type(err).__name__)
            return
        except Exception as err:  # best effort: nothing here may stop the clean-up
            self.stats.log_reads_failed += 1
            metrics.post_mortems[(PostMortemRead.LOG_TAIL, PostMortemOutcome.FAILED)].inc()
            log.exception("keeping a log tail failed unexpectedly", error=str(err))
            return
        self.stats.logs_kept += 1
        metrics.post_mortems[(PostMortemRead.LOG_TAIL, PostMortemOutcome.DONE)].inc()

    def read_events_later(self, row: PodActionRow) -> None:
        """Queue the read of a failed task's pod Events (after its action went through)."""
        if not (row.read_events and self.events_max > 0 and row.task_key):
            return
        try:
            self._events.put_nowait(row)
        except asyncio.QueueFull:
            self.stats.event_reads_dropped += 1
            metrics.post_mortems[(PostMortemRead.EVENTS, PostMortemOutcome.DROPPED)].inc()

    async def _event_reader(self) -> None:
        while True:
            row = await self._events.get()
            try:
                await self._read_events(row)
            except Exception as err:  # one bad read must not stop the readers
                self.stats.event_reads_failed += 1
                metrics.post_mortems[(PostMortemRead.EVENTS, PostMortemOutcome.FAILED)].inc()
                get_logger(component="post-mortem", pod=row.name).exception(
                    "reading a pod's events failed unexpectedly", error=str(err)
                )

    async def _read_events(self, row: PodActionRow) -> None:
        try:
            async with asyncio.timeout(self.timeout_s), self._slots:
                items = await self.kube.pod_events(row.namespace, row.pod_uid)
        except _READ_ERRORS as err:
            self.stats.event_reads_failed += 1
            metrics.post_mortems[(PostMortemRead.EVENTS, PostMortemOutcome.FAILED)].inc()
            get_logger(component="post-mortem", pod=row.name, namespace=row.namespace).warning(
                "could not read a failed pod's events", error=str(err) or type(err).__name__
            )
            return
        self.stats.events_read += 1
        metrics.post_mortems[(PostMortemRead.EVENTS, PostMortemOutcome.DONE)].inc()
        events = recent_events(items, self.events_max)
        if events:
            await self.on_events(row.task_key, row.pod_uid, events)


__all__ = ["CollectorStats", "PostMortems"]
