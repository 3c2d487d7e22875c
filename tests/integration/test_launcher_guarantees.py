"""An acknowledged launch is never lost and never doubled: retries return the existing launch,
a launcher killed after answering OK creates the pod when it comes back, and a full queue says
RESOURCE_EXHAUSTED without dropping anything it had accepted."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.v1 import launcher_service_pb2 as pb
from shepherd.v1 import launcher_service_pb2_grpc as pb_grpc
from shepherd.v1 import task_pb2
from tests.helpers import task_key, unique_name
from tests.helpers.audit import AuditLog
from tests.helpers.cluster import unreachable_kubeconfig
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def request(key: object) -> pb.LaunchTaskRequest:
    return pb.LaunchTaskRequest(key=key, command=["run"])  # type: ignore[arg-type]


async def test_concurrent_retries_of_one_launch_make_exactly_one_pod(
    client: SchedulerClient, stack: ServiceStack
) -> None:
    key = task_key(task_id=unique_name("retry"))
    replies = await asyncio.gather(*(client.launcher.LaunchTask(request(key)) for _ in range(10)))
    assert len({r.launch.pod_name for r in replies}) == 1
    assert sum(not r.already_existed for r in replies) == 1
    await client.final(key)
    again = await client.launcher.LaunchTask(request(key))
    assert again.already_existed
    assert again.launch.state == pb.LAUNCH_STATE_CREATED
    assert client.states(key).count(client.states(key)[-1]) == 1


@pytest.fixture
async def offline_launcher(
    cluster: ClusterInfo, tmp_path: Path
) -> AsyncIterator[tuple[ServiceStack, pb_grpc.LauncherServiceStub]]:
    """A launcher whose API server is unreachable: it accepts launches but cannot create pods yet."""
    stack = ServiceStack(
        cluster,
        tmp_path,
        executor_id=f"offline-{unique_name('x')[-8:]}",
        flags={
            "launcher": [
                "--kubeconfig",
                unreachable_kubeconfig(cluster.kubeconfigs["launcher"], tmp_path),
                "--queue-limit",
                "3",
            ],
        },
    )
    stack.start(("launcher",), wait=False)
    # Up, and saying it cannot serve: its API server does not answer.
    await asyncio.to_thread(stack.wait_health, "launcher", NOT_SERVING)
    async with stack.channel("launcher") as channel:
        yield stack, pb_grpc.LauncherServiceStub(channel)
    await asyncio.to_thread(stack.stop_all)


async def test_a_launcher_killed_after_answering_ok_creates_the_pod_on_restart(
    offline_launcher: tuple[ServiceStack, pb_grpc.LauncherServiceStub], cluster: ClusterInfo
) -> None:
    stack, launcher = offline_launcher
    key = task_key(task_id=unique_name("durable"))
    reply = await launcher.LaunchTask(request(key))
    assert reply.launch.state == pb.LAUNCH_STATE_ACCEPTED

    audit = AuditLog.from_now(Cluster().audit_log)
    stack.stop("launcher", sig=signal.SIGKILL)  # no drain, no goodbye: the pod does not exist yet
    stack.flags["launcher"] = ["--kubeconfig", cluster.kubeconfigs["launcher"]]
    # The whole stack this time: the replay asks the reconciler whether the task ever had a pod.
    await asyncio.to_thread(stack.start)

    async with SchedulerClient.connect(stack) as client:
        task = await client.final(key, timeout=120)
        launch = (await client.launcher.GetLaunch(pb.GetLaunchRequest(key=key))).launch
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED
    assert launch.state == pb.LAUNCH_STATE_CREATED
    assert launch.pod_name == podmeta.pod_name(key)
    assert audit.creates({launch.pod_name}) == {launch.pod_name: 1}


async def test_a_full_queue_says_resource_exhausted_and_keeps_what_it_accepted(
    offline_launcher: tuple[ServiceStack, pb_grpc.LauncherServiceStub],
) -> None:
    _, launcher = offline_launcher
    accepted = [task_key(task_id=unique_name(f"q{i}")) for i in range(3)]
    for key in accepted:
        await launcher.LaunchTask(request(key))
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await launcher.LaunchTask(request(task_key(task_id=unique_name("overflow"))))
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for key in accepted:
        assert (
            await launcher.GetLaunch(pb.GetLaunchRequest(key=key))
        ).launch.state == pb.LAUNCH_STATE_ACCEPTED
    retried = await launcher.LaunchTask(request(accepted[0]))
    assert retried.already_existed  # a retry of an accepted launch is still answered, queue full or not
