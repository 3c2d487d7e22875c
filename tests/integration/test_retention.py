"""Bounded stores and the cursors that go with them, on the real API server.

The stack here has a retention of a few seconds, so pruning happens during the test: finished
tasks and their launches go, running ones stay, and a cursor from before the retention is refused
with OUT_OF_RANGE naming the field. A scheduler can start from now, or take a ListTasks snapshot and
follow the stream from its cursor without missing anything, and an idle stream still answers with
its headers at once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.taskstates import TERMINAL
from shepherd.v1 import launcher_service_pb2 as lpb
from shepherd.v1 import launcher_service_pb2_grpc, task_pb2, watcher_service_pb2, watcher_service_pb2_grpc
from shepherd.v1 import reconciler_service_pb2 as rpb
from tests.helpers import task_key, unique_name
from tests.helpers.audit import LAUNCHER, calls_by_pod
from tests.helpers.scheduler import SchedulerClient
from tests.helpers.streams import Collector, unbatched

pytestmark = pytest.mark.integration
S = task_pb2
SHORT = {"sim.shepherd.dev/run-time": "300ms"}
FOREVER = {"sim.shepherd.dev/outcome": "run-forever"}
CREATED = lpb.LAUNCH_STATE_CREATED
RETENTION_S = 4.0
HEADERS_WITHIN_S = 20.0  # generous on a busy machine; without the fix they never come


def _stack(cluster: ClusterInfo, workdir: Path, name: str, flags: list[str] | None = None) -> ServiceStack:
    extra = flags or []
    return ServiceStack(
        cluster,
        workdir,
        executor_id=f"{name}-{uuid.uuid4().hex[:8]}",
        flags={"launcher": list(extra), "reconciler": ["--pending-timeout-s", "30", *extra]},
    )


@pytest.fixture(scope="module")
def short(cluster: ClusterInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    """Launcher and reconciler that keep their logs for a few seconds, pruning every 0.2 s."""
    flags = ["--retention-s", str(RETENTION_S), "--retention-interval-s", "0.2", "--retention-batch", "7"]
    stack = _stack(cluster, tmp_path_factory.mktemp("retention"), "ret", flags)
    stack.start()
    yield stack
    stack.stop_all()


@pytest.fixture
async def client(short: ServiceStack) -> AsyncIterator[SchedulerClient]:
    async with SchedulerClient.connect(short) as scheduler:
        yield scheduler


async def _headers(call: Any) -> None:
    await asyncio.wait_for(call.initial_metadata(), HEADERS_WITHIN_S)


async def _launch_and_finish(client: SchedulerClient, run: str, name: str) -> S.TaskKey:
    key = task_key(dag_id="retention", task_id=name, run_id=run)
    await client.launch(key, annotations=SHORT)
    assert (await client.final(key)).state == S.TASK_STATE_SUCCEEDED
    return key


async def test_an_idle_stream_sends_its_headers_at_once(cluster: ClusterInfo, tmp_path: Path) -> None:
    # A fresh executor: nothing launched, no pods, so every log is empty and each stream idle.
    stack = _stack(cluster, tmp_path, "idle")
    await asyncio.to_thread(stack.start)
    try:
        async with (
            stack.scheduler_stubs() as (_, reconciler),
            stack.channel("launcher", identity="reconciler") as lch,
            stack.channel("watcher", identity="reconciler") as wch,
        ):
            launcher = launcher_service_pb2_grpc.LauncherServiceStub(lch)
            watcher = watcher_service_pb2_grpc.WatcherServiceStub(wch)
            calls = {
                "WatchTaskStates": reconciler.WatchTaskStates(rpb.WatchTaskStatesRequest()),
                "WatchLaunchEvents": launcher.WatchLaunchEvents(lpb.WatchLaunchEventsRequest()),
                "WatchPodEvents": watcher.WatchPodEvents(watcher_service_pb2.WatchPodEventsRequest()),
            }
            late = []
            for name, call in calls.items():
                try:
                    await _headers(call)
                    assert not call.done(), f"{name} ended: {await call.code()} {await call.details()}"
                except TimeoutError:
                    late.append(name)
                finally:
                    call.cancel()
            assert not late, f"no headers within {HEADERS_WITHIN_S}s on an idle stream: {late}"
    finally:
        await asyncio.to_thread(stack.stop_all)


async def test_a_stream_from_the_head_gets_only_later_events(
    client: SchedulerClient, short: ServiceStack
) -> None:
    run = unique_name("head")
    before = await _launch_and_finish(client, run, "before")
    async with (
        short.channel("watcher", identity="reconciler") as wch,
        short.channel("launcher", identity="reconciler") as lch,
    ):
        watcher = watcher_service_pb2_grpc.WatcherServiceStub(wch)
        launcher = launcher_service_pb2_grpc.LauncherServiceStub(lch)
        # The earlier task's last event anywhere is its pod's deletion, seen by the watcher (the
        # reconciler deletes the pod after logging the task's end): wait for it, then subscribe.
        # Read from the log's start, not a snapshot: under load the deletion can come before this
        # call, and a snapshot (the pods now, then what follows) would never show it.
        everything = watcher.WatchPodEvents(watcher_service_pb2.WatchPodEventsRequest(after_cursor=0))
        seen = Collector(unbatched(everything, "events")).start()
        await seen.until(
            lambda items: any(_deleted(e, before) for e in items), what="the earlier pod deleted"
        )
        await seen.stop()
        transitions = client.reconciler.WatchTaskStates(rpb.WatchTaskStatesRequest(start_at_head=True))
        launches = launcher.WatchLaunchEvents(lpb.WatchLaunchEventsRequest(start_at_head=True))
        pods = watcher.WatchPodEvents(watcher_service_pb2.WatchPodEventsRequest(start_at_head=True))
        for call in (transitions, launches, pods):
            await _headers(call)  # subscribed: its start is fixed
        changes = Collector(unbatched(transitions, "changes")).start()
        events = Collector(unbatched(launches, "events")).start()
        pod_events = Collector(unbatched(pods, "events")).start()
        after = task_key(dag_id="retention", task_id="after", run_id=run)
        await client.launch(after, annotations=SHORT)
        # The barrier: the later task's terminal transition (the last thing it causes in each log is
        # its pod's deletion, which comes after the watcher and the launcher saw it).
        await changes.until(
            lambda items: any(c.task.key == after and c.task.state in TERMINAL for c in items),
            what="the later task's end",
        )
        await pod_events.until(
            lambda items: any(_deleted(e, after) for e in items),
            what="the later task's pod deleted",
        )
        await events.until(
            lambda items: any(e.launch.key == after and e.launch.state == CREATED for e in items),
            what="the later launch created",
        )
        for collector in (changes, events, pod_events):
            await collector.stop()
    assert {c.task.key.task_id for c in changes.items} == {"after"}
    assert changes.items[0].task.state == S.TASK_STATE_QUEUED
    assert {e.launch.key.task_id for e in events.items} == {"after"}
    assert {e.task_key.task_id for e in pod_events.items} == {"after"}


def _deleted(event: watcher_service_pb2.PodEvent, key: S.TaskKey) -> bool:
    return event.task_key == key and event.type == watcher_service_pb2.POD_EVENT_TYPE_DELETED


async def test_head_start_and_a_cursor_together_are_refused(client: SchedulerClient) -> None:
    call = client.reconciler.WatchTaskStates(rpb.WatchTaskStatesRequest(after_cursor=1, start_at_head=True))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start_at_head" in (caught.value.details() or "")


async def test_a_snapshot_then_following_from_its_cursor_misses_nothing(client: SchedulerClient) -> None:
    run = unique_name("snap")
    dag = f"snap-{run[-8:]}"
    keys = [task_key(dag_id=dag, task_id=f"t{i}", run_id=run) for i in range(12)]
    # Tasks end while the snapshot is paged: some before, some during, some after.
    for i, key in enumerate(keys):
        await client.launch(key, annotations={"sim.shepherd.dev/run-time": f"{200 * (i % 4)}ms"})
    snapshot: dict[str, S.Task] = {}
    first_cursor = None
    token = ""
    while True:
        page = await client.reconciler.ListTasks(
            rpb.ListTasksRequest(page_size=3, page_token=token, dag_id=dag), timeout=30
        )
        first_cursor = page.cursor if first_cursor is None else first_cursor
        snapshot.update({podmeta.key_string(t.key): t for t in page.tasks})
        if not (token := page.next_page_token):
            break
        await asyncio.sleep(0.1)  # let the world move while the snapshot is paged
    assert first_cursor, "ListTasks gave no cursor"
    stream = client.reconciler.WatchTaskStates(rpb.WatchTaskStatesRequest(after_cursor=first_cursor))
    followed = Collector(unbatched(stream, "changes")).start()
    sentinel = task_key(dag_id=dag, task_id="sentinel", run_id=run)
    await client.launch(sentinel, annotations=SHORT)
    await followed.until(
        lambda items: any(c.task.key == sentinel and c.task.state in TERMINAL for c in items),
        what="the sentinel's end",
    )
    for key in keys:
        await client.final(key)
    await followed.until(
        lambda items: (
            {podmeta.key_string(c.task.key) for c in items if c.task.state in TERMINAL}
            | {k for k, t in snapshot.items() if t.state in TERMINAL}
            >= {podmeta.key_string(k) for k in keys}
        ),
        what="every task's end, from the snapshot or the stream",
    )
    await followed.stop()
    assert all(c.cursor > first_cursor for c in followed.items), "the stream replayed from before the cursor"
    # The snapshot plus what followed gives each task its true final state.
    state = {key: task.state for key, task in snapshot.items()}
    for change in followed.items:
        state[podmeta.key_string(change.task.key)] = change.task.state
    for key in keys:
        truth = await client.reconciler.GetTask(rpb.GetTaskRequest(key=key), timeout=30)
        assert state[podmeta.key_string(key)] == truth.task.state == S.TASK_STATE_SUCCEEDED


async def test_retention_prunes_what_is_finished_and_keeps_what_runs(
    client: SchedulerClient, short: ServiceStack
) -> None:
    audit = Cluster().audit_log
    run = unique_name("prune")
    dag = f"prune-{run[-8:]}"
    running = task_key(dag_id=dag, task_id="running", run_id=run)
    await client.launch(running, annotations=FOREVER)
    finished = [task_key(dag_id=dag, task_id=f"done{i}", run_id=run) for i in range(10)]
    for key in finished:
        await client.launch(key, annotations=SHORT)
    for key in finished:
        assert (await client.final(key)).state == S.TASK_STATE_SUCCEEDED
    first_cursor = min(c.cursor for key in finished for c in client.changes[podmeta.key_string(key)])

    async def listed() -> set[str]:
        page = await client.reconciler.ListTasks(rpb.ListTasksRequest(dag_id=dag, page_size=100), timeout=30)
        return {t.key.task_id for t in page.tasks}

    async def launch_known(key: S.TaskKey) -> bool:
        try:
            await client.launcher.GetLaunch(lpb.GetLaunchRequest(key=key), timeout=30)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False
        return True

    async def pruned() -> bool:
        return await listed() == {"running"} and not any([await launch_known(key) for key in finished])

    for _ in range(600):
        if await pruned():
            break
        await asyncio.sleep(0.2)
    assert await listed() == {"running"}, "finished tasks were not pruned, or the running one was"
    assert not [k.task_id for k in finished if await launch_known(k)], "launches of ended tasks remain"
    assert await launch_known(running), "the launch of a running task was pruned"
    # Its events are long pruned, yet launching it again is still idempotent.
    assert (await client.launch(running, annotations=FOREVER)).already_existed
    task = (await client.reconciler.GetTask(rpb.GetTaskRequest(key=running), timeout=30)).task
    assert task.state == S.TASK_STATE_RUNNING

    # A cursor from before the retention is refused, naming the field and the oldest cursor left.
    async with short.channel("launcher", identity="reconciler") as lch:
        launcher = launcher_service_pb2_grpc.LauncherServiceStub(lch)
        for name, call in {
            "WatchTaskStates": client.reconciler.WatchTaskStates(
                rpb.WatchTaskStatesRequest(after_cursor=first_cursor)
            ),
            "WatchLaunchEvents": launcher.WatchLaunchEvents(lpb.WatchLaunchEventsRequest(after_cursor=1)),
        }.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
            assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE, name
            details = caught.value.details() or ""
            assert details.startswith("after_cursor:"), details
            assert "oldest cursor still available" in details, details

    # Cancel the running one; it goes once it is over, and no pod was created twice.
    await client.reconciler.CancelTask(rpb.CancelTaskRequest(key=running, reason="done"), timeout=30)
    assert (await client.final(running)).state == S.TASK_STATE_REVOKED
    names = {podmeta.pod_name(k) for k in [running, *finished]}
    creates = calls_by_pod(audit, "create", LAUNCHER, names)
    assert set(creates.values()) == {1}, creates
