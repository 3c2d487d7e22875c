"""The scheduler's side: launch in batches, cancel, and follow WatchTaskStates with cursor resume.

It behaves as a careful scheduler would under faults: a launch that was not acknowledged is sent
again (launches are idempotent), a cancel the reconciler cannot take yet is retried, and the
state stream is resumed after the last cursor it processed whenever it breaks. It records
everything it was told, per task, for the checks; it never decides anything from a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc

from chaos.plan import PlannedTask
from chaos.scenarios import Kind
from shepherd import channels, podmeta
from shepherd.taskstates import TERMINAL
from shepherd.v1 import (
    launcher_service_pb2,
    launcher_service_pb2_grpc,
    reconciler_service_pb2,
    reconciler_service_pb2_grpc,
    task_pb2,
)

_RETRY_S = 0.3
# Answers after which an unacknowledged launch, or a cancel, is simply sent again.
_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
}


class SchedulerError(RuntimeError):
    """The service refused a request this client built: a bug here, or a contract broken there."""


@dataclass(frozen=True)
class Delivered:
    """One transition as WatchTaskStates delivered it."""

    cursor: int
    state: task_pb2.TaskState.ValueType
    previous: task_pb2.TaskState.ValueType
    reason: str
    message: str
    exit_code: int
    pod_name: str
    attempts: int
    at_s: float

    def describe(self) -> str:
        text = f"{task_pb2.TaskState.Name(self.state).removeprefix('TASK_STATE_')}@{self.cursor}"
        return text + (f"({self.reason})" if self.reason else "")


@dataclass
class TaskRecord:
    planned: PlannedTask
    acked_at_s: float | None = None
    delivered: list[Delivered] = field(default_factory=list)
    cancel_requested: bool = False
    cancel_answered: bool = False
    cancel_not_found: int = 0  # NOT_FOUND answers to CancelTask before it was taken
    launch_errors: list[str] = field(default_factory=list)  # item errors and failed calls, retried
    victim: str = ""  # "running" / "pending": its pod was deleted during a watch gap

    @property
    def kind(self) -> Kind:
        return self.planned.kind

    @property
    def label(self) -> str:
        return self.planned.key.task_id

    @property
    def terminal(self) -> list[Delivered]:
        return [d for d in self.delivered if d.state in TERMINAL]

    @property
    def last_state(self) -> task_pb2.TaskState.ValueType:
        return self.delivered[-1].state if self.delivered else task_pb2.TASK_STATE_UNSPECIFIED

    def history(self) -> str:
        return " -> ".join(d.describe() for d in self.delivered) or "nothing delivered"


@dataclass
class StreamAnomalies:
    """What the transition stream did that a resuming client should never see."""

    redelivered: list[str] = field(default_factory=list)  # a cursor at or before one already processed
    gaps: list[tuple[int, int]] = field(default_factory=list)  # cursors skipped (after, first seen)
    out_of_range: int = 0  # the log no longer reaches the cursor we resumed from
    reconnects: int = 0


@dataclass
class Scheduler:
    launcher_address: str
    reconciler_address: str
    credentials: channels.ClientCredentials
    records: dict[str, TaskRecord]  # by podmeta.key_string
    started: float
    anomalies: StreamAnomalies = field(default_factory=StreamAnomalies)
    call_errors: Counter[str] = field(default_factory=Counter)  # "RPC CODE" -> how often
    _cursor: int = 0  # resume after this one
    _high: int = 0  # the highest cursor processed
    _rereading: bool = False  # reading the log again from the start after OUT_OF_RANGE
    _seen: set[tuple[int, str, int]] = field(default_factory=set)  # (cursor, key, state) processed
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)  # set on every delivered change
    _channels: list[grpc.aio.Channel] = field(default_factory=list)
    launcher: launcher_service_pb2_grpc.LauncherServiceStub = field(init=False)
    reconciler: reconciler_service_pb2_grpc.ReconcilerServiceStub = field(init=False)

    async def __aenter__(self) -> Scheduler:
        # Reconnect fast: the services come back within seconds of a kill.
        lch = channels.aio_channel(self.launcher_address, self.credentials, channels.FAST_RECONNECT)
        rch = channels.aio_channel(self.reconciler_address, self.credentials, channels.FAST_RECONNECT)
        self._channels = [lch, rch]
        self.launcher = launcher_service_pb2_grpc.LauncherServiceStub(lch)
        self.reconciler = reconciler_service_pb2_grpc.ReconcilerServiceStub(rch)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for channel in self._channels:
            await channel.close()

    def now(self) -> float:
        return time.monotonic() - self.started

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- launching ------------------------------------------------------------------------------

    async def launch(
        self, batch: Sequence[TaskRecord], *, deadline_s: float, after_ok: Callable[[], None] | None = None
    ) -> None:
        """Send the batch until every item is acknowledged (or the deadline passes). `after_ok` runs
        the instant the first answer with an acknowledged item arrives, before anything else."""
        pending = list(batch)
        while pending and self.now() < deadline_s:
            request = launcher_service_pb2.BatchLaunchTasksRequest(
                requests=[
                    launcher_service_pb2.LaunchTaskRequest(
                        key=r.planned.key,
                        command=["python", "-m", "worker", r.kind.value],
                        pod_override_yaml=r.planned.override,
                    )
                    for r in pending
                ]
            )
            try:
                reply = await self.launcher.BatchLaunchTasks(request, timeout=10)
            except grpc.aio.AioRpcError as err:
                self.call_errors[f"BatchLaunchTasks {err.code().name}"] += 1
                if err.code() not in _TRANSIENT:
                    raise SchedulerError(f"BatchLaunchTasks: {err.code().name}: {err.details()}") from err
                for record in pending:
                    record.launch_errors.append(f"{self.now():.1f}s call {err.code().name}")
                await asyncio.sleep(_RETRY_S)
                continue
            if after_ok is not None and any(r.HasField("response") for r in reply.results):
                after_ok()
                after_ok = None
            retry = []
            for record, result in zip(pending, reply.results, strict=True):
                if result.HasField("response"):
                    if record.acked_at_s is None:
                        record.acked_at_s = self.now()
                        if record.kind is Kind.CANCEL_AT_LAUNCH:
                            self._spawn(self.cancel(record, "chaos: cancelled right after launch"))
                    continue
                code = grpc.StatusCode.UNKNOWN
                for candidate in grpc.StatusCode:
                    if candidate.value[0] == result.error.code:
                        code = candidate
                self.call_errors[f"BatchLaunchTasks item {code.name}"] += 1
                if code not in _TRANSIENT:
                    raise SchedulerError(f"{record.label}: {code.name}: {result.error.message}")
                record.launch_errors.append(f"{self.now():.1f}s item {code.name}")
                retry.append(record)
            pending = retry
            if pending:
                await asyncio.sleep(_RETRY_S)

    # ---- cancelling -----------------------------------------------------------------------------

    async def cancel(self, record: TaskRecord, reason: str, *, give_up_after_s: float = 300.0) -> None:
        record.cancel_requested = True
        deadline = self.now() + give_up_after_s
        request = reconciler_service_pb2.CancelTaskRequest(key=record.planned.key, reason=reason)
        while self.now() < deadline:
            try:
                await self.reconciler.CancelTask(request, timeout=10)
                record.cancel_answered = True
                return
            except grpc.aio.AioRpcError as err:
                self.call_errors[f"CancelTask {err.code().name}"] += 1
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    record.cancel_not_found += 1  # the reconciler has not heard of the launch yet
                elif err.code() not in _TRANSIENT:
                    raise SchedulerError(
                        f"CancelTask {record.label}: {err.code().name}: {err.details()}"
                    ) from err
            await asyncio.sleep(_RETRY_S)

    # ---- following ------------------------------------------------------------------------------

    async def follow(self) -> None:
        """Follow WatchTaskStates for ever, resuming after the last processed cursor."""
        while True:
            request = reconciler_service_pb2.WatchTaskStatesRequest(after_cursor=self._cursor)
            try:
                async for response in self.reconciler.WatchTaskStates(request):
                    for change in response.changes:
                        self._process(change)
            except grpc.aio.AioRpcError as err:
                self.call_errors[f"WatchTaskStates {err.code().name}"] += 1
                if err.code() == grpc.StatusCode.OUT_OF_RANGE:
                    # The reconciler's log no longer reaches our cursor: transitions were lost. Read
                    # it again from the start; what was already processed is recognised and skipped.
                    self.anomalies.out_of_range += 1
                    self._cursor = 0
                    self._rereading = True
            self.anomalies.reconnects += 1
            await asyncio.sleep(_RETRY_S)

    def _process(self, change: task_pb2.TaskStateChange) -> None:
        key = podmeta.key_string(change.task.key)
        identity = (change.cursor, key, int(change.task.state))
        if change.cursor <= self._high:
            if self._rereading and identity in self._seen:
                return  # asked for again, after OUT_OF_RANGE
            self.anomalies.redelivered.append(
                f"{change.task.key.task_id}: cursor {change.cursor} after {self._high}"
            )
        else:
            if self._high and change.cursor > self._high + 1 and not self._rereading:
                self.anomalies.gaps.append((self._high, change.cursor))
            self._rereading = False
            self._high = change.cursor
        self._seen.add(identity)
        self._cursor = change.cursor
        self._changed.set()
        record = self.records.get(key)
        if record is None:
            return
        task = change.task
        record.delivered.append(
            Delivered(
                cursor=change.cursor,
                state=task.state,
                previous=change.previous_state,
                reason=task.failure.reason,
                message=task.failure.message,
                exit_code=task.failure.container.exit_code,
                pod_name=task.pod_name,
                attempts=task.launch_attempts,
                at_s=self.now(),
            )
        )
        if (
            record.kind is Kind.CANCEL_RUNNING
            and task.state == task_pb2.TASK_STATE_RUNNING
            and not record.cancel_requested
        ):
            self._spawn(self.cancel(record, "chaos: cancelled while running"))

    # ---- reading the outcome ----------------------------------------------------------------------

    def unfinished(self) -> list[TaskRecord]:
        """Tasks not yet acknowledged, or acknowledged without a terminal transition delivered."""
        return [r for r in self.records.values() if r.acked_at_s is None or not r.terminal]

    async def wait_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `done()` holds, checking it whenever a change is delivered (and every second,
        for launches acknowledged meanwhile); False if the timeout passes first."""
        deadline = self.now() + timeout_s
        while not done():
            remaining = deadline - self.now()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
        return True

    async def wait_all_final(self, timeout_s: float) -> bool:
        return await self.wait_until(lambda: not self.unfinished(), timeout_s)

    async def list_tasks(self) -> dict[str, task_pb2.Task]:
        """Every task the reconciler has stored, as it has it now."""
        tasks: dict[str, task_pb2.Task] = {}
        token = ""
        while True:
            try:
                page = await self.reconciler.ListTasks(
                    reconciler_service_pb2.ListTasksRequest(page_size=1000, page_token=token), timeout=30
                )
            except grpc.aio.AioRpcError as err:
                if err.code() not in _TRANSIENT:
                    raise
                await asyncio.sleep(_RETRY_S)
                continue
            for task in page.tasks:
                tasks[podmeta.key_string(task.key)] = task
            token = page.next_page_token
            if not token:
                return tasks
