"""The local cluster's real node (kubelet + containerd) runs real containers, leaves the host as
it found it, and the controller-manager makes the cluster behave like a real one.

Pods here go straight to the API as the admin: these tests are about the cluster, not Shepherd
(tests/integration/test_real_containers.py runs Shepherd's tasks on the node).
"""

from __future__ import annotations

import os
import signal
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from controlplane import Cluster, ClusterInfo, realnode
from controlplane.images import SHELL_IMAGE
from controlplane.realnode import CGROUP_ROOT, HOST_DIRS, NODE_LABEL, RUN_DIR, SYSCTLS, TAINT_KEY, owned_pids
from tests.helpers import core_api, eventually, unique_name
from tests.helpers.cluster import spare_settings

pytestmark = pytest.mark.integration

REAL_TEMPLATE = "deploy/pod-templates/real.yaml"


def real_pod(name: str, command: str, *, image: str = SHELL_IMAGE) -> dict[str, Any]:
    """A pod from the `real` template (so on the real node, as a non-root user) running `sh -c`."""
    with open(REAL_TEMPLATE) as template:
        pod: dict[str, Any] = yaml.safe_load(template)
    pod["metadata"]["name"] = name
    container = pod["spec"]["containers"][0]
    container.update({"image": image, "command": ["sh", "-c", command]})
    return pod


def final_phase(api: client.CoreV1Api, namespace: str, name: str) -> Any:
    def ended() -> Any:
        pod = api.read_namespaced_pod(name, namespace)
        return pod if pod.status.phase in ("Succeeded", "Failed") else None

    return eventually(ended, what=f"pod {name} to end", timeout=90, interval=0.3)


def test_the_real_node_is_ready_tainted_and_labelled(cluster: ClusterInfo, real_node: str) -> None:
    node = core_api(cluster.admin_kubeconfig).read_node(real_node)
    assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"
    assert [(t.key, t.effect) for t in node.spec.taints or []] == [(TAINT_KEY, "NoSchedule")]
    assert node.metadata.labels[NODE_LABEL] == "true"
    assert node.status.node_info.kubelet_version == cluster.version
    assert node.status.node_info.container_runtime_version.startswith("containerd://")


def test_the_kubelet_refuses_anonymous_and_unauthorised_callers(cluster: ClusterInfo, real_node: str) -> None:
    node = core_api(cluster.admin_kubeconfig).read_node(real_node)
    ip = next(a.address for a in node.status.addresses if a.type == "InternalIP")
    url = f"https://{ip}:{node.status.daemon_endpoints.kubelet_endpoint.port}/pods"
    context = ssl.create_default_context(cafile=f"{cluster.state_dir}/pki/ca.crt")
    context.check_hostname = False  # the serving certificate names the node IP; checked by the CA

    def status(headers: dict[str, str]) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), context=context) as r:
                return int(r.status)
        except urllib.error.HTTPError as err:
            return err.code

    assert status({}) == 401
    with open(cluster.kubeconfigs["watcher"]) as kubeconfig:
        watcher_token = yaml.safe_load(kubeconfig)["users"][0]["user"]["token"]
    assert status({"Authorization": f"Bearer {watcher_token}"}) == 403


def test_a_container_ends_with_its_real_exit_code_and_log(cluster: ClusterInfo, real_node: str) -> None:
    api = core_api(cluster.admin_kubeconfig)
    name = unique_name("exit")
    api.create_namespaced_pod(cluster.namespace, real_pod(name, "echo hello from $(id -u); exit 3"))
    try:
        pod = final_phase(api, cluster.namespace, name)
        assert pod.spec.node_name == real_node
        terminated = pod.status.container_statuses[0].state.terminated
        assert (pod.status.phase, terminated.exit_code, terminated.reason) == ("Failed", 3, "Error")
        # The API server fetched this from the kubelet with its own client certificate.
        log = api.read_namespaced_pod_log(name, cluster.namespace, container="base")
        assert log == "hello from 1000\n"
    finally:
        api.delete_namespaced_pod(name, cluster.namespace, grace_period_seconds=0)


def test_a_missing_image_really_fails_to_pull(cluster: ClusterInfo, real_node: str) -> None:
    api = core_api(cluster.admin_kubeconfig)
    name = unique_name("noimage")
    api.create_namespaced_pod(
        cluster.namespace, real_pod(name, "true", image="shepherd.local/no-such-image:v1")
    )
    try:

        def waiting_reason() -> str | None:
            statuses = api.read_namespaced_pod(name, cluster.namespace).status.container_statuses or []
            waiting = statuses[0].state.waiting if statuses else None
            return (
                waiting.reason if waiting and waiting.reason in ("ErrImagePull", "ImagePullBackOff") else None
            )

        assert eventually(waiting_reason, what="an image pull failure", timeout=60) in (
            "ErrImagePull",
            "ImagePullBackOff",
        )
    finally:
        api.delete_namespaced_pod(name, cluster.namespace, grace_period_seconds=0)


