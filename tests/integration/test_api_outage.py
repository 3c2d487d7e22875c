"""An API-server outage does not fail the tasks the launcher accepted: their creates are retried
until the API server answers again (bounded only by the queued deadline), each task gets exactly
one pod, and meanwhile the launcher says NOT_SERVING in its gRPC health, SERVING again after."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.taskstates import TERMINAL
from shepherd.v1 import launcher_service_pb2 as lpb
from shepherd.v1 import task_pb2
from tests.helpers import task_key, unique_name
from tests.helpers.audit import AuditLog
from tests.helpers.cluster import spare_settings
from tests.helpers.scheduler import SchedulerClient
from tests.helpers.streams import Collector

pytestmark = pytest.mark.integration
TASKS = 20
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# With creates retried at most 2 s apart, the old count-based budget (8 retries) was spent within
# about 13 s; this outage outlasts it, so only retrying by time gets the tasks through.
BACKOFF_CAP_S = 2
OUTAGE_S = 20


@pytest.fixture(scope="module")
def outage_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, ClusterInfo]]:
    """A throw-away control plane (not the shared one): this test stops its API server."""
    spare = Cluster(spare_settings(tmp_path_factory.mktemp("outage")))
    info = spare.up()
    yield spare, info
    spare.down()


async def test_tasks_accepted_during_an_api_outage_all_run_once_it_is_over(
    outage_cluster: tuple[Cluster, ClusterInfo], tmp_path: Path
) -> None:
    spare, info = outage_cluster
    stack = ServiceStack(
        info,
        tmp_path,
        executor_id="outage",
        flags={"launcher": ["--create-backoff-cap-s", str(BACKOFF_CAP_S)]},
    )
    await asyncio.to_thread(stack.start)
    audit = AuditLog.from_now(spare.audit_log)
    run = unique_name("outage")
    keys = [task_key(dag_id="outage", task_id=f"t{i}", run_id=run) for i in range(TASKS)]
    try:
        async with (
            stack.channel("launcher") as channel,
            SchedulerClient.connect(stack) as client,
        ):
            health = Collector(
                health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            ).start()
            await health.until(lambda seen: seen and seen[-1].status == SERVING, what="launcher SERVING")

            await asyncio.to_thread(spare.stop_daemon, "kube-apiserver")
            replies = await asyncio.gather(
                *(
                    client.launcher.LaunchTask(
                        lpb.LaunchTaskRequest(key=key, command=["run-task"]), timeout=30
                    )
                    for key in keys
                )
            )
            assert {r.launch.state for r in replies} == {lpb.LAUNCH_STATE_ACCEPTED}
            await asyncio.sleep(OUTAGE_S)  # the fault: the API server stays away this long
            await asyncio.to_thread(spare.start_daemon, "kube-apiserver")

            tasks = await asyncio.gather(*(client.final(key, timeout=240) for key in keys))
            await health.until(
                lambda seen: seen[-1].status == SERVING, what="launcher SERVING after the outage"
            )
            statuses = [item.status for item in health.items]
            await health.stop()
    finally:
        await asyncio.to_thread(stack.stop_all)

    failures = [f"{t.failure.reason}: {t.failure.message}" for t in tasks if t.failure.reason]
    assert [t.state for t in tasks] == [task_pb2.TASK_STATE_SUCCEEDED] * TASKS, failures[:3]
    for key in keys:
        assert [s for s in client.states(key) if s in TERMINAL] == [task_pb2.TASK_STATE_SUCCEEDED]
    pods = {podmeta.pod_name(key) for key in keys}
    assert audit.creates(pods) == dict.fromkeys(pods, 1)
    # Health went NOT_SERVING during the outage and came back to SERVING by itself.
    first_down = statuses.index(NOT_SERVING) if NOT_SERVING in statuses else None
    assert first_down is not None, f"the launcher never said NOT_SERVING: {statuses}"
    assert SERVING in statuses[first_down:], statuses
