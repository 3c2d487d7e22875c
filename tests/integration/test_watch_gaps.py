"""Never lose an event: after 410 Gone the watcher re-lists and reconstructs the gap (vanished
pods included), and a client that resumes from its cursor gets every later event exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.v1 import reconciler_service_pb2, watcher_service_pb2, watcher_service_pb2_grpc
from tests.helpers import core_api, make_pod, task_key, unique_name
from tests.helpers.cluster import spare_settings
from tests.helpers.scheduler import SchedulerClient
from tests.helpers.streams import Collector, unbatched

pytestmark = pytest.mark.integration
W = watcher_service_pb2
WATCH_TIMEOUT_S = 5


def executor_pod(executor: str, name: str, **annotations: str) -> dict[str, object]:
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


async def test_a_410_gap_is_rebuilt_from_a_relist_including_vanished_pods(
    gap_cluster: tuple[Cluster, ClusterInfo], tmp_path: Path
) -> None:
    spare, info = gap_cluster
    executor = "gap"
    stack = ServiceStack(
        info, tmp_path, executor_id=executor, flags={"watcher": ["--watch-timeout-s", str(WATCH_TIMEOUT_S)]}
    )
    stack.start(("watcher",))
    admin = core_api(info.admin_kubeconfig)
    ns = info.namespace
    try:
        for name in ("pod-a", "pod-b"):
            admin.create_namespaced_pod(
                ns, executor_pod(executor, name, **{"sim.shepherd.dev/outcome": "run-forever"})
            )
        async with stack.channel("watcher", identity="reconciler") as channel:
            stub = watcher_service_pb2_grpc.WatcherServiceStub(channel)
            events = Collector(
                unbatched(stub.WatchPodEvents(W.WatchPodEventsRequest(after_cursor=0)), "events")
            ).start()
            await events.until(
                lambda items: {i.pod_name for i in items if i.phase == "Running"} >= {"pod-a", "pod-b"},
                what="both pods Running",
            )
            seen = len(events.items)

            watcher = stack.procs["watcher"]
            os.kill(watcher.pid, signal.SIGSTOP)  # the watcher stops reading; its watch times out server-side
            try:
                await asyncio.sleep(WATCH_TIMEOUT_S + 3)
                admin.delete_namespaced_pod("pod-a", ns, grace_period_seconds=0, _request_timeout=30)
                admin.patch_namespaced_pod(
                    "pod-b", ns, {"metadata": {"labels": {"changed": "during-gap"}}}, _request_timeout=30
                )
                admin.create_namespaced_pod(ns, executor_pod(executor, "pod-c"), _request_timeout=30)
                spare.compact_etcd()  # the watcher's last resourceVersion is now history: 410 Gone
            finally:
                os.kill(watcher.pid, signal.SIGCONT)

            def gap_rebuilt(items: list[W.PodEvent]) -> bool:
                after = [i for i in items[seen:]]
                return {(e.pod_name, e.type) for e in after if e.synthetic} >= {
                    ("pod-a", W.POD_EVENT_TYPE_DELETED),
                    ("pod-b", W.POD_EVENT_TYPE_MODIFIED),
                    ("pod-c", W.POD_EVENT_TYPE_ADDED),
                }

            await events.until(gap_rebuilt, what="synthetic events for the gap")
            rebuilt = [i for i in events.items[seen:] if i.synthetic]
            assert next(e for e in rebuilt if e.pod_name == "pod-b").labels["changed"] == "during-gap"
            cursors = [i.cursor for i in events.items]
            assert cursors == sorted(set(cursors))
            await events.stop()
        assert "re-listing" in stack.tail("watcher", 200)
    finally:
        stack.stop_all()


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
