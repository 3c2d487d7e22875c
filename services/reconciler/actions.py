"""Carrying out pod actions: delete a finished pod, or mark a kept one done.

Each action was recorded (once per pod UID) in the same transaction as the transition that caused
it, so it is neither forgotten by a crash nor repeated by a replayed event: one delete call per
pod, against Airflow's two or three. Deletes carry the pod's UID as a precondition, so a newer pod
that reuses the name is never deleted by mistake. The marks that an action is done are what keep
a restart from carrying it out again, so a mark the store cannot take is kept and written again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp

from services.reconciler.store import PodActionRow, TaskStore
from shepherd import podmeta
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
    failed: int = 0


@dataclass
class PodActions:
    kube: KubeClient
    store: TaskStore
    concurrency: int = 256
    max_retries: int = 8
    stats: ActionStats = field(default_factory=ActionStats)
    _queue: asyncio.Queue[PodActionRow] = field(default_factory=asyncio.Queue)
    _done: list[str] = field(default_factory=list)
    _flush: asyncio.Event = field(default_factory=asyncio.Event)

    def submit(self, rows: list[PodActionRow]) -> None:
        for row in rows:
            self._queue.put_nowait(row)

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._record_done(), name="pod-actions-recorder")
            for i in range(self.concurrency):
                group.create_task(self._worker(), name=f"pod-actions-{i}")

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

    async def _worker(self) -> None:
        while True:
            row = await self._queue.get()
            try:
                await self._carry_out(row)
            except Exception as err:  # one bad pod must not stop the others
                get_logger(component="pod-actions").exception(
                    "pod action failed", pod=row.name, error=str(err)
                )

    async def _carry_out(self, row: PodActionRow) -> None:
        log = get_logger(component="pod-actions", pod=row.name, namespace=row.namespace, action=row.action)
        retries = Retries(self.max_retries)
        while True:
            try:
                if row.action == "delete":
                    self.stats.delete_calls += 1
                    if not await self.kube.delete_pod(row.namespace, row.name, uid=row.pod_uid):
                        self.stats.already_gone += 1
                else:
                    self.stats.patch_calls += 1
                    await self.kube.patch_pod(
                        row.namespace, row.name, {"metadata": {"labels": {podmeta.LABEL_DONE: "true"}}}
                    )
                break
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as err:
                if isinstance(err, ApiError) and err.status == 404:
                    self.stats.already_gone += 1
                    break
                if retries.another(err):
                    await sleep_backoff(retries.attempt, floor_s=getattr(err, "retry_after_s", None) or 0.0)
                    continue
                self.stats.failed += 1
                log.warning("giving up on pod action", error=str(err))
                break
        self._done.append(row.pod_uid)
        self._flush.set()
