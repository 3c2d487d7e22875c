"""Each service identity can do exactly its job on the real API server, and no more.

The launcher's ServiceAccount creates a pod, the watcher's sees it move to Succeeded through
kwok on a watch, the reconciler's deletes it. RBAC is real: the watcher is refused writes.
"""

from __future__ import annotations

import threading
import urllib.request
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from controlplane import ClusterInfo
from shepherd.kube import load_connection
from tests.helpers import core_api, eventually, make_pod, unique_name

pytestmark = pytest.mark.integration


def test_the_api_server_is_a_real_release_and_ready(cluster: ClusterInfo) -> None:
    admin = client.VersionApi(core_api(cluster.admin_kubeconfig).api_client)
    version = admin.get_code()
    assert version.git_version.startswith("v1.")
    assert int(version.minor.rstrip("+")) >= 33
    connection = load_connection(cluster.admin_kubeconfig)
    request = urllib.request.Request(connection.server + "/readyz", headers=connection.headers())
    with urllib.request.urlopen(request, context=connection.ssl_context, timeout=10) as resp:
        readyz = resp.read()
    assert readyz == b"ok"


def test_each_service_identity_does_its_own_part_of_a_pod_life(cluster: ClusterInfo) -> None:
    ns = cluster.namespace
    launcher = core_api(cluster.kubeconfigs["launcher"])
    watcher = core_api(cluster.kubeconfigs["watcher"])
    reconciler = core_api(cluster.kubeconfigs["reconciler"])
    name = unique_name("identity")
    selector = f"test-run={name}"

    seen: list[tuple[str, str]] = []
    listed = watcher.list_namespaced_pod(ns, label_selector=selector)
    stream = watch.Watch()

    def follow() -> None:
        for event in stream.stream(
            watcher.list_namespaced_pod,
            ns,
            label_selector=selector,
            resource_version=listed.metadata.resource_version,
            timeout_seconds=120,
        ):
            pod: Any = event["object"]
            seen.append((event["type"], pod.status.phase))
            if event["type"] == "DELETED":
                stream.stop()

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()

    launcher.create_namespaced_pod(
        ns, make_pod(name, labels={"test-run": name}, annotations={"sim.shepherd.dev/run-time": "500ms"})
    )
    eventually(lambda: ("MODIFIED", "Running") in seen, what="the watcher to see the pod Running")
    eventually(lambda: ("MODIFIED", "Succeeded") in seen, what="the watcher to see the pod Succeeded")

    reconciler.delete_namespaced_pod(name, ns)
    follower.join(timeout=60)
    assert seen[0] == ("ADDED", "Pending")
    assert seen[-1][0] == "DELETED"
    assert not reconciler.list_namespaced_pod(ns, label_selector=selector).items


@pytest.mark.parametrize("verb", ["create", "delete"])
def test_the_watcher_identity_is_denied_writes(cluster: ClusterInfo, verb: str) -> None:
    watcher = core_api(cluster.kubeconfigs["watcher"])
    name = unique_name("denied")
    if verb == "create":
        with pytest.raises(ApiException) as denied:
            watcher.create_namespaced_pod(cluster.namespace, make_pod(name))
    else:
        with pytest.raises(ApiException) as denied:
            watcher.delete_namespaced_pod(name, cluster.namespace)
    assert denied.value.status == 403
    assert "system:serviceaccount:shepherd:watcher" in denied.value.body


@pytest.mark.parametrize(
    ("identity", "allowed", "denied"),
    [
        ("launcher", {"create", "get"}, {"list", "watch", "patch", "delete"}),
        ("watcher", {"get", "list", "watch"}, {"create", "patch", "delete"}),
        ("reconciler", {"list", "patch", "delete"}, {"create", "get", "watch"}),
    ],
)
def test_each_identity_has_least_privilege_on_pods(
    cluster: ClusterInfo, identity: str, allowed: set[str], denied: set[str]
) -> None:
    authz = client.AuthorizationV1Api(core_api(cluster.kubeconfigs[identity]).api_client)
    for verb in allowed | denied:
        review = authz.create_self_subject_access_review(
            {
                "spec": {
                    "resourceAttributes": {"namespace": cluster.namespace, "verb": verb, "resource": "pods"}
                }
            }
        )
        assert review.status.allowed == (verb in allowed), f"{identity} {verb} pods"
