"""Retention by count (retention_max_entries), on the real API server: what pruning a task or a
launch early must never do.

The launcher logs about two events per task and the reconciler about four transitions, so with
the same count the launcher still has a launch whose task the reconciler has already pruned. Such
a task must not come back: not through GetTask or CancelTask after the reconciler restarted (its
memory of finished tasks empty), which would move it backwards to QUEUED and relaunch it (a second
pod, the witness is the API server's audit log), nor through a stray event about it. What pruning
takes, it takes whole: no pod action or post-mortem row outlives its task. And a reconciler whose
launch events were pruned before it read them (it was down) still learns how the launches of the
tasks it saw QUEUED ended.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import closing

import grpc
import pytest

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.taskstates import TERMINAL
from shepherd.v1 import launcher_service_pb2 as lpb
from shepherd.v1 import reconciler_service_pb2 as rpb
from shepherd.v1 import task_pb2
from tests.helpers import core_api, make_pod, task_key, unique_name
from tests.helpers.audit import LAUNCHER, calls_by_pod
from tests.helpers.eventually import eventually_async
from tests.helpers.scheduler import SchedulerClient
from tests.integration.test_namespaces import variant

pytestmark = pytest.mark.integration
S = task_pb2
SHORT = {"sim.shepherd.dev/run-time": "300ms"}
FAIL = {"sim.shepherd.dev/outcome": "fail", "sim.shepherd.dev/run-time": "300ms"}
MAX_ENTRIES = 12
PENDING_TIMEOUT_S = 8.0
QUEUED_TIMEOUT_S = 15.0


@pytest.fixture(scope="module")
def quota_namespace(cluster: ClusterInfo) -> Iterator[str]:
    """A namespace of this module's own (with the RBAC the services need there) where no pod may
    be created: a launch into it is retried (403 exceeded quota) until its queued timeout."""
    name = unique_name("noquota")
    admin = Cluster()._admin()
    for doc in variant("namespace-list", name):
        admin.apply(doc)
    admin.apply(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "no-pods", "namespace": name},
            "spec": {"hard": {"pods": "0"}},
        }
    )
    yield name
    core_api(cluster.admin_kubeconfig).delete_namespace(name)


@pytest.fixture(scope="module")
def counted(
    cluster: ClusterInfo, quota_namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceStack]:
    """Launcher and reconciler that keep only the newest MAX_ENTRIES log entries (the age limit
    is the default week), pruning every 0.2 s."""
    retention = ["--retention-max-entries", str(MAX_ENTRIES), "--retention-interval-s", "0.2"]
    namespaces = ["--watch-namespaces", quota_namespace]
    stack = ServiceStack(
        cluster,
        tmp_path_factory.mktemp("counted"),
        executor_id=f"count-{uuid.uuid4().hex[:8]}",
        flags={
            "launcher": [*retention, *namespaces, "--task-queued-timeout-s", str(QUEUED_TIMEOUT_S)],
            "reconciler": [*retention, *namespaces, "--pending-timeout-s", str(PENDING_TIMEOUT_S)],
            "watcher": namespaces,
        },
    )
    stack.start()
    yield stack
    stack.stop_all()


@pytest.fixture
async def client(counted: ServiceStack) -> AsyncIterator[SchedulerClient]:
    async with SchedulerClient.connect(counted) as scheduler:
        yield scheduler


async def _stored(client: SchedulerClient, key: S.TaskKey) -> S.Task | None:
    try:
        reply = await client.reconciler.GetTask(rpb.GetTaskRequest(key=key, stored_only=True), timeout=30)
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return None
    task: S.Task = reply.task
    return task


async def _launch_of(client: SchedulerClient, key: S.TaskKey) -> lpb.Launch | None:
    try:
        reply = await client.launcher.GetLaunch(lpb.GetLaunchRequest(key=key), timeout=30)
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return None
    launch: lpb.Launch = reply.launch
    return launch


async def _run(client: SchedulerClient, name: str, annotations: dict[str, str] = SHORT) -> S.Task:
    key = task_key(dag_id="counted", task_id=name, run_id=unique_name("run"))
    await client.launch(key, annotations=annotations)
    return await client.final(key)


async def _until_pruned(client: SchedulerClient, key: S.TaskKey) -> None:
    """Run short tasks until the reconciler has pruned `key`'s task (a handful, with the count)."""
    for i in range(4 * MAX_ENTRIES):
        if await _stored(client, key) is None:
            return
        await _run(client, f"filler{i}")
    raise AssertionError(f"{key.task_id} was not pruned")


