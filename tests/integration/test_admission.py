"""Secure by default, on the real API server: every probe of the pod policy is refused with the
right status and field path, nothing is stored or created for it, hostile documents hurt nothing,
and the pod a compliant launch creates is the one RenderPod shows."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane import Cluster, ClusterInfo
from controlplane.stack import SERVICES, ServiceStack
from shepherd import channels, podmeta
from shepherd.errors import field_violation
from shepherd.kube import ApiError, KubeClient, load_connection
from shepherd.v1 import (
    launcher_service_pb2,
    launcher_service_pb2_grpc,
    reconciler_service_pb2,
    task_pb2,
    watcher_service_pb2,
)
from tests.helpers import core_api, task_key, unique_name
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
lpb = launcher_service_pb2
DENIED, INVALID = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT
OV = "pod_override_yaml"
RUN_FOREVER = "metadata: {annotations: {sim.shepherd.dev/outcome: run-forever}}"
ALIAS_BOMB = "".join(
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + ALIAS_BOMB
ISSUE_POD = (
    "spec:\n"
    "  serviceAccountName: reconciler\n"
    "  automountServiceAccountToken: true\n"
    "  hostPID: true\n"
    "  hostNetwork: true\n"
    "  volumes: [{name: root, hostPath: {path: /}}]\n"
    "  containers:\n"
    "  - name: base\n"
    "    securityContext: {privileged: true}\n"
    "    volumeMounts: [{name: root, mountPath: /host}]\n"
)
# (override, status, field) for the launcher with the default policy.
PROBES = [
    (
        "spec: {containers: [{name: base, securityContext: {privileged: true}}]}",
        DENIED,
        f"{OV}.spec.containers[base].securityContext.privileged",
    ),
    ("spec: {hostPID: true}", DENIED, f"{OV}.spec.hostPID"),
    ("spec: {hostNetwork: true}", DENIED, f"{OV}.spec.hostNetwork"),
    ("spec: {hostIPC: true}", DENIED, f"{OV}.spec.hostIPC"),
    ("spec: {volumes: [{name: root, hostPath: {path: /}}]}", DENIED, f"{OV}.spec.volumes[root].hostPath"),
    ("spec: {serviceAccountName: reconciler}", DENIED, f"{OV}.spec.serviceAccountName"),
    ("spec: {automountServiceAccountToken: true}", DENIED, f"{OV}.spec.automountServiceAccountToken"),
    ("metadata: {namespace: not-watched}", DENIED, f"{OV}.metadata.namespace"),
    (ISSUE_POD, DENIED, f"{OV}.spec.serviceAccountName"),
    ("spec: {nodeSelectr: {pool: batch}}", INVALID, f"{OV}.spec.nodeSelectr"),
    (
        "spec: {containers: [{name: base, imagePullPolicie: Always}]}",
        INVALID,
        f"{OV}.spec.containers[base].imagePullPolicie",
    ),
    (ALIAS_BOMB, INVALID, f"{OV}.a"),
    ("[" * 30000 + "]" * 30000, INVALID, OV + "[0]" * 32),
    ("{a: " * 50000 + "1" + "}" * 50000, INVALID, OV + ".a" * 32),
    ("metadata: {annotations: [1, 2]}", INVALID, f"{OV}.metadata.annotations"),
    ("spec: {containers: [null]}", INVALID, f"{OV}.spec.containers[0]"),
    (
        "spec: {activeDeadlineSeconds: 99999999999999999999999999999999}",
        INVALID,
        f"{OV}.spec.activeDeadlineSeconds",
    ),
    ("spec: {nodeSelector: !!set {a, b}}", INVALID, f"{OV}.spec.nodeSelector"),
    ("spec: &s {a: *s}", INVALID, f"{OV}.spec"),
]
# (override, command, field) for a launcher whose allow-list is run-task and python.
COMMAND_PROBES = [
    ("", ["sh", "-c", "id"], "command[0]"),
    (
        "spec: {containers: [{name: base, command: [sh, -c]}]}",
        ["run-task"],
        f"{OV}.spec.containers[base].command[0]",
    ),
    (
        "spec: {containers: [{name: base, args: [sh, -c, id]}]}",
        ["run-task"],
        f"{OV}.spec.containers[base].args[0]",
    ),
    (
        "spec: {initContainers: [{name: setup, image: busybox, command: [wget, http://x]}]}",
        ["run-task"],
        f"{OV}.spec.initContainers[setup].command[0]",
    ),
    (
        "spec: {containers: [{name: side, image: busybox, args: [nc, -l, '80']}]}",
        ["run-task"],
        f"{OV}.spec.containers[side].args[0]",
    ),
]


def launch(override: str = "", command: list[str] | None = None, **fields: Any) -> lpb.LaunchTaskRequest:
    return lpb.LaunchTaskRequest(
        key=task_key(task_id=unique_name("adm")),
        command=command or ["run-task"],
        pod_override_yaml=override,
        **fields,
    )


@pytest.fixture(scope="module")
def guarded(cluster: ClusterInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    """A launcher alone, with an allow-list of commands (its refusals need nothing else)."""
    stack = ServiceStack(
        cluster,
        tmp_path_factory.mktemp("guarded"),
        executor_id=f"guard-{uuid.uuid4().hex[:8]}",
        flags={"launcher": ["--allowed-commands", "run-task,python"]},
    )
    stack.start(("launcher",))
    yield stack
    stack.stop_all()


@pytest.fixture
async def guarded_launcher(
    guarded: ServiceStack,
) -> AsyncIterator[launcher_service_pb2_grpc.LauncherServiceStub]:
    async with channels.aio_channel(guarded.address("launcher")) as channel:
        yield launcher_service_pb2_grpc.LauncherServiceStub(channel)


def creates_of(pods: set[str]) -> list[str]:
    """Pod creates the API server answered, for these pod names, from its audit log."""
    found = []
    for line in Cluster().audit_log.read_text().splitlines():
        entry = json.loads(line)
        ref = entry.get("objectRef") or {}
        if entry.get("verb") == "create" and ref.get("resource") == "pods" and ref.get("name") in pods:
            found.append(ref["name"])
    return found


async def refused(
    stub: launcher_service_pb2_grpc.LauncherServiceStub, request: lpb.LaunchTaskRequest
) -> tuple[grpc.StatusCode, str | None]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.LaunchTask(request, timeout=30)
    return err.value.code(), field_violation(err.value)


async def test_every_probe_is_refused_and_leaves_nothing_behind(client: SchedulerClient) -> None:
    requests = [launch(override) for override, _, _ in PROBES]
    outcomes = await asyncio.gather(*(refused(client.launcher, r) for r in requests))
    assert outcomes == [(code, field) for _, code, field in PROBES]
    for request in requests:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.launcher.GetLaunch(lpb.GetLaunchRequest(key=request.key))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # nothing stored, so nothing to create
    # Barrier: a task launched afterwards has finished, so the creator has moved past the probes.
    sentinel = task_key(task_id=unique_name("sentinel"))
    await client.launch(sentinel, annotations={"sim.shepherd.dev/run-time": "200ms"})
    assert (await client.final(sentinel)).state == task_pb2.TASK_STATE_SUCCEEDED
    assert creates_of({podmeta.pod_name(r.key) for r in requests}) == []


async def test_the_allow_list_covers_every_command_that_runs(
    guarded_launcher: launcher_service_pb2_grpc.LauncherServiceStub,
) -> None:
    for override, command, field in COMMAND_PROBES:
        assert await refused(guarded_launcher, launch(override, command)) == (DENIED, field), override
    allowed = await guarded_launcher.RenderPod(
        lpb.RenderPodRequest(
            launch=launch(
                "spec: {containers: [{name: side, image: busybox, command: [python, -m, side]}]}",
                ["python", "-m", "job"],
            )
        )
    )
    assert allowed.allowed
    assert list(allowed.violations) == []


async def test_render_pod_shows_the_pod_launch_creates(client: SchedulerClient, cluster: ClusterInfo) -> None:
    request = launch(RUN_FOREVER + "\nspec: {initContainers: [{name: fetch, image: busybox, args: [go]}]}")
    rendered = await client.launcher.RenderPod(lpb.RenderPodRequest(launch=request))
    assert rendered.allowed
    assert rendered.template_name == "default"
    pod = json.loads(rendered.pod_json)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.launcher.GetLaunch(lpb.GetLaunchRequest(key=request.key))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # rendering stored nothing

    await client.launcher.LaunchTask(request)
    await client.reached(request.key, task_pb2.TASK_STATE_RUNNING)
    created = core_api(cluster.admin_kubeconfig).read_namespaced_pod(
        pod["metadata"]["name"], pod["metadata"]["namespace"]
    )
    spec = created.to_dict()["spec"]
    assert spec["service_account_name"] == "shepherd-worker"
    assert spec["automount_service_account_token"] is False
    assert spec["host_network"] is not True
    assert spec["security_context"]["run_as_non_root"] is True
    assert spec["security_context"]["seccomp_profile"]["type"] == "RuntimeDefault"
    for container in spec["init_containers"] + spec["containers"]:
        assert container["security_context"]["allow_privilege_escalation"] is False
        assert container["security_context"]["capabilities"]["drop"] == ["ALL"]
    assert [c["name"] for c in spec["init_containers"]] == [c["name"] for c in pod["spec"]["initContainers"]]

    await client.reconciler.CancelTask(reconciler_service_pb2.CancelTaskRequest(key=request.key))
    assert (await client.final(request.key)).state == task_pb2.TASK_STATE_REVOKED


async def test_render_pod_lists_violations_and_refuses_malformed_requests(client: SchedulerClient) -> None:
    verdict = await client.launcher.RenderPod(lpb.RenderPodRequest(launch=launch(ISSUE_POD)))
    assert not verdict.allowed
    assert [v.field for v in verdict.violations] == [
        f"{OV}.spec.serviceAccountName",
        f"{OV}.spec.automountServiceAccountToken",
        f"{OV}.spec.hostNetwork",
        f"{OV}.spec.hostPID",
        f"{OV}.spec.volumes[root].hostPath",
        f"{OV}.spec.containers[base].securityContext.privileged",
    ]
    for request, field in [
        (lpb.RenderPodRequest(), "launch.key"),
        (lpb.RenderPodRequest(launch=launch("spec: {hostNetwrk: true}")), f"launch.{OV}.spec.hostNetwrk"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.launcher.RenderPod(request)
        assert (err.value.code(), field_violation(err.value)) == (INVALID, field)


async def test_a_batch_refuses_junk_items_one_by_one(client: SchedulerClient) -> None:
    good = launch("metadata: {annotations: {sim.shepherd.dev/run-time: 200ms}}")
    junk = [
        "metadata: {annotations: [1, 2]}",
        "spec: {containers: [null]}",
        "spec: {containers: [{name: base, args: !!binary aGVsbG8=}]}",
        "spec: {activeDeadlineSeconds: 99999999999999999999999999999999}",
        "spec: &s {a: *s}",
        "spec: {hostNetwork: true}",
    ]
    reply = await client.launcher.BatchLaunchTasks(
        lpb.BatchLaunchTasksRequest(requests=[good, *(launch(j) for j in junk)])
    )
    first, *rest = reply.results
    assert first.response.launch.state == lpb.LAUNCH_STATE_ACCEPTED
    assert [(r.error.code, r.error.field) for r in rest] == [
        (INVALID.value[0], f"requests[1].{OV}.metadata.annotations"),
        (INVALID.value[0], f"requests[2].{OV}.spec.containers[0]"),
        (INVALID.value[0], f"requests[3].{OV}.spec.containers[0].args"),
        (INVALID.value[0], f"requests[4].{OV}.spec.activeDeadlineSeconds"),
        (INVALID.value[0], f"requests[5].{OV}.spec"),
        (DENIED.value[0], f"requests[6].{OV}.spec.hostNetwork"),
    ]
    assert (await client.final(good.key)).state == task_pb2.TASK_STATE_SUCCEEDED


def _methods() -> list[tuple[str, str, bool]]:
    """(service, /full/method, server-streaming) for every RPC of the three services."""
    found = []
    for service, module in zip(
        SERVICES, (launcher_service_pb2, watcher_service_pb2, reconciler_service_pb2), strict=True
    ):
        for descriptor in module.DESCRIPTOR.services_by_name.values():
            for method in descriptor.methods:
                found.append((service, f"/{descriptor.full_name}/{method.name}", method.server_streaming))
    found.append(("launcher", "/grpc.health.v1.Health/Check", False))
    return found


async def call_raw(channel: grpc.aio.Channel, method: str, streaming: bool, body: bytes) -> None:
    """One call with `body` as the request's bytes, read to its end."""
    if streaming:
        async for _ in channel.unary_stream(method)(body, timeout=10):
            pass
    else:
        await channel.unary_unary(method)(body, timeout=10)


