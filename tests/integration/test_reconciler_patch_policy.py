"""The reconciler's `patch` right on pods is narrowed to Shepherd's labels by the admission policy
in deploy/rbac/reconciler-patch-policy.yaml: RBAC cannot say "labels only", so without the policy
its token could rewrite a pod's image. Proved on a throw-away cluster's real API server, with the
reconciler's own ServiceAccount token, dry-run and real."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from controlplane import Cluster, ClusterInfo
from controlplane.kubeapi import object_path
from controlplane.stack import ServiceStack
from shepherd import podmeta
from shepherd.v1 import task_pb2
from tests.helpers import task_key, unique_name
from tests.helpers.cluster import spare_settings
from tests.helpers.kube import RESTRICTED_CONTAINER, RESTRICTED_POD, Caller
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
VARIANTS = Path(__file__).resolve().parents[2] / "deploy" / "variants"
POLICY_MESSAGE = "the reconciler may change only shepherd.dev/ labels on a pod"


@pytest.fixture(scope="module")
def spare_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Its own cluster: nothing here touches the shared one."""
    cluster = Cluster(spare_settings(tmp_path_factory.mktemp("vap")))
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def spare(spare_cluster: Cluster) -> ClusterInfo:
    return spare_cluster.info()


def make_pod(spare: ClusterInfo, namespace: str) -> str:
    """A worker-like pod the admin made, with a non-Shepherd label and an annotation."""
    admin = Caller(spare.admin_kubeconfig)
    name = unique_name("vap")
    status, body = admin.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": {podmeta.LABEL_WORKER: "true", "team": "a"},
                "annotations": {podmeta.ANNOTATION_DAG_ID: "d"},
            },
            "spec": {
                "serviceAccountName": "shepherd-worker",
                "automountServiceAccountToken": False,
                "securityContext": RESTRICTED_POD,
                "containers": [
                    {
                        "name": podmeta.BASE_CONTAINER,
                        "image": "registry.local/task:1",
                        "securityContext": RESTRICTED_CONTAINER,
                    }
                ],
            },
        },
        "application/json",
    )
    assert status == 201, body
    return name


@pytest.fixture
def pod(spare: ClusterInfo) -> str:
    return make_pod(spare, spare.namespace)


REFUSED = {
    # A merge patch replaces the whole list, so the container keeps its (required) security context.
    "image": {
        "spec": {
            "containers": [
                {
                    "name": podmeta.BASE_CONTAINER,
                    "image": "evil.example/x:1",
                    "securityContext": RESTRICTED_CONTAINER,
                }
            ]
        }
    },
    "annotation": {"metadata": {"annotations": {podmeta.ANNOTATION_DAG_ID: "other"}}},
    "new annotation": {"metadata": {"annotations": {"note": "x"}}},
    "other label": {"metadata": {"labels": {"team": "b"}}},
    "removed other label": {"metadata": {"labels": {"team": None}}},
    "finalizer": {"metadata": {"finalizers": ["example.com/hold"]}},
    "owner": {
        "metadata": {
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": "x",
                    "uid": "1d8e4f3c-0000-4000-8000-0000000",
                }
            ]
        }
    },
    "label beside a refused change": {
        "metadata": {"labels": {podmeta.LABEL_DONE: "true"}, "annotations": {"note": "x"}}
    },
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
@pytest.mark.parametrize("what", list(REFUSED))
def test_the_reconciler_may_not_patch_anything_but_shepherd_labels(
    spare: ClusterInfo, pod: str, what: str, dry_run: bool
) -> None:
    reconciler = Caller(spare.kubeconfigs["reconciler"])
    before = Caller(spare.admin_kubeconfig).pod(spare.namespace, pod)

    status, body = reconciler.patch_pod(spare.namespace, pod, REFUSED[what], dry_run=dry_run)

    assert status == 403, body
    assert POLICY_MESSAGE in body["message"], body
    after = Caller(spare.admin_kubeconfig).pod(spare.namespace, pod)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["spec"]["containers"][0]["image"] == "registry.local/task:1"


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
def test_the_reconciler_may_mark_done_and_adopt(spare: ClusterInfo, pod: str, dry_run: bool) -> None:
    """The two patches the reconciler makes (services/reconciler/actions.py, adoption.py)."""
    reconciler = Caller(spare.kubeconfigs["reconciler"])
    rv = Caller(spare.admin_kubeconfig).pod(spare.namespace, pod)["metadata"]["resourceVersion"]

    done = {"metadata": {"labels": {podmeta.LABEL_DONE: "true"}}}
    status, body = reconciler.patch_pod(spare.namespace, pod, done, dry_run=dry_run)
    assert status == 200, body
    assert body["metadata"]["labels"][podmeta.LABEL_DONE] == "true"
    fresh = Caller(spare.admin_kubeconfig).pod(spare.namespace, pod)["metadata"]["resourceVersion"]
    adopt = {"metadata": {"labels": {podmeta.LABEL_EXECUTOR: "heir"}, "resourceVersion": fresh}}
    status, body = reconciler.patch_pod(spare.namespace, pod, adopt, dry_run=dry_run)
    assert status == 200, body

    labels = Caller(spare.admin_kubeconfig).pod(spare.namespace, pod)["metadata"]["labels"]
    if dry_run:
        assert podmeta.LABEL_DONE not in labels
        assert Caller(spare.admin_kubeconfig).pod(spare.namespace, pod)["metadata"]["resourceVersion"] == rv
    else:
        assert labels[podmeta.LABEL_DONE] == "true"
        assert labels[podmeta.LABEL_EXECUTOR] == "heir"
        assert labels["team"] == "a"


