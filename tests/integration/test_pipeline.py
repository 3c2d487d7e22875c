"""Launcher -> Watcher -> Reconciler on the real control plane: each scenario ends in the right
state, exactly once per transition, with the failure details a scheduler needs."""

from __future__ import annotations

import asyncio

import pytest

from shepherd.v1 import reconciler_service_pb2 as rpb
from shepherd.v1 import task_pb2
from tests.helpers import task_key, unique_name
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
S = task_pb2


async def test_a_successful_task_goes_queued_running_succeeded_once_each(client: SchedulerClient) -> None:
    key = task_key(task_id=unique_name("ok"))
    await client.launch(key, annotations={"sim.shepherd.dev/run-time": "300ms"})
    task = await client.final(key)
    assert task.state == S.TASK_STATE_SUCCEEDED
    await asyncio.sleep(0.5)  # give any duplicate a chance to show up
    assert client.states(key) == [S.TASK_STATE_QUEUED, S.TASK_STATE_RUNNING, S.TASK_STATE_SUCCEEDED]


async def test_a_failing_task_reports_its_container_and_exit_code(client: SchedulerClient) -> None:
    key = task_key(task_id=unique_name("fail"))
    await client.launch(
        key,
        annotations={
            "sim.shepherd.dev/outcome": "fail",
            "sim.shepherd.dev/exit-code": "7",
            "sim.shepherd.dev/run-time": "300ms",
        },
    )
    task = await client.final(key)
    assert task.state == S.TASK_STATE_FAILED
    assert task.failure.reason == "PodFailed"
    assert task.failure.pod_phase == "Failed"
    assert (task.failure.container.name, task.failure.container.exit_code) == ("base", 7)
    assert task.failure.container.kind == S.CONTAINER_KIND_MAIN


async def test_an_image_pull_error_fails_the_task_without_waiting(client: SchedulerClient) -> None:
    key = task_key(task_id=unique_name("pull"))
    await client.launch(key, annotations={"sim.shepherd.dev/outcome": "waiting"})
    task = await client.final(key)
    assert task.failure.reason == "FatalContainerState"
    assert task.failure.container.reason == "ErrImagePull"


async def test_an_unschedulable_pod_times_out_pending_and_says_why(client: SchedulerClient) -> None:
    key = task_key(task_id=unique_name("unsched"))
    await client.launch(
        key, override="spec: {containers: [{name: base, resources: {requests: {cpu: '100000'}}}]}"
    )
    task = await client.final(key, timeout=60)
    assert task.state == S.TASK_STATE_FAILED
    assert task.failure.reason == "PendingTimeout"
    assert "Insufficient cpu" in task.failure.message


async def test_every_task_has_its_queued_time_when_launched_one_every_50_ms(client: SchedulerClient) -> None:
    # The watcher can report a pod before the launcher's stream reports its launch; the task then
    # starts from the pod event, and the launch event that follows must still bring the accept time.
    run = unique_name("queued-time")
    keys = [task_key(dag_id="queued_time", task_id=f"t{i}", run_id=run) for i in range(30)]
    accepted = {}
    for key in keys:
        reply = await client.launch(key, annotations={"sim.shepherd.dev/run-time": "300ms"})
        accepted[key.task_id] = reply.launch.accept_time
        await asyncio.sleep(0.05)
    finals = await asyncio.gather(*(client.final(key) for key in keys))
    stored = [(await client.reconciler.GetTask(rpb.GetTaskRequest(key=key), timeout=10)).task for key in keys]
    missing = [t.key.task_id for t in stored if t.queued_time != accepted[t.key.task_id]]
    assert missing == [], f"{len(missing)} of {len(keys)} stored tasks lack their queued_time"
    assert [t.state for t in finals] == [S.TASK_STATE_SUCCEEDED] * len(keys)
