"""Adoption: the pods of an executor declared dead are taken over (and its completed pods cleaned
up), while a live executor's pods are never touched."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest

from controlplane import ClusterInfo
from controlplane.stack import SERVICES, ServiceStack
from shepherd import podmeta
from shepherd.errors import field_violation
from shepherd.v1 import reconciler_service_pb2 as rpb
from shepherd.v1 import task_pb2
from tests.helpers import core_api, make_pod, task_key, unique_name
from tests.helpers.eventually import eventually_async
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
S = task_pb2


def phase(cluster: ClusterInfo, name: str) -> str:
    pods = (
        core_api(cluster.admin_kubeconfig)
        .list_namespaced_pod(cluster.namespace, field_selector=f"metadata.name={name}")
        .items
    )
    return str(pods[0].status.phase) if pods else ""


async def phase_is(cluster: ClusterInfo, name: str, wanted: str) -> bool:
    """phase() off the event loop, so the clients' streams keep being read while a test waits."""
    return await asyncio.to_thread(phase, cluster, name) == wanted


async def test_pods_of_a_dead_executor_are_adopted_and_live_ones_left_alone(
    client: SchedulerClient, stack: ServiceStack, cluster: ClusterInfo, tmp_path: Path
) -> None:
    dead = ServiceStack(cluster, tmp_path, executor_id=f"dead-{unique_name('x')[-8:]}")
    dead.start()
    running, pending, finishing = (
        task_key(task_id=unique_name(n)) for n in ("running", "pending", "finishing")
    )
    async with SchedulerClient.connect(dead) as old:
        await old.launch(running, annotations={"sim.shepherd.dev/outcome": "run-forever"})
        await old.launch(pending, annotations={"sim.shepherd.dev/start-delay": "600s"})
        await old.launch(finishing, annotations={"sim.shepherd.dev/run-time": "3s"})
        await old.reached(running, S.TASK_STATE_RUNNING)
        await old.reached(finishing, S.TASK_STATE_RUNNING)
    for name in reversed(SERVICES):
        dead.stop(name, sig=signal.SIGKILL)  # the executor dies without cleaning anything up
    await eventually_async(
        lambda: phase_is(cluster, podmeta.pod_name(finishing), "Succeeded"), what="the orphan to complete"
    )

    live_pod = unique_name("live")
    live_key = task_key(task_id=live_pod)
    admin = core_api(cluster.admin_kubeconfig)
    admin.create_namespaced_pod(
        cluster.namespace,
        make_pod(
            live_pod,
            labels=podmeta.task_labels(live_key, "live-executor"),
            annotations={**podmeta.task_annotations(live_key, 1), "sim.shepherd.dev/outcome": "run-forever"},
        ),
    )

    reply = await client.reconciler.AdoptTasks(rpb.AdoptTasksRequest(dead_executor_ids=[dead.executor_id]))
    assert sorted(k.task_id for k in reply.adopted) == sorted([running.task_id, pending.task_id])
    assert reply.cleaned_pods == 1

    await client.reached(running, S.TASK_STATE_RUNNING)
    assert client.states(running)[:2] == [S.TASK_STATE_ADOPTED, S.TASK_STATE_RUNNING]
    await client.reached(pending, S.TASK_STATE_ADOPTED)
    await eventually_async(
        lambda: phase_is(cluster, podmeta.pod_name(finishing), ""),
        what="the completed orphan to be cleaned up",
    )
    labels = admin.read_namespaced_pod(podmeta.pod_name(running), cluster.namespace).metadata.labels
    assert labels[podmeta.LABEL_EXECUTOR] == stack.executor_id
    live = admin.read_namespaced_pod(live_pod, cluster.namespace).metadata.labels
    assert live[podmeta.LABEL_EXECUTOR] == "live-executor"

    again = await client.reconciler.AdoptTasks(rpb.AdoptTasksRequest(dead_executor_ids=[dead.executor_id]))
    assert list(again.adopted) == []  # nothing left to adopt: adoption is safe to repeat

    for key in (running, pending):
        await client.reconciler.CancelTask(rpb.CancelTaskRequest(key=key))
    admin.delete_namespaced_pod(live_pod, cluster.namespace)


@pytest.mark.parametrize("ids", [[], ["own"]], ids=["none", "own-id"])
async def test_adoption_needs_dead_executor_ids_other_than_its_own(
    client: SchedulerClient, stack: ServiceStack, ids: list[str]
) -> None:
    ids = [stack.executor_id if i == "own" else i for i in ids]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.reconciler.AdoptTasks(rpb.AdoptTasksRequest(dead_executor_ids=ids))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (field_violation(err.value) or "").startswith("dead_executor_ids")
