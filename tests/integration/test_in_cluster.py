"""Shepherd deployed from deploy/ (through the deploy/local overlay) and running in the cluster: the
image built from the Dockerfile on this machine, the three services as pods on the real node under
their ServiceAccounts with in-cluster configuration, Ready because the kubelet's own gRPC probes
say so, with the hardened security context of the base manifests.

The deployment goes into a namespace pair of its own (relocated from `shepherd` /
`shepherd-workers`, which the cluster's bootstrap and the host-run test services use), and is
removed afterwards. A scheduler drives it from the host, straight to the pods' IPs with a client
certificate of its own, and the API server's audit log says who created and deleted the worker
pods: the in-cluster launcher's and reconciler's ServiceAccounts, from inside their pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from controlplane import Cluster, ClusterInfo, serviceimage
from controlplane.deploy import PROXY, Deployment
from controlplane.identities import GrpcAuthority
from shepherd import channels, podmeta
from shepherd.v1 import launcher_service_pb2_grpc, reconciler_service_pb2_grpc, task_pb2
from tests.helpers import eventually, task_key, unique_name
from tests.helpers.audit import AuditLog
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
PORTS = {"launcher": 50051, "watcher": 50052, "reconciler": 50053}


@pytest.fixture(scope="module")
def deployment(cluster: ClusterInfo, real_node: str) -> Iterator[Deployment]:
    local = Cluster()
    if local.supervisor.pid(PROXY) is not None:
        pytest.skip(
            "another in-cluster deployment holds the service proxy (`make deploy-local`?); "
            "`python -m controlplane undeploy` removes it"
        )
    try:
        serviceimage.ensure_tools()
    except serviceimage.ImageBuildError as exc:
        pytest.skip(f"cannot build the services' image here: {exc}")
    image = serviceimage.build(local.settings)  # cached: quick unless the sources changed
    namespace = f"incluster-{uuid.uuid4().hex[:6]}"
    deployed = Deployment(local, image.name, namespace=namespace, workers=f"{namespace}-workers")
    try:
        deployed.apply()
        yield deployed
    finally:
        deployed.remove()


@pytest.fixture
async def scheduler(deployment: Deployment) -> AsyncIterator[SchedulerClient]:
    """A scheduler with a certificate of its own (`issue-cert schedulers/<name>`), calling the
    launcher and the reconciler at their pod IPs; the names checked are the Services' names."""
    pods = await asyncio.to_thread(deployment.pods)
    issued = GrpcAuthority(deployment.cluster.settings.state_dir).client("schedulers", "incluster-test")

    def channel(name: str) -> grpc.aio.Channel:
        credentials = channels.ClientCredentials(
            ca=issued.ca, cert=issued.cert, key=issued.key, server_name=f"{name}.shepherd.svc"
        )
        return channels.aio_channel(f"{pods[name]['status']['podIP']}:{PORTS[name]}", credentials)

    async with contextlib.AsyncExitStack() as stack:
        launcher = await stack.enter_async_context(channel("launcher"))
        reconciler = await stack.enter_async_context(channel("reconciler"))
        client = await stack.enter_async_context(
            SchedulerClient.following(
                launcher_service_pb2_grpc.LauncherServiceStub(launcher),
                reconciler_service_pb2_grpc.ReconcilerServiceStub(reconciler),
            )
        )
        yield client


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_the_services_run_on_the_real_node_hardened_and_ready_by_the_kubelets_probes(
    deployment: Deployment, real_node: str
) -> None:
    pods = deployment.pods()
    assert set(pods) == set(PORTS)
    for name, pod in pods.items():
        spec, status = pod["spec"], pod["status"]
        assert spec["nodeName"] == real_node
        assert spec["serviceAccountName"] == name
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        container = _container(pod)
        assert container["image"] == deployment.image
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }
        # The real kubelet ran the container and its gRPC readiness probe passed (a container with
        # a readiness probe is never ready before the probe succeeds); the liveness probe has not
        # restarted it.
        (state,) = status["containerStatuses"]
        assert "running" in state["state"]
        assert state["ready"] is True
        assert state["restartCount"] == 0
        assert container["readinessProbe"]["grpc"]["port"] == 8081
        assert container["livenessProbe"]["grpc"]["port"] == 8081
        conditions = {c["type"]: c["status"] for c in status["conditions"]}
        assert conditions["Ready"] == "True"
        # In-cluster configuration: a projected ServiceAccount token, no kubeconfig.
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert "SHEPHERD_KUBECONFIG" not in env
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounts

    # The kubelet's own count of the probes it ran, from its metrics: both the gRPC readiness and
    # the liveness probe of each service succeeded there.
    wanted = {(name, kind) for name in PORTS for kind in ("Readiness", "Liveness")}
    eventually(
        lambda: wanted <= _successful_probes(deployment, real_node),
        what="a successful readiness and liveness probe of each service in the kubelet's metrics",
        timeout=120,
        interval=2,
    )


