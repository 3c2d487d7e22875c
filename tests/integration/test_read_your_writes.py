"""Read-your-writes: once LaunchTask has answered, the reconciler knows the task. GetTask finds it
and CancelTask cancels it even before the launcher's event stream has brought it over, so a
scheduler that believed a NOT_FOUND would never leak a running pod."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from controlplane import Cluster
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.taskstates import TERMINAL
from shepherd.v1 import reconciler_service_pb2 as rpb
from shepherd.v1 import task_pb2
from tests.helpers import core_api, task_key, unique_name
from tests.helpers.audit import LAUNCHER, RECONCILER, calls_by_pod
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
S = task_pb2
TASKS = 20
FOREVER = {"sim.shepherd.dev/outcome": "run-forever"}


def error_lines(stack: ServiceStack) -> int:
    path = stack.log_path("reconciler")
    return sum('"level":"error"' in line for line in path.read_text(errors="replace").splitlines())


async def test_a_launched_task_is_found_and_cancelled_at_once(
    client: SchedulerClient, stack: ServiceStack
) -> None:
    errors_before = error_lines(stack)
    run = unique_name("ryw")
    looked_up = [task_key(dag_id="ryw", task_id=f"get{i}", run_id=run) for i in range(TASKS)]
    cancelled = [task_key(dag_id="ryw", task_id=f"cancel{i}", run_id=run) for i in range(TASKS)]

    not_found: list[str] = []
    for key in looked_up:
        await client.launch(key, annotations=FOREVER)
        try:
            reply = await client.reconciler.GetTask(rpb.GetTaskRequest(key=key), timeout=30)
        except grpc.aio.AioRpcError as err:
            not_found.append(f"{key.task_id}: {err.code().name} {err.details()}")
            continue
        assert reply.task.key == key
        assert reply.task.state in (S.TASK_STATE_QUEUED, S.TASK_STATE_RUNNING)

    refused: list[str] = []
    for key in cancelled:
        await client.launch(key, annotations=FOREVER)
        try:
            reply = await client.reconciler.CancelTask(
                rpb.CancelTaskRequest(key=key, reason="changed my mind"), timeout=30
            )
        except grpc.aio.AioRpcError as err:
            refused.append(f"{key.task_id}: {err.code().name} {err.details()}")
            continue
        assert reply.task.state == S.TASK_STATE_REVOKED

    # Clean up the looked-up ones too (and see them cancelled), then a sentinel: launched after
    # every cancel, its pod's whole life (created, ran, deleted) shows the launcher's creates and
    # the reconciler's deletes have moved past the cancelled tasks.
    for key in looked_up:
        with_reason = rpb.CancelTaskRequest(key=key, reason="cleanup")
        await client.reconciler.CancelTask(with_reason, timeout=30)
    sentinel = task_key(dag_id="ryw", task_id="sentinel", run_id=run)
    await client.launch(sentinel, annotations={"sim.shepherd.dev/run-time": "200ms"})
    assert (await client.final(sentinel)).state == S.TASK_STATE_SUCCEEDED

    assert not not_found, f"GetTask right after LaunchTask: {len(not_found)}/{TASKS} failed: {not_found}"
    assert not refused, f"CancelTask right after LaunchTask: {len(refused)}/{TASKS} failed: {refused}"

    keys = looked_up + cancelled
    finals = await asyncio.gather(*(client.final(k, timeout=60) for k in keys))
    assert {t.state for t in finals} == {S.TASK_STATE_REVOKED}
    for key in keys:
        terminal = [s for s in client.states(key) if s in TERMINAL]
        assert terminal == [S.TASK_STATE_REVOKED], (key.task_id, client.states(key))

    # Every pod was either never created or created once and deleted once, and none is left.
    names = {podmeta.pod_name(k) for k in keys}
    admin = core_api(stack.cluster.admin_kubeconfig)

    def left() -> set[str]:
        pods = admin.list_namespaced_pod(
            stack.cluster.namespace, label_selector=f"{podmeta.LABEL_RUN_ID}={podmeta.safe_label_value(run)}"
        ).items
        return {p.metadata.name for p in pods if p.metadata.deletion_timestamp is None} & names

    for _ in range(600):
        if not left():
            break
        await asyncio.sleep(0.1)
    assert not left(), f"pods of cancelled tasks still exist: {sorted(left())}"
    audit = Cluster().audit_log
    creates = calls_by_pod(audit, "create", LAUNCHER, names)
    deletes = calls_by_pod(audit, "delete", RECONCILER, names)
    assert set(creates.values()) <= {1}, creates
    assert deletes == creates, {"creates": creates, "deletes": deletes}

    # A refused or raced cancel is not an error: nothing was logged at error level.
    assert error_lines(stack) == errors_before
