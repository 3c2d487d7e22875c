"""A launcher killed soon after answering OK never runs a task twice when it comes back.

Its replay re-submits every launch whose outcome was not committed: the create was in flight, or its
CREATED was waiting to share a commit. By then the first pod may have run, finished and been
deleted by the reconciler, so a second create would succeed (201) instead of answering 409
AlreadyExists. The API server's audit log is the witness: at most one create per pod.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.taskstates import TERMINAL
from shepherd.v1 import launcher_service_pb2 as lpb
from shepherd.v1 import reconciler_service_pb2 as rpb
from shepherd.v1 import task_pb2
from tests.helpers import task_key, unique_name
from tests.helpers.audit import RECONCILER, AuditLog
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
TASKS = 20
# Pods that start after kwok's default 300 ms and succeed 1 s later: about 1.3 s in all, so they
# have finished (and been deleted) by the time the killed launcher comes back 3 s later.
QUICK = "metadata: {annotations: {sim.shepherd.dev/run-time: 1s}}"
FOREVER = "metadata: {annotations: {sim.shepherd.dev/outcome: run-forever}}"
RESTART_AFTER_S = 3.0


def launch_request(key: task_pb2.TaskKey, override: str = QUICK) -> lpb.LaunchTaskRequest:
    return lpb.LaunchTaskRequest(key=key, command=["run-task"], pod_override_yaml=override)


# When the launcher is killed. "right-after-ok" is the fault as reported: the creates may be in
# flight, done with their outcome waiting for a lazy commit, or not yet sent, as the race falls.
# "after-the-creates" pins the worst case down: every create has been answered (the audit log says
# so) and no outcome was stored (failpoint launcher.settle), so every launch is replayed although
# its pod was made, and by the restart has run, finished and been deleted.
KILL_MOMENTS = ["right-after-ok", "after-the-creates"]


@pytest.fixture(params=KILL_MOMENTS)
async def own_stack(
    request: pytest.FixtureRequest, cluster: ClusterInfo, tmp_path: Path
) -> AsyncIterator[tuple[ServiceStack, str]]:
    """A stack of its own (these tests kill its launcher), and when to kill it."""
    stack = ServiceStack(cluster, tmp_path, executor_id=f"replay-{unique_name('x')[-8:]}")
    if request.param == "after-the-creates":
        stack.env["launcher"] = {"SHEPHERD_FAILPOINTS": "launcher.settle=p1"}
    await asyncio.to_thread(stack.start)
    yield stack, request.param
    await asyncio.to_thread(stack.stop_all)


async def restart_launcher(stack: ServiceStack, *, after_s: float) -> None:
    await asyncio.sleep(after_s)  # the fault's shape: the launcher stays down this long
    await asyncio.to_thread(stack.start, ("launcher",))


async def settled(client: SchedulerClient, keys: list[task_pb2.TaskKey]) -> list[lpb.Launch]:
    """The launches once none is ACCEPTED any more: the replay has decided each of them, and any
    create it made has been answered (so it is in the audit log)."""
    while True:
        try:
            launches = [
                (await client.launcher.GetLaunch(lpb.GetLaunchRequest(key=key), timeout=10)).launch
                for key in keys
            ]
        except grpc.aio.AioRpcError:
            launches = []  # the restarted launcher is not answering yet
        if launches and all(launch.state != lpb.LAUNCH_STATE_ACCEPTED for launch in launches):
            return launches
        await asyncio.sleep(0.2)


async def after_the_replay(
    client: SchedulerClient, audit: AuditLog, keys: list[task_pb2.TaskKey], run: str
) -> list[lpb.Launch]:
    """Barrier: every replayed launch is settled, then a sentinel launched afterwards has had its
    own create recorded. No create the replay was going to make can come after that."""
    launches = await asyncio.wait_for(settled(client, keys), 120)
    sentinel = task_key(dag_id="replay", task_id="sentinel", run_id=run)
    await client.launcher.LaunchTask(launch_request(sentinel), timeout=30)
    await audit.until_created(podmeta.pod_name(sentinel))
    await client.final(sentinel, timeout=120)
    return launches


def terminal_states(client: SchedulerClient, key: task_pb2.TaskKey) -> list[int]:
    return [state for state in client.states(key) if state in TERMINAL]


async def kill_then_restart(
    own_stack: tuple[ServiceStack, str],
    launch_all: Callable[[SchedulerClient, list[task_pb2.TaskKey]], Awaitable[None]],
) -> None:
    """Launch TASKS quick tasks, kill -9 the launcher the moment every launch has answered OK (or
    once every create is done, its outcome lost), restart it 3 s later with the same store; every
    task succeeds once, with one pod."""
    stack, kill_moment = own_stack
    audit = AuditLog.from_now(Cluster().audit_log)
    run = unique_name("replay")
    keys = [task_key(dag_id="replay", task_id=f"t{i}", run_id=run) for i in range(TASKS)]
    pods = {podmeta.pod_name(key) for key in keys}
    async with SchedulerClient.connect(stack) as client:
        await launch_all(client, keys)
        if kill_moment == "after-the-creates":
            await audit.until_created(*pods)
        stack.stop("launcher", sig=signal.SIGKILL)
        stack.env.clear()
        await restart_launcher(stack, after_s=RESTART_AFTER_S)

        tasks = await asyncio.gather(*(client.final(key, timeout=180) for key in keys))
        launches = await after_the_replay(client, audit, keys, run)

    creates = audit.creates(pods)
    twice = sorted(name for name, count in creates.items() if count > 1)
    assert not twice, f"{len(twice)} of {TASKS} tasks got a second pod after the restart: {twice[:5]}"
    # A create cut off by the kill can still make its pod without its 201 reaching the audit log
    # (seen under load), so the second witness is the reconciler's deletes: each pod of a
    # succeeded task is deleted once, and a second pod of the same name would be deleted too.
    deletes = await audit.until_called("delete", pods, user=RECONCILER)
    assert set(deletes.values()) == {1}, f"pods deleted more than once (two pods?): {deletes}"
    assert [t.state for t in tasks] == [task_pb2.TASK_STATE_SUCCEEDED] * TASKS
    assert all(terminal_states(client, key) == [task_pb2.TASK_STATE_SUCCEEDED] for key in keys)
    assert {lpb.LaunchState.Name(launch.state) for launch in launches} == {"LAUNCH_STATE_CREATED"}


async def test_a_launcher_killed_right_after_answering_creates_no_second_pod(
    own_stack: tuple[ServiceStack, str],
) -> None:
    async def launch_all(client: SchedulerClient, keys: list[task_pb2.TaskKey]) -> None:
        await asyncio.gather(*(client.launcher.LaunchTask(launch_request(k), timeout=30) for k in keys))

    await kill_then_restart(own_stack, launch_all)


async def test_a_launcher_killed_right_after_a_batch_creates_no_second_pod(
    own_stack: tuple[ServiceStack, str],
) -> None:
    async def launch_all(client: SchedulerClient, keys: list[task_pb2.TaskKey]) -> None:
        reply = await client.launcher.BatchLaunchTasks(
            lpb.BatchLaunchTasksRequest(requests=[launch_request(k) for k in keys]), timeout=30
        )
        assert all(result.HasField("response") for result in reply.results)

    await kill_then_restart(own_stack, launch_all)


async def test_a_task_cancelled_while_the_launcher_is_down_is_not_created_again(
    cluster: ClusterInfo, tmp_path: Path
) -> None:
    # The launcher first runs with its create outcomes lost before their commit (as when it dies
    # right after a create): its store keeps every launch ACCEPTED though the pods exist.
    stack = ServiceStack(
        cluster,
        tmp_path,
        executor_id=f"cancel-{unique_name('x')[-8:]}",
        env={"launcher": {"SHEPHERD_FAILPOINTS": "launcher.settle=p1"}},
    )
    await asyncio.to_thread(stack.start)
    audit = AuditLog.from_now(Cluster().audit_log)
    run = unique_name("cancel")
    keys = [task_key(dag_id="cancel", task_id=f"t{i}", run_id=run) for i in range(5)]
    try:
        async with SchedulerClient.connect(stack) as client:
            await asyncio.gather(
                *(client.launcher.LaunchTask(launch_request(k, FOREVER), timeout=30) for k in keys)
            )
            for key in keys:
                await client.reached(key, task_pb2.TASK_STATE_RUNNING, timeout=120)
            stack.stop("launcher", sig=signal.SIGKILL)

            # While the launcher is down, the scheduler cancels: the reconciler revokes the tasks
            # and deletes their pods.
            for key in keys:
                reply = await client.reconciler.CancelTask(rpb.CancelTaskRequest(key=key), timeout=30)
                assert reply.task.state == task_pb2.TASK_STATE_REVOKED
            pods = {podmeta.pod_name(key) for key in keys}

            async def deleted() -> None:
                while set(audit.calls("delete", pods, user=RECONCILER)) != pods:
                    await asyncio.sleep(0.2)

            await asyncio.wait_for(deleted(), 120)

            stack.env.clear()
            await restart_launcher(stack, after_s=0)
            launches = await after_the_replay(client, audit, keys, run)
    finally:
        await asyncio.to_thread(stack.stop_all)

    creates = audit.creates(pods)
    again = sorted(name for name, count in creates.items() if count > 1)
    assert not again, f"{len(again)} revoked tasks had their pod created again: {again}"
    assert set(creates) == pods
    assert all(terminal_states(client, key) == [task_pb2.TASK_STATE_REVOKED] for key in keys)
    assert {lpb.LaunchState.Name(launch.state) for launch in launches} == {"LAUNCH_STATE_CANCELLED"}
