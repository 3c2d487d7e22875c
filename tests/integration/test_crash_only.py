"""Crash-only services: when one of a service's root tasks fails, the service stops serving, logs
the cause once (naming the task), and exits non-zero; its restart, on the same store, recovers
(accepted launches are replayed, streams resume from committed cursors), so no task is lost or
finished twice, no pod is created twice and every finished pod is deleted once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import failpoints, podmeta
from shepherd.taskstates import TERMINAL
from shepherd.v1 import launcher_service_pb2 as lpb
from shepherd.v1 import task_pb2
from shepherd.v1.launcher_service_pb2_grpc import LauncherServiceStub
from tests.helpers import core_api, eventually, task_key, unique_name
from tests.helpers.audit import RECONCILER, AuditLog, calls_by_pod
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
S = task_pb2
TASKS = 40
FAILING = set(range(0, TASKS, 5))


def pod_annotations(i: int) -> dict[str, str]:
    """Short and long runs, some failing: at a crash some pods are done and some still running."""
    found = {"sim.shepherd.dev/run-time": f"{1 + i % 4 * 3}s"}
    if i in FAILING:
        found["sim.shepherd.dev/outcome"] = "fail"
    return found


def launch_request(key: task_pb2.TaskKey, i: int) -> lpb.LaunchTaskRequest:
    pairs = ", ".join(f"{k}: '{v}'" for k, v in pod_annotations(i).items())
    return lpb.LaunchTaskRequest(
        key=key, command=["run-task"], pod_override_yaml=f"metadata: {{annotations: {{{pairs}}}}}"
    )


def crash_lines(stack: ServiceStack, name: str) -> list[str]:
    return [line for line in stack.log_path(name).read_text().splitlines() if "root task failed" in line]


async def until_created(client: SchedulerClient, keys: list[task_pb2.TaskKey]) -> None:
    async def created(key: task_pb2.TaskKey) -> None:
        while True:
            reply = await client.launcher.GetLaunch(lpb.GetLaunchRequest(key=key), timeout=10)
            if reply.launch.state == lpb.LAUNCH_STATE_CREATED:
                return
            await asyncio.sleep(0.1)

    await asyncio.wait_for(asyncio.gather(*(created(key) for key in keys)), 120)


async def check_everything_finished_once(
    client: SchedulerClient, stack: ServiceStack, cluster: ClusterInfo, keys: list[task_pb2.TaskKey]
) -> None:
    """Every task ends once, in the state its pod called for; one pod each; each succeeded pod
    deleted once (failed ones are kept), as the API server's audit log tells."""
    tasks = await asyncio.gather(*(client.final(key, timeout=180) for key in keys))
    # Barrier: transitions are delivered in commit order, so once a task launched now has
    # finished, any second terminal transition of an earlier task would have been seen.
    sentinel = task_key(dag_id="crash", task_id=unique_name("sentinel"), run_id=keys[0].run_id)
    await client.launch(sentinel, annotations={"sim.shepherd.dev/run-time": "1s"})
    await client.final(sentinel, timeout=120)
    for i, (key, task) in enumerate(zip(keys, tasks, strict=True)):
        expected = S.TASK_STATE_FAILED if i in FAILING else S.TASK_STATE_SUCCEEDED
        states = client.states(key)
        assert task.state == expected, f"task {i}: {[S.TaskState.Name(s) for s in states]}"  # type: ignore[arg-type]
        assert sum(state in TERMINAL for state in states) == 1, f"task {i}: {states}"
        assert len(states) == len(set(states)), f"task {i}: a state delivered twice: {states}"

    pods = {podmeta.pod_name(key) for key in keys}
    succeeded = {podmeta.pod_name(key) for i, key in enumerate(keys) if i not in FAILING}
    admin = core_api(cluster.admin_kubeconfig)
    selector = f"shepherd.dev/executor-id={stack.executor_id}"

    def all_deleted() -> bool:
        left = admin.list_namespaced_pod(cluster.namespace, label_selector=selector).items
        return not {pod.metadata.name for pod in left} & succeeded

    await asyncio.to_thread(eventually, all_deleted, what="every succeeded pod to be deleted", timeout=120)
    audit = Cluster().audit_log
    created = AuditLog(audit).creates(pods)
    assert set(created.values()) <= {1}, f"a pod created twice: {created}"
    # A create cut off when its launcher exits can still make its pod without its 201 reaching the
    # audit log (seen under load), so every pod is not required to show one; the deletes are the
    # second witness: each succeeded task's pod is deleted once, and a second pod of the same name
    # would have been deleted too.
    deletes = calls_by_pod(audit, "delete", RECONCILER, pods)
    assert set(deletes) == succeeded, deletes
    assert set(deletes.values()) == {1}, deletes


