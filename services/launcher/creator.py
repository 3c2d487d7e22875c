"""Creating pods through the Kubernetes API: concurrently, bounded, patiently, and never twice.

A fixed pool of workers drains the queue of accepted launches, so at most `concurrency` creates
are in flight and nothing waits for a scheduler loop. Transient failures (429, 409 conflicts,
5xx, 403 exceeded quota, connection errors) are retried by time, not by count: with capped,
jittered exponential backoff until the task is no longer wanted (cancelled, relaunched) or its
queued deadline (`queued_timeout_s` after it was accepted) has passed; only then does the launch
fail, with reason QueuedTimeout. An accepted task so survives an API outage of any length shorter
than that. A 429's Retry-After pauses every worker, since it speaks for the whole API server.
Permanent failures (400, 422, 404, other 403s) fail the launch at once with the API's message; a
403 first gets a few retries of its own (an API server that has just restarted answers 403 until
its authorizer catches up). A 409 AlreadyExists means an earlier attempt already made the pod:
that is success.

Launches replayed on start (their outcome was never stored) are checked before anything is
created (replay.py), by a small pool of their own, so that new launches never queue behind a
replay waiting for the reconciler.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import aiohttp
from opentelemetry.trace import Span

from services.launcher import metrics
from services.launcher.metrics import CreateOutcome
from services.launcher.reconciler_client import ReconcilerUnavailable
from services.launcher.replay import Replay, decide
from services.launcher.store import LaunchStore, stamp_cancelled, stamp_created, stamp_failed
from shepherd import failpoints, podmeta, tracing
from shepherd.kube import ApiError, KubeClient, is_transient
from shepherd.kube.client import sleep_backoff
from shepherd.kube.errors import Retries
from shepherd.kube.reachability import ApiReachability
from shepherd.logging import BoundLogger, get_logger
from shepherd.sqlite import StoreUnavailable
from shepherd.v1 import launcher_service_pb2, task_pb2

Launch = launcher_service_pb2.Launch
# What a create can fail with: an answer from the API server, or no answer at all.
_API_FAILURES = (ApiError, aiohttp.ClientError, OSError, TimeoutError)


class FailureReason(StrEnum):
    """FailureDetails.reason of a launch that failed (see task.proto)."""

    REJECTED = "LaunchRejected"  # the API server refused the pod (400, 422, a lasting 403...)
    QUEUED_TIMEOUT = "QueuedTimeout"  # not created within the queued deadline (API unreachable...)


class TaskLookup(Protocol):
    """The reconciler, as the replay asks it about a task (see reconciler_client.py)."""

    async def get_task(self, key: task_pb2.TaskKey) -> task_pb2.Task | None: ...


@dataclass
class CreatorStats:
    created: int = 0
    already_existed: int = 0
    failed: int = 0
    retries: int = 0
    replays_settled: int = 0  # replayed launches settled without a create (pod made before, or revoked)


@dataclass
class PodCreator:
    kube: KubeClient
    store: LaunchStore
    concurrency: int = 64
    queued_timeout_s: float = 600.0
    backoff_cap_s: float = 30.0
    api: ApiReachability | None = None  # told each call's outcome; wakes waiting retries on recovery
    reconciler: TaskLookup | None = None  # needed for replayed launches
    replay_concurrency: int = 16
    stats: CreatorStats = field(default_factory=CreatorStats)
    _queue: asyncio.Queue[tuple[Launch, dict[str, Any], str]] = field(default_factory=asyncio.Queue)
    _replays: asyncio.Queue[tuple[Launch, dict[str, Any], str]] = field(default_factory=asyncio.Queue)
    _inflight: set[str] = field(default_factory=set)
    # Replayed launches not yet checked: their pod may exist (created before the restart).
    _unsure: set[str] = field(default_factory=set)
    # The attempt still wanted for each key queued, being checked or in flight. A relaunch replaces
    # it and a cancel removes it, so a queued create that either has made obsolete is skipped, and
    # a create being retried stops. All launches, relaunches and cancels of this launcher pass here.
    _wanted: dict[str, int] = field(default_factory=dict)
    _resume_at: float = 0.0
    _log: BoundLogger = field(default_factory=lambda: get_logger(component="creator"))
    _unsettled: asyncio.Queue[Launch] = field(default_factory=asyncio.Queue)  # outcomes to write again

    @property
    def backlog(self) -> int:
        """Launches accepted and not yet settled (queued, being checked or being created)."""
        return self._queue.qsize() + len(self._inflight) + len(self._unsure)

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def in_flight(self) -> int:
        return len(self._inflight)

    def replays_waiting(self) -> int:
        return len(self._unsure)

    def submit(self, launch: Launch, pod: dict[str, Any], *, replayed: bool = False) -> None:
        """Create the launch's pod. `replayed`: a launch from before a restart whose outcome was
        never stored, checked first so that its pod is never made twice (replay.py)."""
        name = podmeta.key_string(launch.key)
        self._wanted[name] = launch.attempt
        if replayed:
            if self.reconciler is None:
                raise ValueError("replayed launches need the reconciler to be checked against")
            self._unsure.add(name)
            self._replays.put_nowait((launch, pod, name))
        else:
            self._queue.put_nowait((launch, pod, name))

    def cancel(self, key: task_pb2.TaskKey) -> bool:
        """Stop a queued create; True if the pod may exist: a create for the key is in flight right
        now, or it is a replayed launch not yet checked (its create may have come before the restart)."""
        name = podmeta.key_string(key)
        self._wanted.pop(name, None)
        return name in self._inflight or name in self._unsure

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._resettle(), name="pod-creator-outcomes")
            for i in range(self.concurrency):
                group.create_task(self._worker(), name=f"pod-creator-{i}")
            for i in range(self.replay_concurrency):
                group.create_task(self._replay_worker(), name=f"pod-replay-{i}")

    # ---- creates -------------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            launch, pod, name = await self._queue.get()
            if self._wanted.get(name) != launch.attempt:
                continue  # cancelled, or relaunched, since it was queued
            failpoints.hit("creator.worker")
            self._inflight.add(name)
            try:
                with tracing.span(tracing.SpanName.POD_CREATE, launch.traceparent) as span:
                    if span.is_recording():
                        span.set_attributes(
                            {tracing.Attr.POD: launch.pod_name, tracing.Attr.ATTEMPT: launch.attempt}
                        )
                    await self._create(launch, pod, name, span)
            except Exception as err:  # a worker must survive anything one launch throws at it
                self._log.exception("unexpected error creating pod", error=str(err))
            finally:
                self._inflight.discard(name)
                self._forget(name, launch)

    async def _create(self, launch: Launch, pod: dict[str, Any], name: str, span: Span) -> None:
        """Create the pod, retrying. `span` (the task's, or a non-recording one) is told the outcome
        (none: the launch was cancelled or relaunched meanwhile) and the retries."""
        log = self._log.bind(pod=launch.pod_name, namespace=launch.namespace, task_key=podmeta.log_key(name))
        retries = Retries(deadline=self._deadline(launch))
        while True:
            span.set_attribute(tracing.Attr.RETRIES, retries.attempt)
            if self._wanted.get(name) != launch.attempt:
                return  # cancelled (or relaunched) while it was being retried
            if (wait := self._resume_at - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            started = time.monotonic()
            try:
                await self.kube.create_pod(launch.namespace, pod)
            except _API_FAILURES as err:
                metrics.CREATE_SECONDS.observe(time.monotonic() - started)
                self._observe(err)
                if isinstance(err, ApiError) and err.already_exists:
                    self.stats.already_existed += 1
                    metrics.creates[CreateOutcome.ALREADY_EXISTED].inc()
                    span.set_attribute(tracing.Attr.OUTCOME, CreateOutcome.ALREADY_EXISTED)
                    self._settle(stamp_created(launch))
                    log.info("pod already existed: launch is settled")
                    return
                if await self._retry(retries, err, log, "creating pod"):
                    continue
                self._fail(launch, err, retries, log)
                span.set_attribute(
                    tracing.Attr.OUTCOME,
                    CreateOutcome.QUEUED_TIMEOUT if retries.timed_out else CreateOutcome.REJECTED,
                )
                tracing.fail(span, str(err))
                return
            metrics.CREATE_SECONDS.observe(time.monotonic() - started)
            self._observe(None)
            self.stats.created += 1
            metrics.creates[CreateOutcome.CREATED].inc()
            span.set_attribute(tracing.Attr.OUTCOME, CreateOutcome.CREATED)
            self._settle(stamp_created(launch))
            return

    # ---- replayed launches ---------------------------------------------------------------------

    async def _replay_worker(self) -> None:
        while True:
            launch, pod, name = await self._replays.get()
            try:
                if self._wanted.get(name) == launch.attempt:
                    await self._replay(launch, pod, name)
            except Exception as err:  # a worker must survive anything one launch throws at it
                self._log.exception("unexpected error checking a replayed launch", error=str(err))
                self._forget(name, launch)
            finally:
                self._unsure.discard(name)

    async def _replay(self, launch: Launch, pod: dict[str, Any], name: str) -> None:
        """Check a replayed launch (replay.py), then create its pod only if it never had one.
        While the API server or the reconciler cannot answer, it waits, bounded by the deadline."""
        log = self._log.bind(pod=launch.pod_name, namespace=launch.namespace, task_key=podmeta.log_key(name))
        assert self.reconciler is not None  # submit() refuses replays without one
        retries = Retries(deadline=self._deadline(launch))
        pods_readable = True  # False once the API refused us reading pods for good (RBAC)
        while True:
            if self._wanted.get(name) != launch.attempt:
                return  # cancelled (or relaunched) while it was waiting
            try:
                verdict = await self._check(launch, pods_readable=pods_readable)
            except (ReconcilerUnavailable, *_API_FAILURES) as err:
                if not isinstance(err, ReconcilerUnavailable):
                    self._observe(err)
                if await self._retry(retries, err, log, "checking a replayed launch"):
                    continue
                if isinstance(err, ApiError) and err.status == 403 and not retries.timed_out:
                    # No `get` on pods (RBAC older than this check): the reconciler's record alone
                    # decides, which leaves only the moment before it sees a new pod uncovered.
                    log.warning("may not read pods; checking the replayed launch with the reconciler only")
                    pods_readable = False
                    continue
                self._fail(launch, err, retries, log)
                self._forget(name, launch)
                return
            break
        if verdict is Replay.CREATE:
            log.info("replayed launch: no pod was ever made for it; creating it")
            self._queue.put_nowait((launch, pod, name))
            return
        self.stats.replays_settled += 1
        if verdict is Replay.CREATED:
            self._settle(stamp_created(launch))
            log.info("replayed launch: its pod was created before the restart; settled without a create")
        else:
            self._settle(stamp_cancelled(launch))
            log.info("replayed launch: the task was cancelled meanwhile; settled without a create")
        self._forget(name, launch)

    async def _check(self, launch: Launch, *, pods_readable: bool) -> Replay:
        """Its pod first, then the reconciler: the order matters (see replay.py)."""
        assert self.reconciler is not None
        if pods_readable:
            exists = await self.kube.pod_exists(launch.namespace, launch.pod_name)
            self._observe(None)
            if exists:
                return Replay.CREATED
        return decide(launch, await self.reconciler.get_task(launch.key))

    # ---- shared --------------------------------------------------------------------------------

    def _deadline(self, launch: Launch) -> float:
        """Epoch seconds after which the launch stops being retried: `queued_timeout_s` after the
        task was accepted (so a replay after a restart has only what is left of it)."""
        accepted = launch.accept_time.ToNanoseconds() / 1e9 if launch.HasField("accept_time") else time.time()
        return accepted + self.queued_timeout_s

    async def _retry(self, retries: Retries, err: BaseException, log: BoundLogger, doing: str) -> bool:
        """If `err` is worth another try before the deadline, wait the backoff and say so."""
        if not retries.another(err):
            return False
        self.stats.retries += 1
        metrics.retries[metrics.retry_cause(err)].inc()
        retry_after = err.retry_after_s if isinstance(err, ApiError) else None
        if retry_after:
            self._resume_at = max(self._resume_at, time.monotonic() + retry_after)
        if retries.attempt == 1 or retries.attempt % 10 == 0:  # an outage is logged, not every try
            log.warning(f"transient error {doing}; retrying", error=str(err), attempt=retries.attempt)
        delay = retries.delay(cap_s=self.backoff_cap_s, floor_s=retry_after or 0.0)
        if self.api is not None:
            await self.api.pause(delay)
        else:
            await asyncio.sleep(delay)
        return True

    def _fail(self, launch: Launch, err: BaseException, retries: Retries, log: BoundLogger) -> None:
        self.stats.failed += 1
        metrics.creates[CreateOutcome.QUEUED_TIMEOUT if retries.timed_out else CreateOutcome.REJECTED].inc()
        self._settle(stamp_failed(launch, self._failure(err, retries)))
        log.warning(
            "pod creation failed",
            error=str(err),
            transient=is_transient(err),
            timed_out=retries.timed_out,
            attempts=retries.attempt + 1,
        )

    def _failure(self, err: BaseException, retries: Retries) -> task_pb2.FailureDetails:
        status = err.status if isinstance(err, ApiError) else 0
        if retries.timed_out:
            return task_pb2.FailureDetails(
                reason=FailureReason.QUEUED_TIMEOUT,
                message=f"the pod could not be created within the queued deadline "
                f"({self.queued_timeout_s:g} s after the task was accepted; {retries.attempt} retries); "
                f"last error: {err}",
                api_status=status,
            )
        return task_pb2.FailureDetails(
            reason=FailureReason.REJECTED,
            message=f"the API server refused the pod: {err.message if isinstance(err, ApiError) else err}"
            + (f" ({retries.attempt} retries)" if retries.attempt else ""),
            api_status=status,
        )

    def _observe(self, error: BaseException | None) -> None:
        if self.api is not None:
            self.api.observe(error)

    def _forget(self, name: str, launch: Launch) -> None:
        if self._wanted.get(name) == launch.attempt:
            del self._wanted[name]

    def _settle(self, launch: Launch) -> None:
        """Record a launch's outcome without holding the worker until it is committed: the worker
        moves on to the next create at once, and commits are not on the create path. If the
        process dies first, the launch is replayed on start and checked before anything is
        created (replay.py), which settles it the same way. An outcome the store cannot take (a
        full disk, a failing volume) is kept and written again until it can (_resettle)."""
        try:
            failpoints.hit("launcher.settle")
        except failpoints.FailpointError:
            return  # the outcome is lost, as if the process had died before its commit
        future = self.store.update_soon(launch, only_if_state=launcher_service_pb2.LAUNCH_STATE_ACCEPTED)
        future.add_done_callback(lambda done: self._settled(done, launch))

    def _settled(self, future: asyncio.Future[bool], launch: Launch) -> None:
        if future.cancelled() or (err := future.exception()) is None:
            return
        if isinstance(err, StoreUnavailable):
            self._unsettled.put_nowait(launch)
        else:
            self._log.error("could not record a launch's outcome", error=str(err))

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
                    self._log.error("could not record a launch's outcome", error=str(result))
            if self._unsettled.empty():
                failures = 0
            else:
                failures += 1
                await sleep_backoff(failures, cap_s=5.0)
