"""The executor's gRPC side: one channel to the launcher, one to the reconciler, and the state feed.

Blocking grpcio (not asyncio): Airflow's scheduler loop is synchronous, and the one long call,
WatchTaskStates, runs in a daemon thread of its own (`StateFeed`) that hands each transition to
the scheduler thread through a queue, so a slow or broken stream never holds up a heartbeat.
The feed resumes after the cursor of the last transition it queued; when the reconciler no longer
has that cursor (OUT_OF_RANGE: a new store, or a log that moved on), it starts again from the
oldest retained transition and reads each tracked task once with GetTask, so no state is missed.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import grpc

from shepherd_airflow.config import Settings
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


class StateFeed(threading.Thread):
    """Follows WatchTaskStates in the background and queues every task it reports.

    `tracked` returns the keys the executor currently follows (called from this thread; it must
    return a copy), so a re-sync after OUT_OF_RANGE can read exactly those tasks.
    """

    def __init__(self, client: ShepherdClient, tracked: Callable[[], Iterable[task_pb2.TaskKey]]) -> None:
        super().__init__(name="shepherd-state-feed", daemon=True)
        self._client = client
        self._tracked = tracked
        self._stop_event = threading.Event()
        self._call: grpc.Future | None = None
        self._lock = threading.Lock()
        self.tasks: queue.SimpleQueue[task_pb2.Task] = queue.SimpleQueue()
        self.cursor = 0
        self.reconnects = 0
        self.resyncs = 0

    def drain(self) -> list[task_pb2.Task]:
        """Everything queued so far, oldest first, without waiting."""
        out: list[task_pb2.Task] = []
        while True:
            try:
                out.append(self.tasks.get_nowait())
            except queue.Empty:
                return out

    def run(self) -> None:
        backoff = self._client.settings.reconnect_initial_s
        while not self._stop_event.is_set():
            try:
                request = reconciler_service_pb2.WatchTaskStatesRequest(after_cursor=self.cursor)
                stream = self._client.reconciler.WatchTaskStates(request)
                with self._lock:
                    self._call = stream
                if self._stop_event.is_set():
                    stream.cancel()
                for response in stream:
                    for change in response.changes:
                        self.tasks.put(change.task)
                        self.cursor = change.cursor
                    backoff = self._client.settings.reconnect_initial_s
            except grpc.RpcError as err:
                if self._stop_event.is_set():
                    return
                if err.code() == grpc.StatusCode.OUT_OF_RANGE:
                    self._resync(str(err.details()))
                    continue
                log.warning(
                    "shepherd: state stream broke (%s: %s); resuming after cursor %d in %.1fs",
                    err.code().name,
                    err.details(),
                    self.cursor,
                    backoff,
                )
            else:
                if self._stop_event.is_set():
                    return
                log.warning("shepherd: state stream ended; resuming after cursor %d", self.cursor)
            self.reconnects += 1
            self._stop_event.wait(backoff)
            backoff = min(backoff * 2, self._client.settings.reconnect_max_s)

    def _resync(self, why: str) -> None:
        """The cursor is gone: start over from the oldest retained transition, and read every
        tracked task once, since transitions between the two may no longer be in the log."""
        log.warning(
            "shepherd: state stream cursor %d refused (%s); re-reading tracked tasks", self.cursor, why
        )
        self.resyncs += 1
        self.cursor = 0
        for key in self._tracked():
            if self._stop_event.is_set():
                return
            try:
                task = self._client.get(key)
            except grpc.RpcError as err:
                log.warning("shepherd: could not re-read %s: %s", key, err.details())
                continue
            if task is not None:
                self.tasks.put(task)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_event.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
        if self.is_alive():
            self.join(timeout)
