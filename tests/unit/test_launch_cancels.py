"""The pod creator skips queued creates that a cancel or a relaunch made obsolete, and its
bookkeeping holds only keys still queued or in flight: a long-running launcher that sees millions
of launches and cancels must not keep them all."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from services.launcher.creator import PodCreator
from shepherd.v1 import launcher_service_pb2
from tests.helpers import task_key


class _RecordingKube:
    """Records the pods it is asked to create; the creator needs nothing else from the API here."""

    def __init__(self) -> None:
        self.created: list[str] = []

    async def create_pod(self, namespace: str, pod: dict[str, Any]) -> None:
        self.created.append(pod["metadata"]["name"])


class _NullStore:
    def update_soon(self, launch: Any, **_: Any) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        future.set_result(True)
        return future


def _launch(task_id: str, attempt: int = 1) -> tuple[launcher_service_pb2.Launch, dict[str, Any]]:
    launch = launcher_service_pb2.Launch(
        key=task_key(task_id=task_id), namespace="default", pod_name=f"{task_id}-{attempt}", attempt=attempt
    )
    return launch, {"metadata": {"name": launch.pod_name}}


async def _drain(pods: PodCreator) -> None:
    """Run the workers until every queued create is settled."""
    runner = asyncio.create_task(pods.run())
    while pods.backlog:
        await asyncio.sleep(0.01)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


def _creator() -> tuple[PodCreator, _RecordingKube]:
    kube = _RecordingKube()
    return PodCreator(kube=cast(Any, kube), store=cast(Any, _NullStore()), concurrency=2), kube


async def test_a_create_cancelled_while_queued_never_reaches_the_api() -> None:
    pods, kube = _creator()
    pods.submit(*_launch("a"))
    pods.submit(*_launch("b"))
    assert pods.cancel(task_key(task_id="a")) is False  # queued, not in flight
    await _drain(pods)
    assert kube.created == ["b-1"]


async def test_a_relaunch_supersedes_the_earlier_attempt_still_queued() -> None:
    pods, kube = _creator()
    pods.submit(*_launch("a", attempt=1))
    pods.submit(*_launch("a", attempt=2))
    await _drain(pods)
    assert kube.created == ["a-2"]


async def test_the_bookkeeping_forgets_keys_once_their_creates_are_settled() -> None:
    pods, _ = _creator()
    for name in ("a", "b", "c"):
        pods.submit(*_launch(name))
    pods.cancel(task_key(task_id="b"))
    pods.cancel(task_key(task_id="never-launched"))
    await _drain(pods)
    assert pods._wanted == {}
