"""Creating pods through the Kubernetes API: concurrently, bounded, and patiently.

A fixed pool of workers drains the queue of accepted launches, so at most `concurrency` creates
are in flight and nothing waits for a scheduler loop. Transient failures (429, 409 conflicts,
5xx, 403 exceeded quota, connection errors) are retried with capped, jittered exponential
backoff; a 429's Retry-After pauses every worker, since it speaks for the whole API server.
Permanent failures (400, 422, 404, other 403s) fail the launch at once with the API's message.
A 409 AlreadyExists means an earlier attempt already made the pod: that is success.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from services.launcher.store import LaunchStore, stamp_created, stamp_failed
from shepherd import failpoints, podmeta
from shepherd.kube import ApiError, KubeClient, is_transient
from shepherd.kube.client import sleep_backoff
from shepherd.kube.errors import Retries
from shepherd.logging import get_logger
from shepherd.sqlite import StoreUnavailable
from shepherd.v1 import launcher_service_pb2, task_pb2

Launch = launcher_service_pb2.Launch


@dataclass
class CreatorStats:
    created: int = 0
    already_existed: int = 0
    failed: int = 0
    retries: int = 0


@dataclass
class PodCreator:
    kube: KubeClient
    store: LaunchStore
    concurrency: int = 64
    max_retries: int = 8  # -1: retry transient errors forever
    backoff_cap_s: float = 30.0
    stats: CreatorStats = field(default_factory=CreatorStats)
    _queue: asyncio.Queue[tuple[Launch, dict[str, Any], str]] = field(default_factory=asyncio.Queue)
    _inflight: set[str] = field(default_factory=set)
    # The attempt still wanted for each key queued or in flight. A relaunch replaces it and a cancel
    # removes it, so a queued create that either has made obsolete is skipped, and a create being
    # retried stops. All launches, relaunches and cancels of this launcher pass through here.
    _wanted: dict[str, int] = field(default_factory=dict)
    _resume_at: float = 0.0
    _unsettled: asyncio.Queue[Launch] = field(default_factory=asyncio.Queue)  # outcomes to write again

    @property
    def backlog(self) -> int:
        """Launches accepted and not yet settled (queued or being created)."""
        return self._queue.qsize() + len(self._inflight)

    def submit(self, launch: Launch, pod: dict[str, Any]) -> None:
        name = podmeta.key_string(launch.key)
        self._wanted[name] = launch.attempt
        self._queue.put_nowait((launch, pod, name))

    def cancel(self, key: task_pb2.TaskKey) -> bool:
        """Stop a queued create; True if a create for the key is in flight right now."""
        name = podmeta.key_string(key)
        self._wanted.pop(name, None)
        return name in self._inflight

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._resettle(), name="pod-creator-outcomes")
            for i in range(self.concurrency):
                group.create_task(self._worker(), name=f"pod-creator-{i}")

    async def _worker(self) -> None:
        while True:
            launch, pod, name = await self._queue.get()
            if self._wanted.get(name) != launch.attempt:
                continue  # cancelled, or relaunched, since it was queued
            failpoints.hit("creator.worker")
            self._inflight.add(name)
            try:
                await self._create(launch, pod, name)
            except Exception as err:  # a worker must survive anything one launch throws at it
                get_logger(component="creator").exception("unexpected error creating pod", error=str(err))
            finally:
                self._inflight.discard(name)
                if self._wanted.get(name) == launch.attempt:
                    del self._wanted[name]

    async def _create(self, launch: Launch, pod: dict[str, Any], name: str) -> None:
        log = get_logger(
            component="creator",
            pod=launch.pod_name,
            namespace=launch.namespace,
            task_key=podmeta.log_key(name),
        )
        retries = Retries(self.max_retries)
        while True:
            if self._wanted.get(name) != launch.attempt:
                return  # cancelled (or relaunched) while it was being retried
            if (wait := self._resume_at - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            try:
                await self.kube.create_pod(launch.namespace, pod)
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as err:
                if isinstance(err, ApiError) and err.already_exists:
                    self.stats.already_existed += 1
                    self._settle(stamp_created(launch))
                    log.info("pod already existed: launch is settled")
                    return
                if retries.another(err):
                    self.stats.retries += 1
                    retry_after = err.retry_after_s if isinstance(err, ApiError) else None
                    if retry_after:
                        self._resume_at = max(self._resume_at, time.monotonic() + retry_after)
                    log.warning(
                        "transient error creating pod; retrying", error=str(err), attempt=retries.attempt
                    )
                    await sleep_backoff(retries.attempt, cap_s=self.backoff_cap_s, floor_s=retry_after or 0.0)
                    continue
                self.stats.failed += 1
                self._settle(stamp_failed(launch, _failure(err, retries.attempt)))
                log.warning(
                    "pod creation failed",
                    error=str(err),
                    transient=is_transient(err),
                    attempts=retries.attempt + 1,
                )
                return
            self.stats.created += 1
            self._settle(stamp_created(launch))
            return

    def _settle(self, launch: Launch) -> None:
        """Record a launch's outcome without holding the worker until it is committed: the worker
        moves on to the next create at once, and commits are not on the create path. If the
        process dies first, the replay on start finds the launch ACCEPTED, and its create answers
        409 AlreadyExists, which settles it the same way. An outcome the store cannot take (a full
        disk, a failing volume) is kept and written again until it can (_resettle)."""
        future = self.store.update_soon(launch, only_if_state=launcher_service_pb2.LAUNCH_STATE_ACCEPTED)
        future.add_done_callback(lambda done: self._settled(done, launch))

    def _settled(self, future: asyncio.Future[bool], launch: Launch) -> None:
        if future.cancelled() or (err := future.exception()) is None:
            return
        if isinstance(err, StoreUnavailable):
            self._unsettled.put_nowait(launch)
        else:
            get_logger(component="creator").error("could not record a launch's outcome", error=str(err))

    async def _resettle(self) -> None:
        """Write again the outcomes the store could not take, all waiting ones at once, with
        backoff while it still cannot."""
        failures = 0
        while True:
            launches = [await self._unsettled.get()]
            while not self._unsettled.empty():
                launches.append(self._unsettled.get_nowait())
            results = await asyncio.gather(
                *(
                    self.store.update_soon(
                        launch, only_if_state=launcher_service_pb2.LAUNCH_STATE_ACCEPTED, lazy=False
                    )
                    for launch in launches
                ),
                return_exceptions=True,
            )
            for launch, result in zip(launches, results, strict=True):
                if isinstance(result, StoreUnavailable):
                    self._unsettled.put_nowait(launch)
                elif isinstance(result, BaseException):
                    get_logger(component="creator").error(
                        "could not record a launch's outcome", error=str(result)
                    )
            if self._unsettled.empty():
                failures = 0
            else:
                failures += 1
                await sleep_backoff(failures, cap_s=5.0)


def _failure(err: BaseException, retries: int) -> task_pb2.FailureDetails:
    if isinstance(err, ApiError):
        what = "gave up after retries" if is_transient(err) else "the API server refused the pod"
        return task_pb2.FailureDetails(
            reason="LaunchRejected" if not is_transient(err) else "LaunchRetriesExhausted",
            message=f"{what}: {err.message}" + (f" ({retries} retries)" if retries else ""),
            api_status=err.status,
        )
    return task_pb2.FailureDetails(
        reason="LaunchRetriesExhausted",
        message=f"could not reach the API server after {retries} retries: {err}",
    )
