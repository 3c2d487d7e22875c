"""The reconciler's relaunch calls: a permanent refusal gives that one task up with the refusal as
its reason, a transient failure is retried, and neither holds up the relaunches queued after it."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc

from services.reconciler.launcher_calls import LauncherCalls
from shepherd.v1 import launcher_service_pb2, task_pb2
from tests.helpers import task_key


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class FakeLauncher:
    """Answers RelaunchTask from a script per task id: the codes to fail with, then success."""

    def __init__(self, script: dict[str, list[grpc.StatusCode]]) -> None:
        self.script = {name: list(codes) for name, codes in script.items()}
        self.calls: Counter[str] = Counter()
        self.relaunched: list[str] = []

    async def RelaunchTask(  # noqa: N802 - the stub's method name
        self, request: launcher_service_pb2.RelaunchTaskRequest, timeout: float, wait_for_ready: bool
    ) -> launcher_service_pb2.RelaunchTaskResponse:
        name = request.key.task_id
        self.calls[name] += 1
        codes = self.script.get(name, [])
        if codes:
            code = codes.pop(0) if codes[0] in _TRANSIENT else codes[0]  # a refusal stays a refusal
            raise rpc_error(code, f"scripted {code.name}")
        self.relaunched.append(name)
        launch = launcher_service_pb2.Launch(key=request.key, attempt=request.from_attempt + 1)
        return launcher_service_pb2.RelaunchTaskResponse(launch=launch, relaunched=True)


_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


async def test_a_permanent_refusal_gives_up_that_task_only_and_transient_ones_are_retried() -> None:
    denied = grpc.StatusCode.PERMISSION_DENIED
    unavailable = grpc.StatusCode.UNAVAILABLE
    fake = FakeLauncher(
        {
            "denied": [denied],
            "unauthenticated": [grpc.StatusCode.UNAUTHENTICATED],
            "flaky": [unavailable, grpc.StatusCode.DEADLINE_EXCEEDED, unavailable],
            "down": [unavailable] * 1000,  # keeps failing for the whole test
        }
    )
    refused: dict[str, str] = {}

    async def on_refused(key: task_pb2.TaskKey, why: str) -> None:
        refused[key.task_id] = why

    calls = LauncherCalls(stub=fake, on_refused=on_refused)  # type: ignore[arg-type]  # a fake stub
    runner = asyncio.create_task(calls.run())
    names = ["down", "denied", "unauthenticated", "flaky", "ok1", "ok2"]
    calls.relaunch([(task_key(task_id=name), 1) for name in names])

    async def settled() -> None:
        while not (
            set(refused) == {"denied", "unauthenticated"} and set(fake.relaunched) >= {"flaky", "ok1", "ok2"}
        ):
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(settled(), 30)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert "PERMISSION_DENIED" in refused["denied"]
    assert "scripted" in refused["denied"]
    assert "UNAUTHENTICATED" in refused["unauthenticated"]
    assert fake.calls["denied"] == 1  # a refusal is not asked again
    assert fake.calls["flaky"] == 4  # three transient failures, then the relaunch
    assert fake.calls["down"] >= 2
    assert "down" not in refused
    assert "down" not in fake.relaunched
