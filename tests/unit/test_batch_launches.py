"""A batch of launches is accepted in one go: each item gets its own answer, a key named twice gets
one launch, a queue with less room than the batch refuses only what does not fit, and a call cancelled
while its launches are stored does not strand them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from services.launcher.server import LauncherServicer
from services.launcher.settings import LauncherSettings
from services.launcher.store import LaunchStore
from services.launcher.templates import TemplateCatalog
from shepherd.v1 import launcher_service_pb2 as pb
from tests.helpers import task_key

OVERRIDE = "metadata: {annotations: {sim.shepherd.dev/outcome: run-forever}}"


class _QueueingCreator:
    """Stands in for the pod creator: records what it is handed and reports a backlog."""

    def __init__(self, backlog: int = 0) -> None:
        self.backlog = backlog
        self.submitted: list[str] = []

    def submit(self, launch: pb.Launch, pod: dict[str, Any]) -> None:
        self.submitted.append(launch.pod_name)
        self.backlog += 1


class _Launcher:
    def __init__(self, store: LaunchStore, creator: _QueueingCreator, queue_limit: int) -> None:
        settings = LauncherSettings.load(["--queue-limit", str(queue_limit)])
        templates = TemplateCatalog(settings.templates_dir, settings.default_template)
        self.servicer = LauncherServicer(settings, store, cast(Any, creator), templates)
        self.store = store
        self.creator = creator

    async def batch(self, *requests: pb.LaunchTaskRequest) -> list[pb.BatchLaunchResult]:
        reply = await self.servicer.BatchLaunchTasks(
            pb.BatchLaunchTasksRequest(requests=requests), cast(Any, None)
        )
        return list(reply.results)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LaunchStore]:
    store = LaunchStore(tmp_path / "launcher.db", synchronous="OFF")
    yield store
    await store.close()


def _request(task_id: str, **fields: Any) -> pb.LaunchTaskRequest:
    return pb.LaunchTaskRequest(
        **{"key": task_key(task_id=task_id), "command": ["run"], "pod_override_yaml": OVERRIDE, **fields}
    )


async def test_each_item_of_a_batch_gets_its_own_answer_in_order(store: LaunchStore) -> None:
    launcher = _Launcher(store, _QueueingCreator(), queue_limit=100)
    results = await launcher.batch(
        _request("a"), _request("b", template_name="missing"), _request("c", command=[])
    )
    assert results[0].response.launch.state == pb.LAUNCH_STATE_ACCEPTED
    assert (results[1].error.code, results[1].error.field) == (
        grpc.StatusCode.NOT_FOUND.value[0],
        "requests[1].template_name",
    )
    assert (results[2].error.code, results[2].error.field) == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        "requests[2].command",
    )
    assert launcher.creator.submitted == [results[0].response.launch.pod_name]


async def test_a_key_named_twice_in_one_batch_is_launched_once(store: LaunchStore) -> None:
    launcher = _Launcher(store, _QueueingCreator(), queue_limit=100)
    first, second = await launcher.batch(_request("twice"), _request("twice"))
    assert not first.response.already_existed
    assert second.response.already_existed
    assert second.response.launch.pod_name == first.response.launch.pod_name
    assert len(launcher.creator.submitted) == 1


async def test_a_retried_batch_returns_the_stored_launches_and_creates_nothing_more(
    store: LaunchStore,
) -> None:
    launcher = _Launcher(store, _QueueingCreator(), queue_limit=100)
    first = await launcher.batch(_request("x"), _request("y"))
    again = await launcher.batch(_request("x"), _request("y"))
    assert [r.response.already_existed for r in again] == [True, True]
    assert [r.response.launch for r in again] == [r.response.launch for r in first]
    assert len(launcher.creator.submitted) == 2


async def test_a_batch_bigger_than_the_room_left_in_the_queue_is_refused_only_beyond_it(
    store: LaunchStore,
) -> None:
    launcher = _Launcher(store, _QueueingCreator(backlog=8), queue_limit=10)
    results = await launcher.batch(*(_request(f"t{i}") for i in range(4)))
    assert [r.HasField("response") for r in results] == [True, True, False, False]
    assert {r.error.code for r in results[2:]} == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    assert store.get(task_key(task_id="t2")) is None  # refused means not stored: a retry launches it
    assert len(launcher.creator.submitted) == 2


async def test_launches_stored_by_a_call_cancelled_midway_still_reach_the_creator(
    store: LaunchStore,
) -> None:
    launcher = _Launcher(store, _QueueingCreator(), queue_limit=100)
    call = asyncio.create_task(launcher.batch(_request("deadline")))
    await asyncio.sleep(0)  # the call is now waiting for its launches to be stored
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(100):
        if launcher.creator.submitted:
            break
        await asyncio.sleep(0.01)
    assert len(launcher.creator.submitted) == 1
    (retry,) = await launcher.batch(_request("deadline"))
    assert retry.response.already_existed
    assert len(launcher.creator.submitted) == 1