def test_the_policy_covers_the_namespaces_of_the_namespace_list_variant(spare: ClusterInfo) -> None:
    """Cluster-wide, so the variant's Roles in another namespace get no wider patch right."""
    admin = Caller(spare.admin_kubeconfig)
    for doc in yaml.safe_load_all((VARIANTS / "namespace-list" / "worker-namespace.yaml").read_text()):
        status, body = admin.request(
            "PATCH",
            object_path(doc) + "?fieldManager=test&force=true",
            doc,
            "application/apply-patch+yaml",
        )
        assert status in (200, 201), body
    name = make_pod(spare, "team-a")
    reconciler = Caller(spare.kubeconfigs["reconciler"])

    status, body = reconciler.patch_pod("team-a", name, REFUSED["image"], dry_run=True)
    assert status == 403, body
    assert POLICY_MESSAGE in body["message"], body
    done = {"metadata": {"labels": {podmeta.LABEL_DONE: "true"}}}
    status, body = reconciler.patch_pod("team-a", name, done, dry_run=False)
    assert status == 200, body


def test_the_admin_may_still_patch_anything(spare: ClusterInfo, pod: str) -> None:
    admin = Caller(spare.admin_kubeconfig)
    for patch in REFUSED.values():
        status, body = admin.patch_pod(spare.namespace, pod, patch, dry_run=True)
        assert status == 200, body
    status, body = admin.patch_pod(spare.namespace, pod, REFUSED["image"], dry_run=False)
    assert status == 200, body
    assert admin.pod(spare.namespace, pod)["spec"]["containers"][0]["image"] == "evil.example/x:1"


def test_the_control_plane_applies_the_policy_from_deploy(spare: ClusterInfo) -> None:
    """`up` applies deploy/rbac/*.yaml, the policy and its binding among them, through the GA API."""
    admin = Caller(spare.admin_kubeconfig)
    base = "/apis/admissionregistration.k8s.io/v1"
    name = "shepherd-reconciler-patch"
    status, policy = admin.request("GET", f"{base}/validatingadmissionpolicies/{name}")
    assert status == 200, policy
    status, binding = admin.request("GET", f"{base}/validatingadmissionpolicybindings/{name}")
    assert status == 200, binding
    assert binding["spec"]["validationActions"] == ["Deny"]


async def test_the_running_reconciler_still_marks_a_failed_tasks_pod_done(
    spare: ClusterInfo, tmp_path: Path
) -> None:
    """End to end under the policy: the default cleanup keeps a failed task's pod and labels it
    done. Only the reconciler sets that label here, and a refused patch would leave it unset."""
    stack = ServiceStack(spare, tmp_path, executor_id=unique_name("vap"))
    stack.start()
    key = task_key(task_id=unique_name("vap-fail"))
    name = podmeta.pod_name(key)
    admin = Caller(spare.admin_kubeconfig)
    try:
        async with SchedulerClient.connect(stack) as client:
            await client.launch(key, annotations={"sim.shepherd.dev/outcome": "fail"})
            assert (await client.final(key)).state == task_pb2.TASK_STATE_FAILED
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while admin.pod(spare.namespace, name)["metadata"]["labels"].get(podmeta.LABEL_DONE) != "true":
            assert loop.time() < deadline, "the failed task's pod was never marked done"
            await asyncio.sleep(0.2)
    finally:
        stack.stop_all()
