"""The calls the reconciler makes to the launcher: look up a launch, cancel it, relaunch a lost pod.

Relaunches are safe to repeat (the launcher relaunches a given attempt at most once), so a
transient failure (the launcher restarting, a deadline) is retried with capped backoff until it
answers. Each relaunch retries on its own: one that keeps failing never holds up the others. A
permanent refusal (PERMISSION_DENIED from a mesh policy, NOT_FOUND, FAILED_PRECONDITION...) will
not change by asking again, so that one task is given up with the refusal as its reason. If the
reconciler itself dies before its call lands, the task's lost pod is noticed again after the
restart and asked again.

The mesh policy test (tests/unit/test_mesh_policy.py) finds every launcher stub call in this
code and checks that deploy/mesh/istio allows exactly those to the reconciler's identity.
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

# Codes that say "not now" rather than "no": asking again later can succeed.
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
MAX_CONCURRENT_RELAUNCHES = 32
RELAUNCH_BACKOFF_CAP_S = 10.0


class LauncherUnavailable(RuntimeError):
    """The launcher could not be asked (down, or refusing us): whether it knows a key is unknown."""


@dataclass
class LauncherCalls:
    stub: launcher_service_pb2_grpc.LauncherServiceStub
    # Called when the launcher cannot relaunch (e.g. an adopted task it never launched).
    on_refused: Callable[[task_pb2.TaskKey, str], Awaitable[None]] | None = None
    _relaunches: asyncio.Queue[tuple[task_pb2.TaskKey, int]] = field(default_factory=asyncio.Queue)
    _slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT_RELAUNCHES))
    retrying: int = 0  # relaunches waiting to be asked again after a transient failure

    def relaunch(self, requests: list[tuple[task_pb2.TaskKey, int]]) -> None:
        for request in requests:
            self._relaunches.put_nowait(request)

    async def get_launch(self, key: task_pb2.TaskKey) -> launcher_service_pb2.GetLaunchResponse | None:
        """The launcher's record of `key` (with the cursor of its last event), or None if it has
        none (never launched, or forgotten)."""
        try:
            # wait_for_ready: a channel between reconnect attempts waits for the launcher (up to the
            # timeout) instead of failing at once, which would say nothing about the key.
            reply = await self.stub.GetLaunch(
                launcher_service_pb2.GetLaunchRequest(key=key), timeout=5, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise LauncherUnavailable(
                f"could not ask the launcher about this key ({err.code().name}: {err.details()})"
            ) from err
        found: launcher_service_pb2.GetLaunchResponse = reply
        return found

    async def cancel(self, key: task_pb2.TaskKey) -> None:
        """Best effort: a pod created despite the cancel is deleted when the watcher reports it."""
        try:
            await self.stub.CancelLaunch(
                launcher_service_pb2.CancelLaunchRequest(key=key), timeout=5, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as err:
            get_logger(component="launcher-calls").warning(
                "launcher did not take the cancel", code=err.code().name, details=err.details()
            )

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            while True:
                key, attempt = await self._relaunches.get()
                group.create_task(self._relaunch(key, attempt))

    async def _relaunch(self, key: task_pb2.TaskKey, attempt: int) -> None:
        log = get_logger(component="launcher-calls", task_key=podmeta.log_key(key), lost_attempt=attempt)
        failures = 0
        request = launcher_service_pb2.RelaunchTaskRequest(key=key, from_attempt=attempt)
        while True:
            try:
                async with self._slots:
                    reply = await self.stub.RelaunchTask(request, timeout=10, wait_for_ready=True)
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code not in TRANSIENT:
                    why = f"the launcher refused the relaunch ({code.name}: {err.details()})"
                    log.warning("relaunch refused; giving the task up", code=code.name, details=err.details())
                    if self.on_refused is not None:
                        await self.on_refused(key, why)
                    return
                failures += 1
                log.warning(
                    "relaunch failed; retrying", code=code.name, details=err.details(), failures=failures
                )
                self.retrying += 1
                try:
                    await sleep_backoff(failures, cap_s=RELAUNCH_BACKOFF_CAP_S)
                finally:
                    self.retrying -= 1
                continue
            except Exception as err:  # one relaunch must not take the others down with it
                log.exception("relaunch failed unexpectedly; the task is given up", error=str(err))
                if self.on_refused is not None:
                    await self.on_refused(key, f"the relaunch failed: {err}")
                return
            log.info("relaunch requested", attempt=reply.launch.attempt, new=reply.relaunched)
            return
