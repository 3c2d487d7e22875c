"""A launch replayed after a restart is created only if its task never had a pod and still wants
one: its pod is looked up first, then the reconciler is asked; while the reconciler cannot answer,
the replayed launch waits and new launches go ahead."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from services.launcher.creator import PodCreator
from services.launcher.reconciler_client import ReconcilerUnavailable
from services.launcher.replay import Replay, decide
from shepherd.kube.errors import ApiError
from shepherd.v1 import launcher_service_pb2 as pb
from shepherd.v1 import task_pb2
from tests.helpers import task_key

T = task_pb2


def _task(state: int, *, attempts: int = 1, pod_uid: str = "") -> task_pb2.Task:
    return T.Task(key=task_key(), state=state, launch_attempts=attempts, pod_uid=pod_uid)  # type: ignore[arg-type]


def _launch(task_id: str = "t", attempt: int = 1) -> tuple[pb.Launch, dict[str, Any]]:
    launch = pb.Launch(
        key=task_key(task_id=task_id), namespace="ns", pod_name=f"{task_id}-{attempt}", attempt=attempt
    )
    launch.accept_time.GetCurrentTime()
    return launch, {"metadata": {"name": launch.pod_name}}


@pytest.mark.parametrize(
    ("task", "verdict"),
    [
        (None, Replay.CREATE),  # the reconciler never heard of it
        (_task(T.TASK_STATE_QUEUED), Replay.CREATE),  # queued, no pod seen
        (_task(T.TASK_STATE_QUEUED, pod_uid="u1"), Replay.CREATED),  # its pod was seen (Pending)
        (_task(T.TASK_STATE_RUNNING, pod_uid="u1"), Replay.CREATED),
        (_task(T.TASK_STATE_SUCCEEDED, pod_uid="u1"), Replay.CREATED),  # ran, finished, deleted
        (_task(T.TASK_STATE_FAILED, pod_uid="u1"), Replay.CREATED),
        (_task(T.TASK_STATE_REVOKED), Replay.CANCELLED),  # cancelled while the launcher was down
        (_task(T.TASK_STATE_REVOKED, pod_uid="u1"), Replay.CANCELLED),
        (_task(T.TASK_STATE_QUEUED, attempts=2), Replay.CREATED),  # a later attempt's pod was seen
    ],
)
def test_what_the_reconciler_says_decides_a_replayed_launch(
    task: task_pb2.Task | None, verdict: Replay
) -> None:
    launch, _ = _launch()
    assert decide(launch, task) is verdict


def test_a_pod_seen_for_an_earlier_attempt_does_not_count_for_a_relaunch() -> None:
    launch, _ = _launch(attempt=2)
    assert decide(launch, _task(T.TASK_STATE_QUEUED, attempts=1, pod_uid="old")) is Replay.CREATE


class _Kube:
    def __init__(self, existing: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.existing = set(existing)
        self.created: list[str] = []
        self.looked_up: list[str] = []

    async def pod_exists(self, namespace: str, name: str) -> bool:
        self.looked_up.append(name)
        return name in self.existing

    async def create_pod(self, namespace: str, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        if name in self.existing:
            raise ApiError(409, "AlreadyExists", f"pods {name!r} already exists")
        self.existing.add(name)
        self.created.append(name)


class _Reconciler:
    def __init__(self, tasks: dict[str, task_pb2.Task], *, down_for: int = 0) -> None:
        self.tasks = tasks
        self.down_for = down_for
        self.asked = 0

    async def get_task(self, key: task_pb2.TaskKey) -> task_pb2.Task | None:
        self.asked += 1
        if self.asked <= self.down_for:
            raise ReconcilerUnavailable("UNAVAILABLE")
        return self.tasks.get(key.task_id)


class _Store:
    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}

    def update_soon(self, launch: pb.Launch, **_: Any) -> asyncio.Future[bool]:
        self.outcomes[launch.key.task_id] = launch.state
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        future.set_result(True)
        return future


async def _run_until(creator: PodCreator, done: Any) -> None:
    runner = asyncio.create_task(creator.run())
    try:
        await asyncio.wait_for(_poll(done), 10)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def _poll(done: Any) -> None:
    while not done():
        await asyncio.sleep(0.001)


def _creator(kube: _Kube, reconciler: _Reconciler, store: _Store) -> PodCreator:
    return PodCreator(
        kube=cast(Any, kube),
        store=cast(Any, store),
        reconciler=reconciler,
        concurrency=2,
        replay_concurrency=1,
    )


async def test_replayed_launches_are_created_only_if_they_never_had_a_pod() -> None:
    kube = _Kube(existing={"exists-1"})
    reconciler = _Reconciler(
        {
            "finished": _task(T.TASK_STATE_SUCCEEDED, pod_uid="u1"),
            "revoked": _task(T.TASK_STATE_REVOKED),
            "queued": _task(T.TASK_STATE_QUEUED),
        }
    )
    store = _Store()
    creator = _creator(kube, reconciler, store)
    for task_id in ("exists", "finished", "revoked", "queued", "unknown"):
        creator.submit(*_launch(task_id), replayed=True)
    await _run_until(creator, lambda: len(store.outcomes) == 5)
    assert kube.created == ["queued-1", "unknown-1"]
    assert {k: pb.LaunchState.Name(v) for k, v in store.outcomes.items()} == {  # type: ignore[arg-type]
        "exists": "LAUNCH_STATE_CREATED",
        "finished": "LAUNCH_STATE_CREATED",
        "revoked": "LAUNCH_STATE_CANCELLED",
        "queued": "LAUNCH_STATE_CREATED",
        "unknown": "LAUNCH_STATE_CREATED",
    }
    assert creator.backlog == 0
    assert creator._wanted == {}


async def test_a_replayed_launch_waits_for_the_reconciler_and_new_launches_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_sleep = asyncio.sleep
    monkeypatch.setattr(asyncio, "sleep", lambda delay, result=None: real_sleep(0, result))
    kube, store = _Kube(), _Store()
    reconciler = _Reconciler({}, down_for=10**9)
    creator = _creator(kube, reconciler, store)
    creator.submit(*_launch("replayed"), replayed=True)
    creator.submit(*_launch("new"))
    runner = asyncio.create_task(creator.run())
    try:
        await asyncio.wait_for(_poll(lambda: "new" in store.outcomes and reconciler.asked > 3), 10)
        assert kube.created == ["new-1"]  # the new launch went ahead of the waiting replay
        assert "replayed" not in store.outcomes
        assert creator.backlog == 1

        reconciler.down_for = 0  # the reconciler answers again: it does not know the task
        await asyncio.wait_for(_poll(lambda: "replayed" in store.outcomes), 10)
        assert kube.created == ["new-1", "replayed-1"]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_replayed_launch_cancelled_while_it_waits_is_never_created(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_sleep = asyncio.sleep
    monkeypatch.setattr(asyncio, "sleep", lambda delay, result=None: real_sleep(0, result))
    kube, store = _Kube(), _Store()
    reconciler = _Reconciler({}, down_for=10**9)
    creator = _creator(kube, reconciler, store)
    launch, pod = _launch("cancelled")
    creator.submit(launch, pod, replayed=True)
    runner = asyncio.create_task(creator.run())
    await _poll(lambda: reconciler.asked >= 3)
    assert creator.cancel(launch.key)  # unchecked: its pod may exist, so the caller must see to it
    await _poll(lambda: creator.backlog == 0)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    assert kube.created == []
