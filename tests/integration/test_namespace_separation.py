"""Worker pods live apart from the services (deploy/namespace.yaml), proved on the real API server
with the services' own ServiceAccount tokens: the launcher can create pods only in the workers'
namespace, no Shepherd identity can create pods or read Secrets where the services run, and the
workers' namespace enforces the restricted Pod Security Standard even against the cluster admin."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import ClusterInfo
from controlplane.cluster import SERVICE_NAMESPACE, WORKER_NAMESPACE
from tests.helpers.kube import Caller, make_pod, unique_name

pytestmark = pytest.mark.integration
NAMESPACES = Path(__file__).resolve().parents[2] / "deploy" / "namespace.yaml"


def create_pod(caller: Caller, namespace: str, pod: dict[str, Any]) -> tuple[int, Any]:
    """A dry-run create: authorization and admission run in full, and nothing is stored."""
    return caller.request("POST", f"/api/v1/namespaces/{namespace}/pods?dryRun=All", pod, "application/json")


def test_the_cluster_runs_the_namespaces_deploy_defines(cluster: ClusterInfo) -> None:
    admin = Caller(cluster.admin_kubeconfig)
    assert cluster.namespace == WORKER_NAMESPACE != SERVICE_NAMESPACE
    for doc in yaml.safe_load_all(NAMESPACES.read_text()):
        status, live = admin.request("GET", f"/api/v1/namespaces/{doc['metadata']['name']}")
        assert status == 200, live
        assert doc["metadata"]["labels"].items() <= live["metadata"]["labels"].items()
    status, account = admin.request(
        "GET", f"/api/v1/namespaces/{WORKER_NAMESPACE}/serviceaccounts/shepherd-worker"
    )
    assert status == 200, account
    assert account["automountServiceAccountToken"] is False


def test_the_launcher_creates_pods_only_in_the_workers_namespace(cluster: ClusterInfo) -> None:
    launcher = Caller(cluster.kubeconfigs["launcher"])
    pod = make_pod(unique_name("sep"))
    status, body = create_pod(launcher, WORKER_NAMESPACE, pod)
    assert status == 201, body
    for namespace in (SERVICE_NAMESPACE, "default", "kube-system"):
        status, body = create_pod(launcher, namespace, pod)
        assert status == 403, (namespace, body)
        assert body["reason"] == "Forbidden"
        assert "system:serviceaccount:shepherd:launcher" in body["message"]


@pytest.mark.parametrize("name", ["launcher", "watcher", "reconciler"])
def test_no_service_identity_can_touch_the_services_namespace(cluster: ClusterInfo, name: str) -> None:
    caller = Caller(cluster.kubeconfigs[name])
    for method, path in (
        ("GET", f"/api/v1/namespaces/{SERVICE_NAMESPACE}/secrets"),
        ("GET", f"/api/v1/namespaces/{SERVICE_NAMESPACE}/pods"),
        ("GET", f"/api/v1/namespaces/{WORKER_NAMESPACE}/secrets"),
    ):
        status, body = caller.request(method, path)
        assert status == 403, (name, path, body)
    if name != "launcher":
        status, body = create_pod(caller, WORKER_NAMESPACE, make_pod(unique_name("sep")))
        assert status == 403, body


@pytest.mark.parametrize(
    ("what", "change"),
    [
        (
            "privileged",
            lambda pod: pod["spec"]["containers"][0]["securityContext"].update(
                privileged=True, allowPrivilegeEscalation=True
            ),
        ),
        ("hostNetwork", lambda pod: pod["spec"].update(hostNetwork=True)),
        ("root", lambda pod: pod["spec"]["securityContext"].update(runAsNonRoot=False, runAsUser=0)),
        (
            "hostPath",
            lambda pod: pod["spec"].update(volumes=[{"name": "root", "hostPath": {"path": "/"}}]),
        ),
    ],
)
def test_the_workers_namespace_refuses_unsafe_pods_even_from_the_admin(
    cluster: ClusterInfo, what: str, change: Any
) -> None:
    """Defence in depth: were the launcher's own pod policy relaxed or bypassed, the API server
    still refuses the pod."""
    admin = Caller(cluster.admin_kubeconfig)
    pod = copy.deepcopy(make_pod(unique_name("psa")))
    change(pod)
    status, body = create_pod(admin, WORKER_NAMESPACE, pod)
    assert status == 403, (what, body)
    assert "violates PodSecurity" in body["message"]
    assert '"restricted:latest"' in body["message"]