async def test_a_launcher_whose_pod_creator_fails_exits_and_its_restart_loses_nothing(
    cluster: ClusterInfo, tmp_path: Path
) -> None:
    stack = ServiceStack(cluster, tmp_path, executor_id=f"crash-l-{unique_name('x')[-6:]}")
    stack.start()
    run = unique_name("crash-launcher")
    keys = [task_key(dag_id="crash", task_id=f"t{i}", run_id=run) for i in range(TASKS)]
    half = TASKS // 2
    try:
        async with SchedulerClient.connect(stack) as client:
            first = (client.launch(keys[i], annotations=pod_annotations(i)) for i in range(half))
            await asyncio.gather(*first)
            await until_created(client, keys[:half])  # so the restart has nothing to replay
            await asyncio.to_thread(stack.restart, "launcher", env={failpoints.ENV: "creator.worker=1"})
            second = [launch_request(keys[i], i) for i in range(half, TASKS)]
            reply = await client.launcher.BatchLaunchTasks(
                lpb.BatchLaunchTasksRequest(requests=second), timeout=30
            )
            assert all(r.HasField("response") and not r.response.already_existed for r in reply.results)

            # The first create of the batch kills the pod creator: the launcher must not go on
            # answering while it can no longer create pods.
            assert await stack.exited("launcher") != 0
            lines = crash_lines(stack, "launcher")
            assert len(lines) == 1, lines
            assert "pod-creator" in lines[0], lines[0]
            assert "creator.worker" in lines[0], lines[0]
            assert "never retrieved" not in stack.log_path("launcher").read_text()

            stack.env.pop("launcher")
            await asyncio.to_thread(stack.start, ("launcher",))
            await check_everything_finished_once(client, stack, cluster, keys)
    finally:
        stack.stop_all()


async def test_a_reconciler_whose_batch_commit_fails_exits_and_its_restart_loses_nothing(
    cluster: ClusterInfo, tmp_path: Path
) -> None:
    stack = ServiceStack(cluster, tmp_path, executor_id=f"crash-r-{unique_name('x')[-6:]}")
    stack.start(("launcher", "watcher"))
    run = unique_name("crash-reconciler")
    keys = [task_key(dag_id="crash", task_id=f"t{i}", run_id=run) for i in range(TASKS)]
    try:
        async with stack.channel("launcher") as channel:
            reply = await LauncherServiceStub(channel).BatchLaunchTasks(
                lpb.BatchLaunchTasksRequest(requests=[launch_request(key, i) for i, key in enumerate(keys)]),
                timeout=30,
            )
            assert all(r.HasField("response") for r in reply.results)
        # The reconciler comes up behind the work: its first batch (the launches, the watcher's
        # snapshot: pods running, some finished) is the commit that fails.
        stack.env["reconciler"] = {failpoints.ENV: "sqlite.commit=1"}
        stack.start(("reconciler",), wait=False)
        assert await stack.exited("reconciler") != 0
        lines = crash_lines(stack, "reconciler")
        assert len(lines) == 1, lines
        assert "engine" in lines[0], lines[0]
        assert "sqlite.commit" in lines[0], lines[0]
        assert "never retrieved" not in stack.log_path("reconciler").read_text()

        stack.env.pop("reconciler")
        await asyncio.to_thread(stack.start, ("reconciler",))
        async with SchedulerClient.connect(stack) as client:
            await check_everything_finished_once(client, stack, cluster, keys)
    finally:
        stack.stop_all()