async def test_undecodable_bytes_are_invalid_argument_on_every_rpc(stack: ServiceStack) -> None:
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, longer than the message
    for service, method, streaming in _methods():
        async with channels.aio_channel(stack.address(service)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call_raw(channel, method, streaming, garbage)
        assert err.value.code() == INVALID, (method, err.value.code(), err.value.details())


async def test_hostile_documents_do_not_hurt_the_launcher(
    client: SchedulerClient, stack: ServiceStack
) -> None:
    hostile = [
        "[" * 30000 + "]" * 30000,
        "{" * 30000,
        "{a: " * 50000 + "1" + "}" * 50000,
        ALIAS_BOMB,
        "a: " + "1:" * 60000 + "1",
    ]
    calls = [refused(client.launcher, launch(text)) for text in hostile] + [
        refused(client.launcher, launch(template_yaml=text)) for text in hostile
    ]
    outcomes = await asyncio.gather(*calls)
    assert {code for code, _ in outcomes} == {INVALID}
    assert all(field for _, field in outcomes)
    async with channels.aio_channel(stack.address("launcher")) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    key = task_key(task_id=unique_name("after-hostile"))
    await client.launch(key, annotations={"sim.shepherd.dev/run-time": "200ms"})
    assert (await client.final(key)).state == task_pb2.TASK_STATE_SUCCEEDED


async def test_the_api_server_refuses_unknown_fields_on_create(cluster: ClusterInfo) -> None:
    """The launcher's creates ask for strict field validation: the last word on unknown fields."""
    name = unique_name("strict")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeSelectr": {"a": "b"}, "containers": [{"name": "base", "image": "x"}]},
    }
    kube = KubeClient(load_connection(cluster.kubeconfigs["launcher"]))
    try:
        with pytest.raises(ApiError) as err:
            await kube.create_pod(cluster.namespace, pod)
    finally:
        await kube.close()
    assert err.value.status == 400
    assert "nodeSelectr" in err.value.message
    pods = core_api(cluster.admin_kubeconfig).list_namespaced_pod(
        cluster.namespace, field_selector=f"metadata.name={name}"
    )
    assert pods.items == []
