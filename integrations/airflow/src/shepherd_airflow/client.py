"""The executor's gRPC side: one channel to the launcher, one to the reconciler, and the state feed.

Blocking grpcio (not asyncio): Airflow's scheduler loop is synchronous, and the one long call,
WatchTaskStates, runs in a daemon thread of its own (`StateFeed`) that hands each transition to
the scheduler thread through a bounded queue, so a slow or broken stream never holds up a heartbeat
and a busy one never fills the scheduler's memory.

The feed never replays the log (the reconciler keeps days of it): it starts at the head, "from
now", and once subscribed reads each task the executor tracks with GetTask, so nothing that
happened before is missed either. It resumes after the cursor of the last transition it queued;
when the reconciler no longer has that cursor (OUT_OF_RANGE: a new store, or a log that moved on)
it starts from the head again the same way. A re-read state may be newer than transitions the
stream has still to send; those are dropped (translate.ReadFloors), so no task moves backwards.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import grpc

from shepherd_airflow.config import Settings
from shepherd_airflow.translate import ReadFloors, key_text
from shepherd_airflow.v1 import (
    launcher_service_pb2,
    launcher_service_pb2_grpc,
    reconciler_service_pb2,
    reconciler_service_pb2_grpc,
    task_pb2,
)

log = logging.getLogger(__name__)

_OPTIONS: list[tuple[str, int | str]] = [
    # Notice a vanished peer within a minute, and keep idle load balancers from cutting the stream.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]


def open_channel(address: str, settings: Settings) -> grpc.Channel:
    options = list(_OPTIONS)
    if settings.insecure:
        return grpc.insecure_channel(address, options=options)
    if settings.tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(settings.tls_ca).expanduser().read_bytes(),
        private_key=Path(settings.tls_key).expanduser().read_bytes(),
        certificate_chain=Path(settings.tls_cert).expanduser().read_bytes(),
    )
    return grpc.secure_channel(address, credentials, options=options)


# Tasks the feed holds for the scheduler thread at most. When the queue is full the feed stops
# reading the stream (gRPC flow control then holds the reconciler back) until a heartbeat drains it.
MAX_QUEUED = 10_000
# GetTask calls a re-read of the tracked tasks keeps in flight at once.
REREAD_BATCH = 50
# How often a feed waiting for room in a full queue looks whether it was stopped, seconds.
_FULL_POLL_S = 0.5
# A re-read that meets one of these is abandoned and done again whole after a backoff (the
# reconciler is away or shedding load); any other refusal skips the one task, logged.
_REREAD_AGAIN = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


class ShepherdClient:
    """The unary calls the executor makes, each bounded by `rpc_timeout_s`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._launcher_channel = open_channel(settings.launcher_address, settings)
        self._reconciler_channel = open_channel(settings.reconciler_address, settings)
        self.launcher = launcher_service_pb2_grpc.LauncherServiceStub(self._launcher_channel)
        self.reconciler = reconciler_service_pb2_grpc.ReconcilerServiceStub(self._reconciler_channel)

    def launch(
        self, requests: Sequence[launcher_service_pb2.LaunchTaskRequest]
    ) -> list[launcher_service_pb2.BatchLaunchResult]:
        reply = self.launcher.BatchLaunchTasks(
            launcher_service_pb2.BatchLaunchTasksRequest(requests=requests),
            timeout=self.settings.rpc_timeout_s,
        )
        return list(reply.results)

    def get(self, key: task_pb2.TaskKey) -> task_pb2.Task | None:
        """The task, or None when Shepherd has never heard of it."""
        try:
            reply: reconciler_service_pb2.GetTaskResponse = self.reconciler.GetTask(
                reconciler_service_pb2.GetTaskRequest(key=key), timeout=self.settings.rpc_timeout_s
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return reply.task

    def cancel(self, key: task_pb2.TaskKey, reason: str) -> task_pb2.Task | None:
        """Revoke the task; None when Shepherd never had it (nothing to cancel)."""
        try:
            reply: reconciler_service_pb2.CancelTaskResponse = self.reconciler.CancelTask(
                reconciler_service_pb2.CancelTaskRequest(key=key, reason=reason[:1024]),
                timeout=self.settings.rpc_timeout_s,
            )
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return reply.task

    def log_tail(self, key: task_pb2.TaskKey) -> str:
        request = reconciler_service_pb2.GetTaskLogsRequest(key=key, tail_lines=self.settings.log_tail_lines)
        chunks = self.reconciler.GetTaskLogs(request, timeout=self.settings.rpc_timeout_s)
        return b"".join(chunk.data for chunk in chunks).decode("utf-8", errors="replace")

    def close(self) -> None:
        self._launcher_channel.close()
        self._reconciler_channel.close()


class _Stopped(Exception):
    """stop() was called while the feed waited for the scheduler to make room in the queue."""


class StateFeed(threading.Thread):
    """Follows WatchTaskStates in the background and queues every task it reports.

    `tracked` returns the keys the executor currently follows (called from this thread; it must
    return a copy): the tasks read once with GetTask whenever the feed (re)starts from the head.
    The thread ends only through `stop()`: every error is logged and followed by a reconnect
    after a backoff. The queue holds at most `max_queued` tasks; when it is full the feed waits
    (and stops reading the stream) until the scheduler drains it, which never waits.
    """

    def __init__(
        self,
        client: ShepherdClient,
        tracked: Callable[[], Iterable[task_pb2.TaskKey]],
        *,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        super().__init__(name="shepherd-state-feed", daemon=True)
        self._client = client
        self._tracked = tracked
        self._stop_event = threading.Event()
        self._call: grpc.Future | None = None
        self._lock = threading.Lock()
        self._floors = ReadFloors()
        self._backoff = client.settings.reconnect_initial_s
        self.tasks: queue.Queue[task_pb2.Task] = queue.Queue(maxsize=max_queued)
        # The last transition queued; 0 until the first, meaning "follow from the head".
        self.cursor = 0
        self.reconnects = 0
        self.resyncs = 0
        self.errors = 0  # unexpected exceptions survived
        self.received = 0  # transitions read off the stream
        self.reread = 0  # tasks read with GetTask

    def drain(self) -> list[task_pb2.Task]:
        """What is queued, oldest first, without waiting: at most what was there when called, so
        a busy stream never keeps the scheduler thread here."""
        out: list[task_pb2.Task] = []
        for _ in range(self.tasks.qsize()):
            try:
                out.append(self.tasks.get_nowait())
            except queue.Empty:
                break
        return out

    def run(self) -> None:
        settings = self._client.settings
        while not self._stop_event.is_set():
            try:
                self._follow()
            except _Stopped:
                return
            except grpc.RpcError as err:
                if self._stop_event.is_set():
                    return
                if err.code() == grpc.StatusCode.OUT_OF_RANGE and self.cursor:
                    log.warning(
                        "shepherd: state stream cursor %d refused (%s); following from the head "
                        "and re-reading the tracked tasks",
                        self.cursor,
                        err.details(),
                    )
                    self.resyncs += 1
                    self.cursor = 0
                    continue
                log.warning(
                    "shepherd: state stream broke (%s: %s); %s in %.1fs",
                    err.code().name,
                    err.details(),
                    self._resuming(),
                    self._backoff,
                )
            except Exception:
                # A bug here must not end the thread: nothing would report a state again.
                if self._stop_event.is_set():
                    return
                self.errors += 1
                log.exception("shepherd: state feed failed; %s in %.1fs", self._resuming(), self._backoff)
            else:
                if self._stop_event.is_set():
                    return
                log.warning("shepherd: state stream ended; %s in %.1fs", self._resuming(), self._backoff)
            self.reconnects += 1
            self._stop_event.wait(self._backoff)
            self._backoff = min(self._backoff * 2, settings.reconnect_max_s)

    def _resuming(self) -> str:
        if self.cursor:
            return f"resuming after cursor {self.cursor}"
        return "following from the head again (re-reading the tracked tasks)"

    def _follow(self) -> None:
        """One stream: from the head (then the tracked tasks are read once) or after `cursor`."""
        at_head = not self.cursor
        if at_head:
            request = reconciler_service_pb2.WatchTaskStatesRequest(start_at_head=True)
        else:
            request = reconciler_service_pb2.WatchTaskStatesRequest(after_cursor=self.cursor)
        stream = self._client.reconciler.WatchTaskStates(request)
        with self._lock:
            self._call = stream
        if self._stop_event.is_set():
            stream.cancel()
        if at_head:
            # The headers come once the reconciler has fixed where the stream starts; every
            # transition after that is streamed, so the tracked tasks read from now on miss none.
            stream.initial_metadata()
            if not stream.done():  # else refused: the loop below raises its error
                self._reread()
        for response in stream:
            for change in response.changes:
                self.received += 1
                if self._floors.is_news(change.task):
                    self._put(change.task)
                self.cursor = change.cursor
            self._backoff = self._client.settings.reconnect_initial_s

    def _reread(self) -> None:
        """Every tracked task once, with GetTask, REREAD_BATCH calls in flight at a time."""
        self._floors.clear()
        keys = list(self._tracked())
        timeout = self._client.settings.rpc_timeout_s
        for start in range(0, len(keys), REREAD_BATCH):
            if self._stop_event.is_set():
                raise _Stopped
            batch = keys[start : start + REREAD_BATCH]
            calls = [
                self._client.reconciler.GetTask.future(
                    reconciler_service_pb2.GetTaskRequest(key=key), timeout=timeout
                )
                for key in batch
            ]
            try:
                for key, call in zip(batch, calls, strict=True):
                    task = self._read(key, call)
                    if task is not None:
                        self._floors.read(task)
                        self._put(task)
                        self.reread += 1
            finally:
                for call in calls:
                    call.cancel()

    @staticmethod
    def _read(key: task_pb2.TaskKey, call: grpc.Future) -> task_pb2.Task | None:
        try:
            reply: reconciler_service_pb2.GetTaskResponse = call.result()
        except grpc.RpcError as err:
            if err.code() in _REREAD_AGAIN:
                raise  # the reconciler is away: the whole re-read is done again after a backoff
            if err.code() != grpc.StatusCode.NOT_FOUND:
                log.warning("shepherd: could not re-read %s: %s", key_text(key), err.details())
            return None
        return reply.task

    def _put(self, task: task_pb2.Task) -> None:
        """Queue the task, waiting while the queue is full (the scheduler thread drains it)."""
        while True:
            try:
                self.tasks.put(task, timeout=_FULL_POLL_S)
                return
            except queue.Full:
                if self._stop_event.is_set():
                    raise _Stopped from None

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_event.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
        if self.is_alive():
            self.join(timeout)
