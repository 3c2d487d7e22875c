"""Never lose an event: after 410 Gone the watcher re-lists and reconstructs the gap (vanished
pods included), and a client that resumes from its cursor gets every later event exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.v1 import (
    launcher_service_pb2,
    reconciler_service_pb2,
    task_pb2,
    watcher_service_pb2,
    watcher_service_pb2_grpc,
)
from tests.helpers import core_api, make_pod, task_key, unique_name
from tests.helpers.audit import LAUNCHER, WATCHER, AuditLog, calls_by_pod
from tests.helpers.cluster import spare_settings
from tests.helpers.scheduler import SchedulerClient
from tests.helpers.streams import Collector, unbatched

pytestmark = pytest.mark.integration
W = watcher_service_pb2
S = task_pb2
L = launcher_service_pb2
R = reconciler_service_pb2
WATCH_TIMEOUT_S = 5


def executor_pod(executor: str, name: str, **annotations: str) -> dict[str, object]:
    """A pod of `executor`'s made by hand (not launched), for the task `task_key(task_id=name)`."""
    key = task_key(task_id=name)
    pod = make_pod(
        name,
        labels=podmeta.task_labels(key, executor),
        annotations={**podmeta.task_annotations(key, 1), **annotations},
    )
    return pod


@pytest.fixture(scope="module")
def gap_cluster(
    tmp_path_factory: pytest.TempPathFactory, cluster: ClusterInfo
) -> Iterator[tuple[Cluster, ClusterInfo]]:
    """Its own cluster, with pod watches served from etcd so that a compaction reaches them."""
    spare = Cluster(spare_settings(tmp_path_factory.mktemp("gap"), pods_watch_cache=False))
    info = spare.up()
    yield spare, info
    spare.down()