def test_pods_that_do_not_ask_for_the_real_node_stay_off_it(cluster: ClusterInfo, real_node: str) -> None:
    api = core_api(cluster.admin_kubeconfig)
    name = unique_name("kwok")
    pod = real_pod(name, "true")
    del pod["spec"]["tolerations"]
    del pod["spec"]["nodeSelector"]
    api.create_namespaced_pod(cluster.namespace, pod)
    try:
        scheduled = eventually(
            lambda: api.read_namespaced_pod(name, cluster.namespace).spec.node_name,
            what="the pod to be scheduled",
        )
        assert scheduled != real_node
    finally:
        api.delete_namespaced_pod(name, cluster.namespace, grace_period_seconds=0)


def test_the_controller_manager_runs_deployments_and_empties_deleted_namespaces(
    cluster: ClusterInfo,
) -> None:
    api = core_api(cluster.admin_kubeconfig)
    apps = client.AppsV1Api(api.api_client)
    namespace = unique_name("kcm")
    api.create_namespace({"metadata": {"name": namespace}})
    # The ServiceAccount admission plugin is on: pods need the `default` ServiceAccount, which the
    # controller-manager creates in every new namespace.
    eventually(
        lambda: api.list_namespaced_service_account(namespace, field_selector="metadata.name=default").items,
        what="the default ServiceAccount",
    )
    labels = {"app": "web"}
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {"sim.shepherd.dev/outcome": "run-forever"},
                    },
                    "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]},
                },
            },
        },
    )

    def running() -> list[Any] | None:
        pods = api.list_namespaced_pod(namespace).items
        return pods if len(pods) == 2 and all(p.status.phase == "Running" for p in pods) else None

    pods = eventually(running, what="the Deployment's two pods Running")
    # Admitted with the ServiceAccount plugin: the token volume is there, as on a real cluster.
    assert any(v.projected for v in pods[0].spec.volumes or [])
    api.delete_namespace(namespace)

    def gone() -> bool:
        try:
            api.read_namespace(namespace)
        except ApiException as err:
            return bool(err.status == 404)
        return False

    eventually(gone, what=f"namespace {namespace} to be emptied and deleted", timeout=120)


_NODE_MOUNT_ROOTS = (str(RUN_DIR), "/run/containerd", "/run/netns", "/var/lib/kubelet", "/var/lib/containerd")


def host_state() -> dict[str, object]:
    """What a real node may change on the host, as a comparable snapshot. Mounts are those a node
    makes (its state, containerd's and the kubelet's directories, sandboxes' network namespaces),
    so another test's own mounts elsewhere (the fault suite's stores) do not count."""
    mounts = sorted(
        point
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if (point := line.split()[4]).startswith(_NODE_MOUNT_ROOTS) or "/node/" in f"{point}/"
    )
    cgroups = sorted(str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_ROOT}"))
    return {
        "sysctls": {n: realnode._sysctl_path(n).read_text() for n in SYSCTLS},
        "links": sorted(p.name for p in Path("/sys/class/net").iterdir()),
        "netns": sorted(p.name for p in Path("/run/netns").glob("*")),
        "mounts": mounts,
        "cgroups": cgroups,
        "dirs": {str(d): sorted(p.name for p in d.iterdir()) if d.exists() else None for d in HOST_DIRS},
        "run_dir": RUN_DIR.exists(),
    }


def test_a_crashed_real_node_is_restarted_and_down_restores_the_host(
    free_real_node: None, tmp_path: Path
) -> None:
    before = host_state()
    settings = spare_settings(
        tmp_path,
        real_node=True,
        real_node_name="spare-node",
        real_node_bridge="shepherdt0",
        real_node_pod_cidr="10.90.0.0/24",
    )
    spare = Cluster(settings)
    try:
        info = spare.up()
        assert info.real_node == "spare-node"
        api = core_api(info.admin_kubeconfig)
        name = unique_name("left-running")
        api.create_namespaced_pod(info.namespace, real_pod(name, "sleep 3600"))
        eventually(
            lambda: api.read_namespaced_pod(name, info.namespace).status.phase == "Running",
            what="a pod running on the spare node",
            timeout=90,
        )
        assert host_state() != before  # a bridge, a network namespace, mounts, cgroups
        # The node dies without cleaning up: its pod's processes, shim, mounts and network stay.
        for daemon in ("kubelet", "containerd"):
            pid = spare.supervisor.pid(daemon)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
        assert not spare.healthy()
        info = spare.up()  # restores the host from the record, then starts everything afresh
        assert info.real_node == "spare-node"
        assert spare.node.ready(spare._admin())
    finally:
        spare.down()
    assert owned_pids(str(settings.state_dir)) == []
    assert owned_pids(str(RUN_DIR)) == []
    assert host_state() == before
