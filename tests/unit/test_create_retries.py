"""An accepted launch survives any API outage: a transient create error is retried by time, not by
count, until the task's queued deadline, and only then does the launch fail, saying why. Retries
are spaced by a backoff that is never a few milliseconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aiohttp
import pytest

from services.launcher.creator import PodCreator
from shepherd.kube.client import sleep_backoff
from shepherd.v1 import launcher_service_pb2 as pb
from tests.helpers import task_key

_real_sleep = asyncio.sleep


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every asyncio.sleep's delay, recorded instead of waited (so backoffs cost no test time)."""
    delays: list[float] = []

    async def record(delay: float, result: Any = None) -> Any:
        delays.append(delay)
        return await _real_sleep(0, result)

    monkeypatch.setattr(asyncio, "sleep", record)
    return delays


class _FlakyKube:
    """Refuses connections `failures` times (forever if None), then creates."""

    def __init__(self, failures: int | None) -> None:
        self.failures = failures
        self.calls = 0

    async def create_pod(self, namespace: str, pod: dict[str, Any]) -> None:
        self.calls += 1
        if self.failures is None or self.calls <= self.failures:
            raise aiohttp.ClientConnectionError("connection refused")


class _RecordingStore:
    def __init__(self) -> None:
        self.outcomes: list[pb.Launch] = []

    def update_soon(self, launch: pb.Launch, **_: Any) -> asyncio.Future[bool]:
        self.outcomes.append(launch)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        future.set_result(True)
        return future


def _launch(accepted_ago_s: float = 0.0) -> tuple[pb.Launch, dict[str, Any]]:
    launch = pb.Launch(key=task_key(task_id="t"), namespace="default", pod_name="t-1", attempt=1)
    launch.accept_time.FromNanoseconds(int((time.time() - accepted_ago_s) * 1e9))
    return launch, {"metadata": {"name": launch.pod_name}}


async def _settle(creator: PodCreator, store: _RecordingStore) -> pb.Launch:
    runner = asyncio.create_task(creator.run())
    try:
        while not store.outcomes:
            await _real_sleep(0.001)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    return store.outcomes[-1]


async def test_a_create_refused_for_longer_than_any_retry_count_still_gets_its_pod(
    slept: list[float],
) -> None:
    kube, store = _FlakyKube(failures=40), _RecordingStore()
    creator = PodCreator(kube=cast(Any, kube), store=cast(Any, store), concurrency=1)
    creator.submit(*_launch())
    outcome = await _settle(creator, store)
    assert pb.LaunchState.Name(outcome.state) == "LAUNCH_STATE_CREATED"
    assert kube.calls == 41


async def test_past_its_queued_deadline_a_launch_fails_saying_so(slept: list[float]) -> None:
    kube, store = _FlakyKube(failures=None), _RecordingStore()
    creator = PodCreator(kube=cast(Any, kube), store=cast(Any, store), concurrency=1)
    creator.submit(*_launch(accepted_ago_s=3600))  # queued for an hour: far past the 600 s default
    outcome = await _settle(creator, store)
    assert pb.LaunchState.Name(outcome.state) == "LAUNCH_STATE_FAILED"
    assert outcome.failure.reason == "QueuedTimeout"
    assert "600" in outcome.failure.message
    assert kube.calls >= 1  # it was tried before it was given up


@pytest.mark.parametrize("attempt", range(1, 12))
async def test_retries_are_never_a_few_milliseconds_apart(slept: list[float], attempt: int) -> None:
    sleep: Callable[[], Awaitable[None]] = lambda: sleep_backoff(attempt, cap_s=30.0)  # noqa: E731
    for _ in range(200):
        await sleep()
    assert min(slept) >= 0.1
    assert max(slept) <= 30.0