def _successful_probes(deployment: Deployment, node: str) -> set[tuple[str, str]]:
    """(container, probe type) of the deployment's pods with a successful probe, per the kubelet."""
    text = deployment.admin.request("GET", f"/api/v1/nodes/{node}/proxy/metrics/probes")
    found = set()
    for line in str(text).splitlines():
        if not line.startswith("prober_probe_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        if (
            labels.get("namespace") == deployment.namespace
            and labels.get("result") == "successful"
            and float(line.rsplit(" ", 1)[1]) > 0
        ):
            found.add((labels["container"], labels["probe_type"]))
    return found


async def test_launch_success_and_failure_through_the_pods(
    deployment: Deployment, scheduler: SchedulerClient
) -> None:
    audit = AuditLog.from_now(deployment.cluster.audit_log)
    succeeds = task_key(task_id=unique_name("incluster-ok"))
    fails = task_key(task_id=unique_name("incluster-fail"))
    await scheduler.launch(succeeds)
    await scheduler.launch(
        fails, annotations={"sim.shepherd.dev/outcome": "fail", "sim.shepherd.dev/exit-code": "7"}
    )
    done = await scheduler.final(succeeds, timeout=180)
    failed = await scheduler.final(fails, timeout=180)
    queued, running = task_pb2.TASK_STATE_QUEUED, task_pb2.TASK_STATE_RUNNING
    assert scheduler.states(succeeds) == [queued, running, task_pb2.TASK_STATE_SUCCEEDED]
    assert scheduler.states(fails) == [queued, running, task_pb2.TASK_STATE_FAILED]
    assert (failed.failure.reason, failed.failure.pod_phase) == ("PodFailed", "Failed")
    assert (failed.failure.container.name, failed.failure.container.exit_code) == ("base", 7)

    # The API server's witness: each worker pod created once, by the launcher's ServiceAccount
    # from inside the launcher's pod (its token is bound to that pod); the succeeded task's pod
    # deleted once, by the reconciler's from inside its pod. The failed task's pod is kept for
    # debugging (delete_worker_pods_on_failure is off by default), marked done by the reconciler.
    pods = await asyncio.to_thread(deployment.pods)
    names = {done.pod_name, failed.pod_name}
    assert all(names)
    launcher = f"system:serviceaccount:{deployment.namespace}:launcher"
    reconciler = f"system:serviceaccount:{deployment.namespace}:reconciler"
    assert await audit.until_called("create", names, user=launcher) == {n: 1 for n in names}
    assert await audit.until_called("delete", {done.pod_name}, user=reconciler) == {done.pod_name: 1}
    # The failed task's pod is kept, marked done by the reconciler's patch.
    assert await audit.until_called("patch", {failed.pod_name}, user=reconciler) == {failed.pod_name: 1}
    # The watcher lists and watches the workers' pods as its own ServiceAccount, from its pod
    # (it started before this test, so the whole log is read, for this deployment's namespace).
    watcher = f"system:serviceaccount:{deployment.namespace}:watcher"
    watches = [
        entry
        for entry in AuditLog(deployment.cluster.audit_log).entries()
        if entry["user"]["username"] == watcher
        and entry.get("verb") in ("list", "watch")
        and (entry.get("objectRef") or {}).get("namespace") == deployment.workers
    ]
    assert {entry["verb"] for entry in watches} == {"list", "watch"}
    assert {entry["user"]["extra"]["authentication.kubernetes.io/pod-name"][0] for entry in watches} == {
        pods["watcher"]["metadata"]["name"]
    }
    # Nobody else created them; the calls came from the services' pods (after the reconciler's
    # graceful delete, the node that ran the pod removes it: that delete is not the reconciler's).
    for entry in audit.entries():
        ref, user = entry.get("objectRef") or {}, entry["user"]
        if ref.get("name") not in names or ref.get("subresource"):
            continue
        if entry["verb"] == "create":
            assert user["username"] == launcher
        if user["username"] in (launcher, reconciler):
            service = "launcher" if user["username"] == launcher else "reconciler"
            assert user["extra"]["authentication.kubernetes.io/pod-name"] == [
                pods[service]["metadata"]["name"]
            ]

    async def workers_left() -> dict[str, dict[str, str]]:
        """The worker pods left, by name, once the failed task's pod is marked done."""
        path = f"/api/v1/namespaces/{deployment.workers}/pods"
        while True:
            listed = await asyncio.to_thread(deployment.admin.request, "GET", path)
            left = {p["metadata"]["name"]: p["metadata"].get("labels", {}) for p in listed["items"]}
            if podmeta.LABEL_DONE in left.get(failed.pod_name, {}):
                return left
            await asyncio.sleep(0.5)

    left = await asyncio.wait_for(workers_left(), 120)
    assert set(left) == {failed.pod_name}
