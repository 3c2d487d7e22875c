"""deploy/ holds what a real cluster applies: the API server accepts every object (server-side
dry run), and each service keeps one name everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane import Cluster, ClusterInfo
from shepherd.readiness import LIVENESS
from shepherd.v1 import launcher_service_pb2, reconciler_service_pb2, watcher_service_pb2

pytestmark = pytest.mark.integration
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SERVICES = {
    "launcher": launcher_service_pb2.DESCRIPTOR.services_by_name["LauncherService"],
    "watcher": watcher_service_pb2.DESCRIPTOR.services_by_name["WatcherService"],
    "reconciler": reconciler_service_pb2.DESCRIPTOR.services_by_name["ReconcilerService"],
}


def kustomized_objects() -> list[dict[str, Any]]:
    """The objects `kubectl apply -k deploy/` creates (resources plus the generated ConfigMap)."""
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    objects = [
        doc
        for resource in kustomization["resources"]
        for doc in yaml.safe_load_all((DEPLOY / resource).read_text())
        if doc
    ]
    for generator in kustomization.get("configMapGenerator", []):
        data = {Path(f).name: (DEPLOY / f).read_text() for f in generator["files"]}
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"], "namespace": generator["namespace"]},
                "data": data,
            }
        )
    return objects


def test_every_manifest_is_accepted_by_the_api_server(cluster: ClusterInfo) -> None:
    admin = Cluster()._admin()
    objects = kustomized_objects()
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "ServiceAccount", "Role", "RoleBinding"}
    for obj in objects:
        admin.apply(obj, dry_run=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"])
    on_disk = {
        str(p.relative_to(DEPLOY)) for d in ("base", "rbac", "network") for p in (DEPLOY / d).glob("*.yaml")
    }
    assert on_disk <= listed


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_service_has_one_name_everywhere(name: str) -> None:
    objects = {(o["kind"], o["metadata"]["name"]) for o in kustomized_objects()}
    assert {("Deployment", name), ("Service", name), ("ServiceAccount", name), ("Role", name)} <= objects
    assert (Path(__file__).resolve().parents[2] / "services" / name / "server.py").exists()
    assert SERVICES[name].name == f"{name.capitalize()}Service"
    deployment = next(
        o for o in kustomized_objects() if o["kind"] == "Deployment" and o["metadata"]["name"] == name
    )
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == name
    assert pod["containers"][0]["readinessProbe"]["grpc"]["service"] == SERVICES[name].full_name


def test_the_image_holds_what_the_deployments_run() -> None:
    """Cheap checks of the Dockerfile without building it (test_in_cluster.py builds and runs it):
    everything it copies exists and passes .dockerignore, its entrypoint is the interpreter the
    Deployments' `-m services.<name>` args expect, and it runs as the manifests' user."""
    root = DEPLOY.parent
    dockerfile = (root / "Dockerfile").read_text().splitlines()
    copied = [
        source
        for line in dockerfile
        if line.startswith("COPY ") and "--from" not in line
        for source in line.split()[1:-1]
    ]
    allowed = {line[1:] for line in (root / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for source in copied:
        assert (root / source).exists(), source
        assert source in allowed, f"{source} is excluded by .dockerignore"
    assert 'ENTRYPOINT ["python"]' in dockerfile
    assert "USER 1000:1000" in dockerfile
    for deployment in (o for o in kustomized_objects() if o["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        name = deployment["metadata"]["name"]
        assert pod["containers"][0]["args"] == ["-m", f"services.{name}"]
        assert pod["securityContext"]["runAsUser"] == 1000


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_deployment_serves_mutual_tls_from_its_secret_and_probes_in_plaintext(name: str) -> None:
    deployment = next(
        o for o in kustomized_objects() if o["kind"] == "Deployment" and o["metadata"]["name"] == name
    )
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    for setting, file in (("CERT", "tls.crt"), ("KEY", "tls.key"), ("CA", "ca.crt")):
        assert env[f"SHEPHERD_TLS_{setting}"] == f"{mount['mountPath']}/{file}"
    volume = next(v for v in pod["volumes"] if v["name"] == "tls")
    assert volume["secret"]["secretName"] == f"{name}-tls"
    # The settings the Deployment gives are the service's own, and coherent.
    settings_class = {
        "launcher": "services.launcher.settings:LauncherSettings",
        "watcher": "services.watcher.settings:WatcherSettings",
        "reconciler": "services.reconciler.settings:ReconcilerSettings",
    }[name]
    assert {f"SHEPHERD_{f.upper()}" for f in _fields(settings_class)} >= set(env)
    health_port = int(env["SHEPHERD_HEALTH_PORT"])
    assert container["readinessProbe"]["grpc"]["port"] == health_port
    assert container["livenessProbe"]["grpc"]["port"] == health_port
    # Readiness asks the service's own health (every readiness condition); liveness asks the name
    # only a dead root task drops, so an outage elsewhere never gets the container restarted.
    assert container["readinessProbe"]["grpc"]["service"] == SERVICES[name].full_name
    assert container["livenessProbe"]["grpc"].get("service") == LIVENESS


def _fields(path: str) -> set[str]:
    import importlib

    module, _, cls = path.partition(":")
    return set(getattr(importlib.import_module(module), cls).model_fields)


def test_the_istio_layer_switches_every_deployment_to_mesh_identity() -> None:
    """Applies deploy/mesh/istio's JSON patch the way kustomize does and checks that exactly the
    TLS settings and volume go (the patch addresses them by index)."""
    ops = yaml.safe_load((DEPLOY / "mesh" / "istio" / "mesh-identity.yaml").read_text())
    for deployment in (o for o in kustomized_objects() if o["kind"] == "Deployment"):
        before = deployment["spec"]["template"]["spec"]
        after = _json_patch(deployment, ops)["spec"]["template"]["spec"]
        env_before = [e["name"] for e in before["containers"][0]["env"]]
        env_after = [e["name"] for e in after["containers"][0]["env"]]
        tls = ["SHEPHERD_TLS_CERT", "SHEPHERD_TLS_KEY", "SHEPHERD_TLS_CA"]
        assert env_after == [n for n in env_before if n not in tls] + ["SHEPHERD_CLIENT_AUTH"]
        assert "tls" not in {m["name"] for m in after["containers"][0]["volumeMounts"]}
        assert "tls" not in {v["name"] for v in after["volumes"]}
        assert len(after["volumes"]) == len(before["volumes"]) - 1


def _json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    import copy

    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = op["path"].strip("/").split("/")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if op["op"] == "remove":
            del target[int(last)]
        elif last == "-":
            target.append(op["value"])
        else:
            raise AssertionError(f"unexpected patch operation {op}")
    return doc
