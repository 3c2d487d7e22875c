"""The Helm chart (deploy/helm/shepherd) is the kustomize base in another form: with default values
it renders the same objects, read from deploy/ at test time so the two cannot drift apart; its
other values render objects the API server accepts and settings the services accept; and it
passes `helm lint`. helm itself comes from controlplane/build.sh like the other Go tools.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import Cluster, ClusterInfo
from services.launcher.policy import PodPolicy
from shepherd.authz import load_policy
from tests.helpers.tools import built_tool
from tests.integration.test_deploy_manifests import kustomized_objects

pytestmark = pytest.mark.integration
CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "shepherd"
SERVICES = ("launcher", "watcher", "reconciler")
SETTINGS = {
    "launcher": "services.launcher.settings:LauncherSettings",
    "watcher": "services.watcher.settings:WatcherSettings",
    "reconciler": "services.reconciler.settings:ReconcilerSettings",
}
# Every value away from its default at once, still in the default namespaces (a dry run needs
# them to exist) and with no object whose CRD the local cluster lacks (cert-manager, PodMonitor).
NON_DEFAULT_VALUES: dict[str, Any] = {
    "image": {"repository": "registry.example/shepherd", "tag": "9.9.9", "pullPolicy": "Always"},
    "executorId": "prod-east",
    "policy": {
        "auth": {
            "rules": [
                {
                    "name": "airflow",
                    "identities": ["spiffe://cluster.local/ns/schedulers/sa/airflow"],
                    "rpcs": ["shepherd.v1.LauncherService/*", "shepherd.v1.ReconcilerService/*"],
                },
                {
                    "name": "services",
                    "identities": ["spiffe://cluster.local/ns/shepherd/sa/*"],
                    "rpcs": ["shepherd.v1.*/*"],
                },
            ]
        },
        "pod": {"default": {"allowed_capabilities": ["NET_BIND_SERVICE"]}},
        "allowedCommands": ["python", "bash"],
    },
    "tls": {"clientAuth": "token"},
    "metrics": {"enabled": True, "port": 9100, "podMonitor": True},
    "services": {"launcher": {"storage": "5Gi"}},
}


def helm(*args: str) -> str:
    result = subprocess.run(
        [str(built_tool("helm")), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout


def render(tmp_path: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    args = ["template", "shepherd", str(CHART)]
    if values is not None:
        file = tmp_path / "values.yaml"
        file.write_text(yaml.safe_dump(values))
        args += ["--values", str(file)]
    return [doc for doc in yaml.safe_load_all(helm(*args)) if doc]


def by_identity(objects: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    keyed: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for obj in objects:
        meta = obj["metadata"]
        key = (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])
        assert key not in keyed, f"{key} is rendered twice"
        keyed[key] = obj
    return keyed


def base_metrics_port() -> int | None:
    """The metrics port deploy/base gives the services, if it gives one (the base may gain it
    before or after the chart's default turns metrics on; the comparison follows the base)."""
    for obj in kustomized_objects():
        if obj["kind"] == "Deployment":
            for port in obj["spec"]["template"]["spec"]["containers"][0].get("ports", []):
                if port["name"] == "metrics":
                    return int(port["containerPort"])
    return None


def deployment(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == name
    )
    return found


def container_env(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    container = deployment(objects, name)["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"]}


def test_the_chart_passes_helm_lint(tmp_path: Path) -> None:
    helm("lint", "--strict", str(CHART))
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(NON_DEFAULT_VALUES))
    helm("lint", "--strict", str(CHART), "--values", str(values))


def test_default_values_render_the_kustomize_objects(tmp_path: Path) -> None:
    port = base_metrics_port()
    values = None if port is None else {"metrics": {"enabled": True, "port": port}}
    chart = by_identity(render(tmp_path, values))
    kustomize = by_identity(kustomized_objects())
    assert sorted(chart) == sorted(kustomize)
    for key, expected in kustomize.items():
        assert chart[key] == expected, f"{key} differs from deploy/"


def test_rendered_objects_pass_a_server_side_dry_run(cluster: ClusterInfo, tmp_path: Path) -> None:
    admin = Cluster()._admin()
    for values in (None, NON_DEFAULT_VALUES):
        objects = render(tmp_path, values)
        assert {o["kind"] for o in objects} >= {"Deployment", "Service", "NetworkPolicy", "ConfigMap"}
        for obj in objects:
            if obj["kind"] != "PodMonitor":  # the Prometheus Operator's CRD is not in this cluster
                admin.apply(obj, dry_run=True)


