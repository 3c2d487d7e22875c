"""The calls the reconciler makes to the launcher: cancel a launch, relaunch a lost pod.

Relaunches are retried until the launcher answers, since it may be restarting; they are safe to
repeat (the launcher relaunches a given attempt at most once). If the reconciler itself dies
before its call lands, the task's lost pod is noticed again after the restart and asked again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from shepherd import podmeta
from shepherd.kube.client import sleep_backoff
from shepherd.logging import get_logger
from shepherd.v1 import launcher_service_pb2, launcher_service_pb2_grpc, task_pb2

_PERMANENT = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
}


@dataclass
class LauncherCalls:
    stub: launcher_service_pb2_grpc.LauncherServiceStub
    # Called when the launcher cannot relaunch (e.g. an adopted task it never launched).
    on_refused: Callable[[task_pb2.TaskKey, str], Awaitable[None]] | None = None
    _relaunches: asyncio.Queue[tuple[task_pb2.TaskKey, int]] = field(default_factory=asyncio.Queue)

    def relaunch(self, requests: list[tuple[task_pb2.TaskKey, int]]) -> None:
        for request in requests:
            self._relaunches.put_nowait(request)

    async def cancel(self, key: task_pb2.TaskKey) -> None:
        """Best effort: a pod created despite the cancel is deleted when the watcher reports it."""
        try:
            await self.stub.CancelLaunch(launcher_service_pb2.CancelLaunchRequest(key=key), timeout=5)
        except grpc.aio.AioRpcError as err:
            get_logger(component="launcher-calls").warning(
                "launcher did not take the cancel", code=err.code().name
            )

    async def run(self) -> None:
        while True:
            key, attempt = await self._relaunches.get()
            log = get_logger(component="launcher-calls", task_key=podmeta.log_key(key))
            failures = 0
            while True:
                try:
                    reply = await self.stub.RelaunchTask(
                        launcher_service_pb2.RelaunchTaskRequest(key=key, from_attempt=attempt), timeout=10
                    )
                    log.info("relaunch requested", attempt=reply.launch.attempt, new=reply.relaunched)
                    break
                except grpc.aio.AioRpcError as err:
                    if err.code() in _PERMANENT:
                        log.warning("relaunch refused", code=err.code().name, details=err.details())
                        if self.on_refused is not None:
                            await self.on_refused(key, err.details() or err.code().name)
                        break
                    failures += 1
                    await sleep_backoff(failures, cap_s=10.0)
