"""Bad input gets a precise status naming the field, and disturbs nothing: after every refusal
the same service still launches and reports a task normally."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor

from controlplane.stack import ServiceStack
from shepherd.errors import field_violation
from shepherd.v1 import launcher_service_pb2 as lpb
from shepherd.v1 import launcher_service_pb2_grpc, task_pb2, watcher_service_pb2, watcher_service_pb2_grpc
from shepherd.v1 import reconciler_service_pb2 as rpb
from tests.helpers import task_key, unique_name
from tests.helpers.enums import every_rpc_enum_case, path_name, with_enum
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
INVALID = grpc.StatusCode.INVALID_ARGUMENT
GOOD_KEY = {"dag_id": "d", "task_id": "t", "run_id": "r", "try_number": 1, "map_index": -1}


def launch(**fields: Any) -> lpb.LaunchTaskRequest:
    key = {**GOOD_KEY, **fields.pop("key", {})}
    return lpb.LaunchTaskRequest(
        key=task_pb2.TaskKey(**key), command=fields.pop("command", ["run"]), **fields
    )


LAUNCH_CASES = [
    (launch(key={"dag_id": ""}), "key.dag_id"),
    (launch(key={"task_id": "x" * 251}), "key.task_id"),
    (launch(key={"run_id": "bad\nrun"}), "key.run_id"),
    (launch(key={"try_number": 0}), "key.try_number"),
    (launch(key={"map_index": -2}), "key.map_index"),
    (launch(key={"resumption": 1_000_001}), "key.resumption"),
    (launch(command=[]), "command"),
    (launch(command=["ok", ""]), "command[1]"),
    (launch(pod_override_yaml="spec: [unclosed"), "pod_override_yaml"),
    (launch(pod_override_yaml="- not a mapping"), "pod_override_yaml"),
    (launch(pod_override_yaml="metadata: {name: mine}"), "pod_override_yaml.metadata.name"),
    (launch(pod_override_yaml="metadata: {namespace: Not_A_Name}"), "pod_override_yaml.metadata.namespace"),
    (launch(pod_override_yaml="spec: {nodeSelectr: {a: b}}"), "pod_override_yaml.spec.nodeSelectr"),
    (launch(template_yaml="kind: Service"), "template_yaml.kind"),
    (launch(template_yaml="spec: {containers: [{name: base}]}"), "pod.spec.containers[base].image"),
    (launch(template_name="default", template_yaml="kind: Pod"), "template_yaml"),
]


@pytest.mark.parametrize(("bad", "field"), LAUNCH_CASES, ids=[f for _, f in LAUNCH_CASES])
async def test_a_bad_launch_is_refused_naming_the_field(
    client: SchedulerClient, bad: lpb.LaunchTaskRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.launcher.LaunchTask(bad)
    assert err.value.code() == INVALID
    assert field_violation(err.value) == field
    assert field in (err.value.details() or "")


async def test_a_launch_without_a_key_is_refused(client: SchedulerClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.launcher.LaunchTask(lpb.LaunchTaskRequest(command=["run"]))
    assert (err.value.code(), field_violation(err.value)) == (INVALID, "key")


async def test_an_unknown_template_is_not_found(client: SchedulerClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.launcher.LaunchTask(launch(template_name="no-such-template"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "template_name" in (err.value.details() or "")


async def test_a_batch_reports_each_bad_item_by_its_path_and_accepts_the_rest(
    client: SchedulerClient,
) -> None:
    good = launch(
        key={"task_id": unique_name("batch")},
        pod_override_yaml="metadata: {annotations: {sim.shepherd.dev/run-time: 200ms}}",
    )
    reply = await client.launcher.BatchLaunchTasks(
        lpb.BatchLaunchTasksRequest(
            requests=[good, launch(key={"dag_id": ""}), launch(template_name="missing")]
        )
    )
    ok, bad_key, bad_template = reply.results
    assert ok.response.launch.state == lpb.LAUNCH_STATE_ACCEPTED
    assert (bad_key.error.code, bad_key.error.field) == (INVALID.value[0], "requests[1].key.dag_id")
    assert (bad_template.error.code, bad_template.error.field) == (
        grpc.StatusCode.NOT_FOUND.value[0],
        "requests[2].template_name",
    )
    assert (await client.final(good.key)).state == task_pb2.TASK_STATE_SUCCEEDED


async def test_an_empty_batch_is_refused(client: SchedulerClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.launcher.BatchLaunchTasks(lpb.BatchLaunchTasksRequest())
    assert (err.value.code(), field_violation(err.value)) == (INVALID, "requests")


async def test_unknown_tasks_are_not_found_everywhere(stack: ServiceStack, client: SchedulerClient) -> None:
    unknown = task_key(task_id=unique_name("nobody"))
    # CancelLaunch is the reconciler's to call (the default policy): the test calls it as the reconciler.
    async with stack.channel("launcher", identity="reconciler") as channel:
        as_reconciler = launcher_service_pb2_grpc.LauncherServiceStub(channel)
        for call in (
            client.launcher.GetLaunch(lpb.GetLaunchRequest(key=unknown)),
            as_reconciler.CancelLaunch(lpb.CancelLaunchRequest(key=unknown)),
            client.reconciler.GetTask(rpb.GetTaskRequest(key=unknown)),
            client.reconciler.CancelTask(rpb.CancelTaskRequest(key=unknown)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (rpb.ListTasksRequest(page_size=-1), "page_size"),
        (rpb.ListTasksRequest(page_size=5000), "page_size"),
        (rpb.ListTasksRequest(page_token="%%%not-base64"), "page_token"),
        (rpb.ListTasksRequest(dag_id="x" * 300), "dag_id"),
    ],
    ids=["negative-page", "huge-page", "bad-token", "long-dag-id"],
)
async def test_bad_list_requests_name_the_field(
    client: SchedulerClient, bad: rpb.ListTasksRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.reconciler.ListTasks(bad)
    assert (err.value.code(), field_violation(err.value)) == (INVALID, field)


async def test_bad_keys_are_refused_by_the_reconciler(client: SchedulerClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.reconciler.GetTask(rpb.GetTaskRequest(key=task_pb2.TaskKey(dag_id="d")))
    assert (err.value.code(), field_violation(err.value)) == (INVALID, "key.task_id")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.reconciler.CancelTask(rpb.CancelTaskRequest(key=task_key(), reason="x" * 2000))
    assert (err.value.code(), field_violation(err.value)) == (INVALID, "reason")


async def test_a_watcher_cursor_from_another_run_is_out_of_range(stack: ServiceStack) -> None:
    async with stack.channel("watcher", identity="reconciler") as channel:
        stub = watcher_service_pb2_grpc.WatcherServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.WatchPodEvents(watcher_service_pb2.WatchPodEventsRequest(after_cursor=12345)):
                pass
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "snapshot" in (err.value.details() or "")


async def test_after_all_that_the_services_still_work(client: SchedulerClient) -> None:
    key = task_key(task_id=unique_name("still-ok"))
    await client.launch(key, annotations={"sim.shepherd.dev/run-time": "200ms"})
    assert (await client.final(key)).state == task_pb2.TASK_STATE_SUCCEEDED


ENUM_CASES = list(every_rpc_enum_case())
RECONCILER_ONLY = {"CancelLaunch", "RelaunchTask", "WatchLaunchEvents"}


@pytest.mark.parametrize(
    ("service", "method", "kind", "request_type", "path"),
    ENUM_CASES,
    ids=[f"{m}.{path_name(t, p)}" for _, m, _, t, p in ENUM_CASES],
)
@pytest.mark.parametrize("number", [99, -5])
async def test_an_undefined_enum_value_is_refused_by_every_rpc(
    stack: ServiceStack,
    service: str,
    method: str,
    kind: str,
    request_type: Descriptor,
    path: tuple[str, ...],
    number: int,
) -> None:
    """Every enum field of every request of the three services, found from the descriptors."""
    name = service.rsplit(".", 1)[1].removesuffix("Service").lower()
    request = with_enum(request_type, path, number)
    # As a caller the default policy lets in, so the enum check (not authorization) answers.
    identity = "reconciler" if name == "watcher" or method in RECONCILER_ONLY else "scheduler"
    async with stack.channel(name, identity=identity) as channel:
        call = getattr(channel, kind)(
            f"/{service}/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=lambda b: b,
        )

        async def send() -> None:
            if kind == "unary_stream":
                async for _ in call(request, timeout=10):
                    pass
            else:
                await call(request, timeout=10)

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await send()
    assert (err.value.code(), field_violation(err.value)) == (INVALID, path_name(request_type, path))
    assert str(number) in (err.value.details() or "")