@dataclass
class GapRun:
    """A stack on the gap cluster whose watcher's watches time out after WATCH_TIMEOUT_S, a
    scheduler client, and every pod event the watcher streams (from cursor 0)."""

    spare: Cluster
    info: ClusterInfo
    stack: ServiceStack
    client: SchedulerClient
    events: Collector[W.PodEvent]

    @contextlib.asynccontextmanager
    async def gap(self) -> AsyncIterator[None]:
        """Freeze the watcher until its watch has timed out server-side; the block makes the gap
        (and compacts etcd, so the resume is a 410), then the watcher goes on."""
        watcher = self.stack.procs["watcher"]
        os.kill(watcher.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(WATCH_TIMEOUT_S + 3)
            yield
        finally:
            os.kill(watcher.pid, signal.SIGCONT)


@contextlib.asynccontextmanager
async def gap_run(
    gap_cluster: tuple[Cluster, ClusterInfo], workdir: Path, prefix: str
) -> AsyncIterator[GapRun]:
    """A GapRun; on a clean exit, the watcher must have re-listed (the gap was a real 410)."""
    spare, info = gap_cluster
    stack = ServiceStack(
        info,
        workdir,
        executor_id=f"{prefix}-{unique_name('x')[-6:]}",
        flags={"watcher": ["--watch-timeout-s", str(WATCH_TIMEOUT_S)]},
    )
    stack.start()
    try:
        async with (
            SchedulerClient.connect(stack) as client,
            stack.channel("watcher", identity="reconciler") as channel,
        ):
            stub = watcher_service_pb2_grpc.WatcherServiceStub(channel)
            events = Collector(
                unbatched(stub.WatchPodEvents(W.WatchPodEventsRequest(after_cursor=0)), "events")
            ).start()
            yield GapRun(spare, info, stack, client, events)
            await events.stop()
        assert "re-listing" in stack.tail("watcher", 400)
    finally:
        stack.stop_all()


async def test_a_410_gap_is_rebuilt_and_every_task_touched_in_it_settles(
    gap_cluster: tuple[Cluster, ClusterInfo], tmp_path: Path
) -> None:
    """During a watch gap a Running and a Pending pod are deleted, one pod is relabelled out of the
    selector, one changes and one appears. After the 410 re-list the watcher reports each, the
    deleted ones as deleted (it reads them by name: the rebuilt event has no deletionTimestamp),
    and the reconciler settles every task: none is left waiting for a pod that no longer exists."""
    spare, info = gap_cluster
    admin = core_api(info.admin_kubeconfig)
    ns = info.namespace
    run_forever = {"sim.shepherd.dev/outcome": "run-forever"}
    running, pending, left, changed = (
        task_key(task_id=unique_name(n)) for n in ("run", "pend", "left", "chg")
    )
    added_name = unique_name("new")
    added = task_key(task_id=added_name)  # its pod is made by hand, named added_name
    async with gap_run(gap_cluster, tmp_path, "gap") as run:
        client, events, executor = run.client, run.events, run.stack.executor_id
        for key in (running, left, changed):
            await client.launch(key, annotations=run_forever)
        await client.launch(key=pending, override="spec: {nodeSelector: {disktype: no-such-node}}")
        for key in (running, left, changed):
            await client.reached(key, S.TASK_STATE_RUNNING)
        pending_pod = podmeta.pod_name(pending)
        await events.until(
            lambda items: any(i.pod_name == pending_pod and i.conditions for i in items),
            what="the pending pod's scheduling verdict",
        )
        seen = len(events.items)

        async with run.gap():
            for key in (running, pending):
                admin.delete_namespaced_pod(
                    podmeta.pod_name(key), ns, grace_period_seconds=0, _request_timeout=30
                )
            admin.patch_namespaced_pod(
                podmeta.pod_name(left), ns, {"metadata": {"labels": {podmeta.LABEL_DONE: "true"}}}
            )
            admin.patch_namespaced_pod(
                podmeta.pod_name(changed), ns, {"metadata": {"labels": {"changed": "during-gap"}}}
            )
            admin.create_namespaced_pod(ns, executor_pod(executor, added_name), _request_timeout=30)
            spare.compact_etcd()  # the watcher's last resourceVersion is now history: 410 Gone

        expected = {
            (podmeta.pod_name(running), W.POD_EVENT_TYPE_DELETED, W.POD_GONE_DELETED),
            (podmeta.pod_name(pending), W.POD_EVENT_TYPE_DELETED, W.POD_GONE_DELETED),
            (podmeta.pod_name(left), W.POD_EVENT_TYPE_DELETED, W.POD_GONE_LEFT_SELECTOR),
            (podmeta.pod_name(changed), W.POD_EVENT_TYPE_MODIFIED, W.POD_GONE_UNSPECIFIED),
            (added_name, W.POD_EVENT_TYPE_ADDED, W.POD_GONE_UNSPECIFIED),
        }
        await events.until(
            lambda items: {(e.pod_name, e.type, e.gone) for e in items[seen:] if e.synthetic} >= expected,
            what="synthetic events for the gap",
        )
        rebuilt = [i for i in events.items[seen:] if i.synthetic]
        assert (
            next(e for e in rebuilt if e.pod_name == podmeta.pod_name(changed)).labels["changed"]
            == "during-gap"
        )
        cursors = [i.cursor for i in events.items]
        assert cursors == sorted(set(cursors))

        # Every task touched in the gap settles.
        lost_running = await client.final(running)
        assert (lost_running.state, lost_running.failure.reason) == (
            S.TASK_STATE_FAILED,
            "DeletedWhileRunning",
        )
        assert "deleted" in lost_running.failure.message

        async def pending_settled() -> str:
            while True:
                states = client.states(pending)
                if S.TASK_STATE_UP_FOR_RESCHEDULE in states:
                    return "rescheduled"
                reply = await client.launcher.GetLaunch(L.GetLaunchRequest(key=pending), timeout=10)
                if reply.launch.attempt == 2:
                    return "relaunched"
                await asyncio.sleep(0.2)

        outcome = await asyncio.wait_for(pending_settled(), 60)
        if outcome == "relaunched":
            relaunched_pod = podmeta.pod_name(pending, 2)
            await events.until(
                lambda items: any(i.pod_name == relaunched_pod for i in items),
                what="the relaunched pod",
            )
        # The pod that appeared in the gap runs its life; its task's end is also the barrier
        # that shows the reconciler has applied every event of the gap before it.
        assert (await client.final(added)).state == S.TASK_STATE_SUCCEEDED
        reply = await client.reconciler.GetTask(R.GetTaskRequest(key=left), timeout=10)
        assert reply.task.state == S.TASK_STATE_RUNNING  # relabelled away, not deleted
        assert client.states(changed)[-1] == S.TASK_STATE_RUNNING
    creates = calls_by_pod(spare.audit_log, "create", LAUNCHER)
    mine = {podmeta.pod_name(k, a) for k in (running, pending, left, changed) for a in (1, 2)}
    assert {name: n for name, n in creates.items() if name in mine and n != 1} == {}


async def test_the_pods_that_vanish_in_a_gap_are_asked_about_in_one_list_not_one_read_each(
    gap_cluster: tuple[Cluster, ClusterInfo], tmp_path: Path
) -> None:
    """A long gap under load can leave thousands of vanished pods: reading each by name kept a
    scale run's watcher silent for over ten minutes. Here 12 pods are deleted and one is marked
    done in a gap; the watcher reports each as it went, and the API server's audit log shows it
    read none of them by name."""
    spare, info = gap_cluster
    admin = core_api(info.admin_kubeconfig)
    ns = info.namespace
    keys = [task_key(task_id=unique_name(f"many{i}")) for i in range(13)]
    *deleted, kept = keys
    audit = AuditLog.from_now(spare.audit_log)
    async with gap_run(gap_cluster, tmp_path, "gapmany") as run:
        client, events = run.client, run.events
        for key in keys:
            await client.launch(key, annotations={"sim.shepherd.dev/outcome": "run-forever"})
        for key in keys:
            await client.reached(key, S.TASK_STATE_RUNNING)
        seen = len(events.items)
        async with run.gap():
            for key in deleted:
                await asyncio.to_thread(
                    admin.delete_namespaced_pod, podmeta.pod_name(key), ns, grace_period_seconds=0
                )
            await asyncio.to_thread(
                admin.patch_namespaced_pod,
                podmeta.pod_name(kept),
                ns,
                {"metadata": {"labels": {podmeta.LABEL_DONE: "true"}}},
            )
            await asyncio.to_thread(spare.compact_etcd)
        expected = {(podmeta.pod_name(k), W.POD_GONE_DELETED) for k in deleted} | {
            (podmeta.pod_name(kept), W.POD_GONE_LEFT_SELECTOR)
        }
        await events.until(
            lambda items: (
                {
                    (e.pod_name, e.gone)
                    for e in items[seen:]
                    if e.synthetic and e.type == W.POD_EVENT_TYPE_DELETED
                }
                >= expected
            ),
            what="a synthetic DELETED for each pod of the gap, saying how it went",
        )
    names = {podmeta.pod_name(k) for k in keys}
    assert audit.calls("get", names, user=WATCHER) == {}


async def test_a_pod_that_leaves_the_selector_is_not_reported_deleted(
    gap_cluster: tuple[Cluster, ClusterInfo], tmp_path: Path
) -> None:
    """A watch reports a pod that stops matching the selector as DELETED, with its old content; the
    watcher tells it from a deletion by reading the pod."""
    _, info = gap_cluster
    executor = f"sel-{unique_name('x')[-6:]}"
    stack = ServiceStack(info, tmp_path, executor_id=executor)
    stack.start(("watcher",))
    admin = core_api(info.admin_kubeconfig)
    ns = info.namespace
    kept, deleted = unique_name("kept"), unique_name("gone")
    try:
        async with stack.channel("watcher", identity="reconciler") as channel:
            stub = watcher_service_pb2_grpc.WatcherServiceStub(channel)
            events = Collector(
                unbatched(stub.WatchPodEvents(W.WatchPodEventsRequest(snapshot=True)), "events")
            ).start()
            for name in (kept, deleted):
                admin.create_namespaced_pod(
                    ns, executor_pod(executor, name, **{"sim.shepherd.dev/outcome": "run-forever"})
                )
            await events.until(
                lambda items: {i.pod_name for i in items if i.phase == "Running"} >= {kept, deleted},
                what="both pods Running",
            )
            admin.patch_namespaced_pod(kept, ns, {"metadata": {"labels": {podmeta.LABEL_DONE: "true"}}})
            admin.delete_namespaced_pod(deleted, ns, grace_period_seconds=0)
            await events.until(
                lambda items: (
                    {(i.pod_name, i.gone) for i in items if i.type == W.POD_EVENT_TYPE_DELETED}
                    >= {(kept, W.POD_GONE_LEFT_SELECTOR), (deleted, W.POD_GONE_DELETED)}
                ),
                what="both pods out of view, each with how it went",
            )
            await events.stop()
    finally:
        stack.stop_all()
        admin.delete_namespaced_pod(kept, ns, grace_period_seconds=0)


async def test_a_client_resuming_from_its_cursor_gets_every_later_event_once(stack: ServiceStack) -> None:
    admin = core_api(stack.cluster.admin_kubeconfig)
    ns = stack.cluster.namespace
    first, second = unique_name("resume-a"), unique_name("resume-b")
    async with stack.channel("watcher", identity="reconciler") as channel:
        stub = watcher_service_pb2_grpc.WatcherServiceStub(channel)
        before = Collector(
            unbatched(stub.WatchPodEvents(W.WatchPodEventsRequest(snapshot=True)), "events")
        ).start()
        admin.create_namespaced_pod(
            ns, executor_pod(stack.executor_id, first, **{"sim.shepherd.dev/run-time": "200ms"})
        )
        await before.until(
            lambda items: any(i.pod_name == first and i.phase == "Succeeded" for i in items),
            what="the first pod to succeed",
        )
        await before.stop()
        last = before.items[-1].cursor

        admin.create_namespaced_pod(
            ns, executor_pod(stack.executor_id, second, **{"sim.shepherd.dev/run-time": "200ms"})
        )
        await asyncio.sleep(1.5)  # events for the second pod happen while nobody is connected
        after = Collector(
            unbatched(stub.WatchPodEvents(W.WatchPodEventsRequest(after_cursor=last)), "events")
        ).start()
        await after.until(
            lambda items: any(i.pod_name == second and i.phase == "Succeeded" for i in items),
            what="the second pod's events after resuming",
        )
        await after.stop()
    cursors = [i.cursor for i in after.items]
    assert cursors[0] == last + 1
    assert cursors == list(range(last + 1, last + 1 + len(cursors)))


async def test_task_state_subscribers_resume_from_their_cursor(client: SchedulerClient) -> None:
    key = task_key(task_id=unique_name("cursor"))
    await client.launch(key, annotations={"sim.shepherd.dev/run-time": "200ms"})
    await client.final(key)
    changes = client.changes[podmeta.key_string(key)]
    middle = changes[0].cursor
    stream = client.reconciler.WatchTaskStates(
        reconciler_service_pb2.WatchTaskStatesRequest(after_cursor=middle)
    )
    resumed = Collector(unbatched(stream, "changes")).start()
    await resumed.until(
        lambda items: any(i.cursor == changes[-1].cursor for i in items),
        what="the task's last transition",
    )
    await resumed.stop()
    assert resumed.items[0].cursor == middle + 1
    mine = [i.task.state for i in resumed.items if i.task.key == key]
    assert mine == [c.task.state for c in changes[1:]]


async def test_a_cursor_ahead_of_the_log_is_out_of_range(client: SchedulerClient) -> None:
    stream = client.reconciler.WatchTaskStates(
        reconciler_service_pb2.WatchTaskStatesRequest(after_cursor=10**12)
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stream:
            pass
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
