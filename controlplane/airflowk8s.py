"""Airflow's own KubernetesExecutor on the local cluster: what the benchmark compares Shepherd with.

The executor of `apache-airflow-providers-cncf-kubernetes` creates, watches and deletes worker
pods itself, from the scheduler. To run it as a deployment would, it gets here:
- a namespace of its own (`airflow-k8s` by default) enforcing the `restricted` Pod Security
  Standard, as Shepherd's workers' namespace does (controlplane/airflow.py's pod template, the
  same for both executors, meets it);
- a ServiceAccount there (`airflow-scheduler`) with a Role for what the executor calls: pods
  create, get, list, watch, patch (adoption relabels), delete, and pods/log (the UI's log view
  of a running task); the scheduler calls with a TokenRequest token for it, from a kubeconfig
  (`[kubernetes_executor] in_cluster = False`, `config_file`), so the audit log names it;
- its options, either the provider's defaults or tuned as its documentation recommends
  (`worker_pods_creation_batch_size` 128 and `async_pod_creation`, whose concurrency,
  `pod_creation_max_concurrency`, then defaults to the batch size).

`remove` deletes the namespace and with it everything made here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from controlplane.cluster import Cluster
from controlplane.kubeapi import ApiError

NAMESPACE = "airflow-k8s"
SERVICE_ACCOUNT = "airflow-scheduler"
FIELD_MANAGER = "shepherd-airflow-k8s"
# What the KubernetesExecutor of provider 10.25.0 calls on pods (kubernetes_executor.py and
# kubernetes_executor_utils.py): create, one pod read before adoption, the watcher's list and
# watch, the labels it patches when adopting, the delete of a finished pod, and the log tail the
# API server reads for a running task.
RULES = [
    {
        "apiGroups": [""],
        "resources": ["pods"],
        "verbs": ["create", "get", "list", "watch", "patch", "delete"],
    },
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get", "list"]},
]
TUNED_BATCH = 128
_TOKEN_TTL_S = 6 * 3600


@dataclass(frozen=True)
class KubernetesExecutorSetup:
    """What a scheduler running the KubernetesExecutor needs, made on the cluster."""

    namespace: str
    kubeconfig: Path

    @property
    def user(self) -> str:
        """The executor's identity as the API server (and its audit log) names it."""
        return f"system:serviceaccount:{self.namespace}:{SERVICE_ACCOUNT}"

    def options(self, *, tuned: bool) -> dict[str, str]:
        """`[kubernetes_executor]` beyond what every deployment sets (namespace, pod template):
        this identity, and the two tuned options or none (the provider's defaults)."""
        options = {"in_cluster": "False", "config_file": str(self.kubeconfig)}
        if tuned:
            options["worker_pods_creation_batch_size"] = str(TUNED_BATCH)
            options["async_pod_creation"] = "True"
        return options


def namespace_object(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": namespace,
            "labels": {
                "app.kubernetes.io/part-of": "airflow-kubernetes-executor",
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            },
        },
    }


def rbac_objects(namespace: str) -> list[dict[str, Any]]:
    meta = {"namespace": namespace, "labels": {"app.kubernetes.io/part-of": "airflow-kubernetes-executor"}}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT, **meta}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": SERVICE_ACCOUNT, **meta},
            "rules": RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": SERVICE_ACCOUNT, **meta},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVICE_ACCOUNT},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": namespace}],
        },
    ]


def kubeconfig_for_token(admin_kubeconfig: Path, token: str, namespace: str) -> dict[str, Any]:
    """The admin kubeconfig's cluster (server and CA), with a token user instead of the admin."""
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    name = f"{namespace}-{SERVICE_ACCOUNT}"
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": name,
        "clusters": admin["clusters"],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [
            {
                "name": name,
                "context": {"cluster": admin["clusters"][0]["name"], "user": name, "namespace": namespace},
            }
        ],
    }


def prepare(cluster: Cluster, workdir: Path, *, namespace: str = NAMESPACE) -> KubernetesExecutorSetup:
    """Namespace, ServiceAccount, Role and binding on the cluster, and the kubeconfig in `workdir`.
    Idempotent (server-side apply), so a run after a crash reuses what is there."""
    admin = cluster._admin()
    for obj in [namespace_object(namespace), *rbac_objects(namespace)]:
        admin.apply(obj, field_manager=FIELD_MANAGER)
    reply = admin.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{SERVICE_ACCOUNT}/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": _TOKEN_TTL_S},
        },
    )
    workdir.mkdir(parents=True, exist_ok=True)
    kubeconfig = workdir / f"{namespace}.kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            kubeconfig_for_token(cluster.settings.admin_kubeconfig, reply["status"]["token"], namespace),
            sort_keys=False,
        )
    )
    kubeconfig.chmod(0o600)
    return KubernetesExecutorSetup(namespace, kubeconfig)


def remove(cluster: Cluster, namespace: str = NAMESPACE, *, timeout_s: float = 120.0) -> None:
    """Delete the namespace (its pods, ServiceAccount, Role and binding with it) and wait until it is gone."""
    admin = cluster._admin()
    path = f"/api/v1/namespaces/{namespace}"
    try:
        admin.request("DELETE", path)
    except ApiError as exc:
        if exc.status == 404:
            return
        raise
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            admin.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(1)
