"""A scheduler-side test client: launch tasks, follow task states, wait for outcomes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.taskstates import TERMINAL
from shepherd.v1 import (
    launcher_service_pb2,
    launcher_service_pb2_grpc,
    reconciler_service_pb2,
    reconciler_service_pb2_grpc,
    task_pb2,
)


@dataclass
class SchedulerClient:
    launcher: launcher_service_pb2_grpc.LauncherServiceStub
    reconciler: reconciler_service_pb2_grpc.ReconcilerServiceStub
    changes: dict[str, list[task_pb2.TaskStateChange]] = field(default_factory=dict)
    reconnects: int = 0
    _updated: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, stack: ServiceStack) -> AsyncIterator[SchedulerClient]:
        async with (
            stack.scheduler_stubs() as (launcher, reconciler),
            cls.following(launcher, reconciler) as client,
        ):
            yield client

    @classmethod
    @contextlib.asynccontextmanager
    async def following(
        cls,
        launcher: launcher_service_pb2_grpc.LauncherServiceStub,
        reconciler: reconciler_service_pb2_grpc.ReconcilerServiceStub,
    ) -> AsyncIterator[SchedulerClient]:
        """A client of these stubs (of services run anywhere) that follows every task state."""
        client = cls(launcher, reconciler)
        follower = asyncio.create_task(client._follow())
        try:
            yield client
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)

    async def _follow(self) -> None:
        """Follow every transition; like a real scheduler, reconnect after the last cursor seen."""
        cursor = 0
        while True:
            try:
                request = reconciler_service_pb2.WatchTaskStatesRequest(after_cursor=cursor)
                async for response in self.reconciler.WatchTaskStates(request):
                    for change in response.changes:
                        cursor = change.cursor
                        self.changes.setdefault(podmeta.key_string(change.task.key), []).append(change)
                    self._updated.set()
            except grpc.aio.AioRpcError:
                self.reconnects += 1
                await asyncio.sleep(0.2)

    async def launch(
        self,
        key: task_pb2.TaskKey,
        *,
        annotations: dict[str, str] | None = None,
        override: str = "",
        command: list[str] | None = None,
        template: str = "",
    ) -> launcher_service_pb2.LaunchTaskResponse:
        if annotations and not override:
            pairs = ", ".join(f"{k}: '{v}'" for k, v in annotations.items())
            override = f"metadata: {{annotations: {{{pairs}}}}}"
        response: launcher_service_pb2.LaunchTaskResponse = await self.launcher.LaunchTask(
            launcher_service_pb2.LaunchTaskRequest(
                key=key,
                command=command or ["run-task"],
                pod_override_yaml=override,
                template_name=template,
            ),
            timeout=30,
        )
        return response

    def states(self, key: task_pb2.TaskKey) -> list[int]:
        return [c.task.state for c in self.changes.get(podmeta.key_string(key), [])]

    async def final(self, key: task_pb2.TaskKey, timeout: float = 60.0) -> task_pb2.Task:
        """The task once it reached a terminal state (fails the test if it does not in `timeout`)."""
        name = podmeta.key_string(key)

        async def reached() -> task_pb2.Task:
            while True:
                for change in self.changes.get(name, []):
                    if change.task.state in TERMINAL:
                        return change.task
                self._updated.clear()
                await self._updated.wait()

        try:
            return await asyncio.wait_for(reached(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"task {name!r} did not finish in {timeout}s; states: {self.states(key)}"
            ) from None

    async def reached(self, key: task_pb2.TaskKey, state: int, timeout: float = 60.0) -> None:
        name = podmeta.key_string(key)

        async def wait() -> None:
            while state not in self.states(key):
                self._updated.clear()
                await self._updated.wait()

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"task {name!r} never reached {task_pb2.TaskState.Name(state)}") from None  # type: ignore[arg-type]