async def _not_found(call: Awaitable[object]) -> bool:
    """Whether the call was answered NOT_FOUND (any other error fails the test)."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return True
    return False


async def test_a_task_pruned_by_count_is_never_resurrected_nor_run_again(
    client: SchedulerClient, counted: ServiceStack
) -> None:
    audit = Cluster().audit_log
    done = await _run(client, "once")
    key = done.key
    assert done.state == S.TASK_STATE_SUCCEEDED
    await _until_pruned(client, key)
    launch = await _launch_of(client, key)
    assert launch is not None, "the launcher forgot it first"
    assert launch.state == lpb.LAUNCH_STATE_CREATED

    # A restart empties the reconciler's memory of finished tasks; by then the deadline for a pod
    # "created but never seen" has long passed for this one.
    await asyncio.to_thread(counted.restart, "reconciler")
    created = launch.create_time.ToNanoseconds() / 1e9
    await asyncio.sleep(max(0.0, created + PENDING_TIMEOUT_S + 1 - time.time()))

    # Asked about it (a `shepherd tasks get`, an adoption), it is gone: not QUEUED again. (The
    # client's channel may still be backing off from the restart: the calls wait for it.)
    assert await _not_found(
        client.reconciler.GetTask(rpb.GetTaskRequest(key=key), timeout=30, wait_for_ready=True)
    ), "a pruned task was learnt again from its launch"
    assert await _not_found(
        client.reconciler.CancelTask(rpb.CancelTaskRequest(key=key), timeout=30, wait_for_ready=True)
    )
    # The launch is still kept here, so a repeated LaunchTask is still idempotent.
    assert (await client.launch(key, annotations=SHORT)).already_existed

    # The barrier: a task launched afterwards has finished, so anything the GetTask set off (a
    # relaunch once its deadline expired) was decided before.
    assert (await _run(client, "sentinel")).state == S.TASK_STATE_SUCCEEDED
    assert await _stored(client, key) is None
    assert client.states(key)[-1] == S.TASK_STATE_SUCCEEDED, client.states(key)
    pods = {podmeta.pod_name(key, attempt) for attempt in (1, 2, 3)}
    creates = calls_by_pod(audit, "create", LAUNCHER, pods)
    assert dict(creates) == {podmeta.pod_name(key): 1}, creates


async def test_a_repeated_launch_of_a_task_that_ran_makes_no_second_pod_after_count_pruning(
    client: SchedulerClient, counted: ServiceStack
) -> None:
    """Both logs pruned past the task by count, moments after it ended: the launcher keeps its
    launch (a retention period after its pod was created), so LaunchTask stays idempotent."""
    audit = Cluster().audit_log
    done = await _run(client, "repeat")
    key = podmeta.key_string(done.key)
    db_path = counted.workdir / "launcher.db"

    def judged() -> bool:
        """The launcher pruned the launch's last event and asked the reconciler about its task."""
        with closing(sqlite3.connect(db_path)) as db:
            launch = db.execute("SELECT 1 FROM launches WHERE key = ?", (key,)).fetchone()
            due = db.execute("SELECT due FROM launch_expiry WHERE key = ?", (key,)).fetchone()
        return launch is None or (due is not None and due[0] > time.time() + 3600)

    for i in range(4 * MAX_ENTRIES):
        if await asyncio.to_thread(judged):
            break
        await _run(client, f"more{i}")
    assert await asyncio.to_thread(judged), "the launcher never pruned the launch's events"
    assert await _stored(client, done.key) is None
    assert (await client.launch(done.key, annotations=SHORT)).already_existed
    assert (await _run(client, "sentinel")).state == S.TASK_STATE_SUCCEEDED
    creates = calls_by_pod(audit, "create", LAUNCHER, {done.pod_name})
    assert dict(creates) == {done.pod_name: 1}, creates


