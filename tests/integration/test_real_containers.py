"""Shepherd's tasks on the real node: what a task's failure details and logs say comes from real
containers (runc, cgroups, containerd's image store), not from simulated pod statuses.

Tasks use the `real` pod template (deploy/pod-templates/real.yaml): busybox as uid 1000.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from kubernetes.client.exceptions import ApiException

from controlplane import Cluster, ClusterInfo
from controlplane.stack import ServiceStack
from shepherd.v1 import reconciler_service_pb2 as rpb
from shepherd.v1 import task_pb2
from tests.helpers import core_api, task_key, unique_name
from tests.helpers.audit import RECONCILER, AuditLog
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def real_stack(
    cluster: ClusterInfo, real_node: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceStack]:
    """The three services with a pending timeout long enough for a real sandbox to start on a
    busy two-core machine (the session stack's 4 s is meant for kwok)."""
    services = ServiceStack(
        cluster,
        tmp_path_factory.mktemp("real-stack"),
        executor_id=f"real-{uuid.uuid4().hex[:8]}",
        flags={"reconciler": ["--pending-timeout-s", "120"]},
    )
    services.start()
    yield services
    services.stop_all()


@pytest.fixture
async def real(real_stack: ServiceStack) -> AsyncIterator[SchedulerClient]:
    async with SchedulerClient.connect(real_stack) as scheduler:
        yield scheduler


def shell(script: str) -> list[str]:
    return ["sh", "-c", script]


async def test_a_real_exit_code_and_reason_reach_the_failure_details(real: SchedulerClient) -> None:
    key = task_key(task_id=unique_name("exit"))
    await real.launch(key, template="real", command=shell("echo working; exit 42"))
    task = await real.final(key, timeout=120)
    assert task.state == task_pb2.TASK_STATE_FAILED
    # The task is decided when `base` terminates (statemachine._base_ended), which a real kubelet
    # may report before it moves the pod's phase on: the details carry the phase of that event.
    assert task.failure.reason == "PodFailed"
    assert task.failure.pod_phase in ("Running", "Failed")
    container = task.failure.container
    assert (container.name, container.phase, container.exit_code, container.reason) == (
        "base",
        task_pb2.CONTAINER_PHASE_TERMINATED,
        42,
        "Error",
    )
    assert "exited with code 42" in task.failure.message


async def test_a_container_over_its_memory_limit_is_reported_oom_killed(real: SchedulerClient) -> None:
    key = task_key(task_id=unique_name("oom"))
    override = "spec: {containers: [{name: base, resources: {limits: {memory: 24Mi}}}]}"
    # The string doubles until the cgroup's limit stops it: the kernel's OOM killer, not a shell error.
    await real.launch(key, template="real", override=override, command=shell("x=a; while :; do x=$x$x; done"))
    task = await real.final(key, timeout=120)
    assert task.state == task_pb2.TASK_STATE_FAILED
    container = task.failure.container
    assert (container.name, container.reason, container.exit_code) == ("base", "OOMKilled", 137)
    assert "OOMKilled" in task.failure.message


async def test_a_missing_image_fails_the_task_with_the_real_pull_error(real: SchedulerClient) -> None:
    key = task_key(task_id=unique_name("pull"))
    override = "spec: {containers: [{name: base, image: shepherd.local/no-such-image:v1}]}"
    await real.launch(key, template="real", override=override, command=shell("true"))
    task = await real.final(key, timeout=120)
    assert task.state == task_pb2.TASK_STATE_FAILED
    assert (task.failure.reason, task.failure.pod_phase) == ("FatalContainerState", "Pending")
    container = task.failure.container
    assert (container.phase, container.reason) == (task_pb2.CONTAINER_PHASE_WAITING, "ErrImagePull")
    # containerd's own words about the image it could not find.
    assert "shepherd.local/no-such-image:v1" in container.message


async def test_task_logs_are_the_real_tail_of_the_base_container(real: SchedulerClient) -> None:
    key = task_key(task_id=unique_name("tail"))
    await real.launch(
        key, template="real", command=shell("for i in $(seq 1 50); do echo line $i; done; exit 1")
    )
    task = await real.final(key, timeout=120)
    assert task.state == task_pb2.TASK_STATE_FAILED  # failed pods are kept, so their log is still there
    chunks = [
        r.data async for r in real.reconciler.GetTaskLogs(rpb.GetTaskLogsRequest(key=key, tail_lines=3))
    ]
    assert b"".join(chunks) == b"line 48\nline 49\nline 50\n"


async def test_task_logs_follow_a_running_task_live(real: SchedulerClient) -> None:
    key = task_key(task_id=unique_name("follow"))
    await real.launch(
        key, template="real", command=shell("i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.2; done")
    )
    await real.reached(key, task_pb2.TASK_STATE_RUNNING, timeout=120)
    received = b""
    stream = real.reconciler.GetTaskLogs(rpb.GetTaskLogsRequest(key=key, tail_lines=1, follow=True))
    async for response in stream:
        received += response.data
        if b"tick" in received and received.count(b"\n") >= 3:
            break
    stream.cancel()
    # Lines kept arriving on one open stream while the task ran: nothing has ended it yet.
    assert task_pb2.TASK_STATE_RUNNING in real.states(key)
    assert not any(s in real.states(key) for s in (task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_FAILED))
    numbers = [int(line.split()[1]) for line in received.decode().splitlines() if line.startswith("tick")]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    await real.reconciler.CancelTask(rpb.CancelTaskRequest(key=key))
    assert (await real.final(key, timeout=120)).state == task_pb2.TASK_STATE_REVOKED


async def test_a_follow_stream_ends_when_the_task_ends(real: SchedulerClient) -> None:
    key = task_key(task_id=unique_name("ends"))
    await real.launch(key, template="real", command=shell("echo first; sleep 2; echo last; exit 5"))
    await real.reached(key, task_pb2.TASK_STATE_RUNNING, timeout=120)
    try:
        chunks = [
            r.data
            async for r in real.reconciler.GetTaskLogs(
                rpb.GetTaskLogsRequest(key=key, tail_lines=100, follow=True), timeout=120
            )
        ]
    except grpc.aio.AioRpcError as err:
        raise AssertionError(f"the follow stream failed: {err.code()} {err.details()}") from err
    assert b"".join(chunks) == b"first\nlast\n"
    assert (await real.final(key, timeout=120)).state == task_pb2.TASK_STATE_FAILED


async def _gone(namespace: str, name: str) -> None:
    api = core_api(Cluster().info().admin_kubeconfig)

    def exists() -> bool:
        try:
            api.read_namespaced_pod(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    async def wait() -> None:
        while await asyncio.to_thread(exists):
            await asyncio.sleep(0.2)

    await asyncio.wait_for(wait(), timeout=120)


async def _logs(
    real: SchedulerClient, key: task_pb2.TaskKey, tail_lines: int, *, follow: bool = False
) -> bytes:
    stream = real.reconciler.GetTaskLogs(
        rpb.GetTaskLogsRequest(key=key, tail_lines=tail_lines, follow=follow), timeout=60
    )
    return b"".join([r.data async for r in stream])


async def test_the_log_tail_of_a_finished_task_outlives_its_deleted_pod(real: SchedulerClient) -> None:
    audit = AuditLog.from_now(Cluster().audit_log)
    key = task_key(task_id=unique_name("kept"))
    await real.launch(key, template="real", command=shell("for i in $(seq 1 150); do echo line $i; done"))
    task = await real.final(key, timeout=120)
    assert task.state == task_pb2.TASK_STATE_SUCCEEDED  # so its pod is deleted (the default)
    # The API server's own record: the reconciler deleted the pod, once.
    deletes = await audit.until_called("delete", {task.pod_name}, user=RECONCILER)
    assert deletes == {task.pod_name: 1}
    await _gone(task.namespace, task.pod_name)  # not only deleting (graceful), but gone
    # The pod is gone, yet the tail is there: the last lines asked for ...
    assert await _logs(real, key, 3) == b"line 148\nline 149\nline 150\n"
    # ... at most the lines kept (100 by default) however many are asked for ...
    kept = (await _logs(real, key, 10_000)).decode().splitlines()
    assert kept == [f"line {i}" for i in range(51, 151)]
    # ... and a follow of a finished task ends after the tail instead of waiting for more.
    followed = await asyncio.wait_for(_logs(real, key, 2, follow=True), timeout=60)
    assert followed == b"line 149\nline 150\n"
    # The API server's record of the reads: the one the clean-up made (ours came after the pod).
    reads = [
        e
        for e in audit.entries()
        if (e.get("objectRef") or {}).get("subresource") == "log"
        and (e.get("objectRef") or {}).get("name") == task.pod_name
        and e.get("stage") == "ResponseComplete"
        and (e.get("responseStatus") or {}).get("code") == 200
    ]
    assert len(reads) == 1


async def test_a_missing_images_failure_details_carry_the_pull_failure_event(real: SchedulerClient) -> None:
    key = task_key(task_id=unique_name("pullevent"))
    override = "spec: {containers: [{name: base, image: shepherd.local/no-such-image:v2}]}"
    await real.launch(key, template="real", override=override, command=shell("true"))
    task = await real.final(key, timeout=120)
    assert (task.state, task.failure.reason) == (task_pb2.TASK_STATE_FAILED, "FatalContainerState")

    async def events() -> list[task_pb2.KubernetesEvent]:
        # The events are read from the API once the failed pod is cleaned up, after the transition.
        while True:
            got = (await real.reconciler.GetTask(rpb.GetTaskRequest(key=key))).task.failure.events
            if any(e.reason == "Failed" for e in got):
                return list(got)
            await asyncio.sleep(0.2)

    found = await asyncio.wait_for(events(), timeout=60)
    pulls = [e for e in found if e.reason == "Failed" and "shepherd.local/no-such-image:v2" in e.message]
    assert pulls, [f"{e.reason}: {e.message}" for e in found]
    assert (pulls[0].type, pulls[0].source) == ("Warning", "kubelet")
    assert pulls[0].count >= 1
    assert pulls[0].HasField("last_time")
    # Listed oldest first, and as many as the bound allows (10 by default).
    times = [e.last_time.ToNanoseconds() for e in found]
    assert times == sorted(times)
    assert len(found) <= 10