def test_non_default_values_reach_the_services_as_settings_they_accept(tmp_path: Path) -> None:
    import importlib

    objects = render(tmp_path, NON_DEFAULT_VALUES)
    maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    for name in SERVICES:
        env = container_env(objects, name)
        module, _, cls = SETTINGS[name].partition(":")
        fields = set(getattr(importlib.import_module(module), cls).model_fields)
        # metrics_port comes with the metrics work (issue 15 item 3); until that has landed the
        # chart may name it ahead of the services.
        ahead = set() if "metrics_port" in fields else {"SHEPHERD_METRICS_PORT"}
        assert {f"SHEPHERD_{f.upper()}" for f in fields} >= set(env) - ahead, name
        assert env["SHEPHERD_EXECUTOR_ID"] == "prod-east"
        assert env["SHEPHERD_CLIENT_AUTH"] == "token"
        assert env["SHEPHERD_TLS_CERT"] == "/etc/shepherd/tls/tls.crt"
        assert env["SHEPHERD_METRICS_PORT"] == "9100"
        assert env["SHEPHERD_AUTH_POLICY"] == "/etc/shepherd/auth-policy/policy.yaml"
        pod = deployment(objects, name)["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == "registry.example/shepherd:9.9.9"
        assert container["imagePullPolicy"] == "Always"
        assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in container["ports"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert mounts["auth-policy"] == "/etc/shepherd/auth-policy"
        assert volumes["auth-policy"]["configMap"]["name"] == "shepherd-auth-policy"
    launcher = container_env(objects, "launcher")
    assert launcher["SHEPHERD_ALLOWED_COMMANDS"] == "python,bash"
    assert launcher["SHEPHERD_POD_POLICY"] == "/etc/shepherd/pod-policy/policy.yaml"
    assert "SHEPHERD_POD_POLICY" not in container_env(objects, "reconciler")
    # The policy files the ConfigMaps carry are ones the services load.
    auth = tmp_path / "auth.yaml"
    auth.write_text(maps["shepherd-auth-policy"]["policy.yaml"])
    assert [rule.name for rule in load_policy(auth)] == ["airflow", "services"]
    pod_policy = tmp_path / "pod.yaml"
    pod_policy.write_text(maps["shepherd-pod-policy"]["policy.yaml"])
    PodPolicy.load(
        pod_policy,
        worker_service_account="shepherd-worker",
        allowed_commands=["python", "bash"],
        namespaces=["shepherd-workers"],
        template_names=[Path(f).stem for f in maps["pod-templates"]],
    )
    # Metrics are reachable from Prometheus's namespace alone, as in deploy/monitoring/.
    scrape = next(
        o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "prometheus-scrape"
    )
    [rule] = scrape["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == ["metrics"]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] in SERVICES):
        assert "metrics" not in [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    assert claims["launcher-state"]["spec"]["resources"]["requests"]["storage"] == "5Gi"


@pytest.mark.parametrize("mesh", ["mesh", "linkerd"])
def test_a_mesh_mode_mounts_no_certificate(tmp_path: Path, mesh: str) -> None:
    """As deploy/mesh/istio's patch does: the sidecar holds the workload's certificate, and the
    services refuse mesh mode with certificate files of their own."""
    objects = render(tmp_path, {"tls": {"clientAuth": mesh, "certManager": {"enabled": True}}})
    assert not [o for o in objects if o["apiVersion"].startswith("cert-manager.io/")]
    for name in SERVICES:
        env = container_env(objects, name)
        assert env["SHEPHERD_CLIENT_AUTH"] == mesh
        assert not [n for n in env if n.startswith("SHEPHERD_TLS_")]
        pod = deployment(objects, name)["spec"]["template"]["spec"]
        assert "tls" not in {v["name"] for v in pod.get("volumes", [])}
        assert "tls" not in {m["name"] for m in pod["containers"][0].get("volumeMounts", [])}


def test_other_namespaces_move_every_object_and_reference(tmp_path: Path) -> None:
    values = {
        "namespaces": {"services": "sched-svc", "workers": "sched-pods", "schedulers": "airflow"},
        "tls": {"certManager": {"enabled": True, "schedulers": ["airflow"]}},
        "metrics": {"enabled": True, "podMonitor": True},
    }
    objects = render(tmp_path, values)
    text = yaml.safe_dump_all(objects)
    assert "shepherd-workers" not in text
    assert "namespace: shepherd\n" not in text
    assert ".shepherd.svc" not in text
    assert "ns/shepherd/" not in text
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"} == {"sched-svc", "sched-pods"}
    for obj in objects:
        namespace = obj["metadata"].get("namespace")
        if obj["kind"] in ("Role", "RoleBinding") or obj["metadata"]["name"] == "shepherd-worker":
            assert namespace == "sched-pods", obj["metadata"]
        elif (
            obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding")
            and "Policy" not in obj["kind"]
        ):
            assert namespace == "sched-svc", obj["metadata"]
    assert container_env(objects, "reconciler")["SHEPHERD_LAUNCHER_ADDRESS"] == "launcher.sched-svc.svc:50051"
    assert container_env(objects, "launcher")["SHEPHERD_NAMESPACE"] == "sched-pods"
    vap = next(o for o in objects if o["kind"] == "ValidatingAdmissionPolicy")
    assert "system:serviceaccount:sched-svc:reconciler" in vap["spec"]["matchConditions"][0]["expression"]
    certificates = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "Certificate"}
    assert certificates["scheduler-airflow"]["uris"] == ["spiffe://cluster.local/ns/airflow/sa/airflow"]
    assert certificates["launcher"]["dnsNames"][1] == "launcher.sched-svc.svc"
    assert [o["kind"] for o in objects].count("PodMonitor") == 1