async def test_pruning_a_failed_task_takes_its_pod_action_and_post_mortem_rows(
    client: SchedulerClient, counted: ServiceStack
) -> None:
    failed = await _run(client, "fails", FAIL)
    assert failed.state == S.TASK_STATE_FAILED
    key = podmeta.key_string(failed.key)
    db_path = counted.workdir / "reconciler.db"

    def rows() -> tuple[str, int, int]:
        with closing(sqlite3.connect(db_path)) as db:
            uid = db.execute("SELECT pod_uid FROM tasks WHERE key = ?", (key,)).fetchone()
            actions = db.execute("SELECT count(*) FROM pod_actions WHERE name = ?", (failed.pod_name,))
            post = db.execute("SELECT count(*) FROM post_mortems WHERE task_key = ?", (key,))
            return (uid[0] if uid else "", actions.fetchone()[0], post.fetchone()[0])

    # Its pod is marked done (failed pods are kept by default), and what to read of it recorded.
    await eventually_async(
        lambda: asyncio.to_thread(lambda: rows()[1:] == (1, 1)), what="the failed pod's action"
    )
    await _until_pruned(client, failed.key)
    assert await asyncio.to_thread(rows) == ("", 0, 0), "rows of a pruned task remain"


async def test_a_pruned_task_is_not_stored_again_by_a_late_event(
    client: SchedulerClient, counted: ServiceStack, cluster: ClusterInfo
) -> None:
    done = await _run(client, "stray")
    await _until_pruned(client, done.key)
    # A pod of the same task turns up (no restart: the reconciler still remembers the task as
    # finished), and is cleaned up as a finished task's pod.
    stray = unique_name("stray")
    admin = core_api(cluster.admin_kubeconfig)
    admin.create_namespaced_pod(
        cluster.namespace,
        make_pod(
            stray,
            labels=podmeta.task_labels(done.key, counted.executor_id),
            annotations={**podmeta.task_annotations(done.key, 1), **SHORT},
        ),
    )

    async def stray_gone() -> bool:
        pods = await asyncio.to_thread(
            admin.list_namespaced_pod, cluster.namespace, field_selector=f"metadata.name={stray}"
        )
        return not pods.items

    await eventually_async(stray_gone, what="the stray pod cleaned up")
    assert (await _run(client, "sentinel")).state == S.TASK_STATE_SUCCEEDED
    assert await _stored(client, done.key) is None, "a pruned task was stored again, for ever"


async def test_a_launch_outcome_pruned_unread_still_reaches_its_task(
    client: SchedulerClient, counted: ServiceStack, quota_namespace: str
) -> None:
    key = task_key(dag_id="counted", task_id="quota", run_id=unique_name("run"))
    annotations = "annotations: {sim.shepherd.dev/run-time: 300ms}"
    await client.launch(key, override=f"metadata: {{namespace: {quota_namespace}, {annotations}}}")
    await client.reached(key, S.TASK_STATE_QUEUED)
    # The reconciler saw it QUEUED; while it is down, the launch fails (its pod could never be
    # created) and the launcher prunes that outcome, and the launch with it.
    await asyncio.to_thread(counted.stop, "reconciler", sig=signal.SIGTERM)
    await eventually_async(
        lambda: _launch_failed(client, key), what="the launch to fail", timeout=QUEUED_TIMEOUT_S + 60
    )
    fillers = [task_key(dag_id="counted", task_id=f"gap{i}", run_id=unique_name("run")) for i in range(8)]
    for filler in fillers:
        await client.launch(filler, annotations=SHORT)
    await eventually_async(
        lambda: _forgotten(client, key), what="the failed launch to be pruned at the launcher"
    )
    await asyncio.to_thread(counted.start, ("reconciler",))
    # Read with GetTask, not the client's state stream: the stream's cursor from before the restart
    # may itself be pruned by the count bound (12 entries) before the client reconnects, and a
    # fresh-clone run once timed out waiting on it while the task had ended as expected.
    task = await eventually_async(lambda: _ended(client, key), what="the quota task to end", timeout=90)
    assert task.state == S.TASK_STATE_FAILED, task
    assert task.failure.reason == "LaunchOutcomeLost", task.failure
    for filler in fillers:
        ended = await eventually_async(
            functools.partial(_ended, client, filler), what="a filler to end", timeout=90
        )
        assert ended.state == S.TASK_STATE_SUCCEEDED


async def _ended(client: SchedulerClient, key: S.TaskKey) -> S.Task | None:
    reply = await client.reconciler.GetTask(rpb.GetTaskRequest(key=key), timeout=30, wait_for_ready=True)
    task: S.Task = reply.task
    return task if task.state in TERMINAL else None


async def _launch_failed(client: SchedulerClient, key: S.TaskKey) -> bool:
    launch = await _launch_of(client, key)
    return launch is not None and launch.state == lpb.LAUNCH_STATE_FAILED


async def _forgotten(client: SchedulerClient, key: S.TaskKey) -> bool:
    return await _launch_of(client, key) is None
