"""deploy/local/ (the overlay for the local cluster) as controlplane/deploy.py renders it: the base's
objects with only the local differences, and the relocation a test deploys with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controlplane import Cluster, ClusterSettings
from controlplane.deploy import OVERLAY, Deployment, merge, relocate, render
from controlplane.kubeapi import ApiError, object_path
from controlplane.serviceproxy import NoEndpoint, ready_endpoint

BASE = OVERLAY.parent


def _deployments(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}


def test_a_strategic_merge_deletes_on_null_and_merges_named_lists_by_name() -> None:
    base = {"volumes": [{"name": "a", "pvc": {"claim": "x"}}, {"name": "b"}], "keep": 1}
    patch = {"volumes": [{"name": "a", "pvc": None, "emptyDir": {}}, {"name": "c"}], "drop": None}
    assert merge(base, patch) == {
        "volumes": [{"name": "a", "emptyDir": {}}, {"name": "b"}, {"name": "c"}],
        "keep": 1,
    }
    assert merge({"args": ["a", "b"]}, {"args": ["c"]}) == {"args": ["c"]}


def test_the_overlay_keeps_every_base_object_but_the_unused_claims() -> None:
    base = {(o["kind"], o["metadata"]["name"]) for o in render(BASE)}
    local = {(o["kind"], o["metadata"]["name"]) for o in render()}
    assert base - local == {
        ("PersistentVolumeClaim", "launcher-state"),
        ("PersistentVolumeClaim", "reconciler-state"),
    }
    assert local <= base


def test_each_local_deployment_runs_hardened_on_the_real_node_from_the_local_image() -> None:
    base, local = _deployments(render(BASE)), _deployments(render())
    assert set(local) == {"launcher", "watcher", "reconciler"}
    for name, deployment in local.items():
        pod = deployment["spec"]["template"]["spec"]
        before = base[name]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        (original,) = before["containers"]
        assert pod["nodeSelector"] == {"shepherd.dev/real-node": "true"}
        assert {
            "key": "shepherd.dev/real-node",
            "operator": "Equal",
            "value": "true",
            "effect": "NoSchedule",
        } in pod["tolerations"]
        assert container["image"].startswith("shepherd.local/shepherd:")
        assert container["imagePullPolicy"] == "Never"
        # The hardening and the probes are the base's, untouched.
        assert pod["securityContext"] == before["securityContext"]
        assert pod["serviceAccountName"] == name
        for field in ("securityContext", "readinessProbe", "livenessProbe", "args", "ports", "volumeMounts"):
            assert container[field] == original[field], field
        assert not any("hostPath" in v or "persistentVolumeClaim" in v for v in pod["volumes"])
        # Every name the service dials resolves (no cluster DNS): its peers and the API server.
        env = {e["name"]: e["value"] for e in container["env"]}
        aliased = {h for alias in pod["hostAliases"] for h in alias["hostnames"]}
        dialled = {v.rsplit(":", 1)[0] for k, v in env.items() if k.endswith("_ADDRESS")}
        assert dialled | {env["KUBERNETES_SERVICE_HOST"]} <= aliased
        # Settings the base gives are kept, with the in-cluster API server's address added.
        assert {e["name"] for e in original["env"]} <= set(env)


def test_relocation_leaves_nothing_in_the_shepherd_namespaces_or_under_their_cluster_wide_names() -> None:
    objects = render()
    moved = relocate(objects, "elsewhere", "elsewhere-workers")
    assert len(moved) == len(objects)
    cluster_wide = {o["metadata"]["name"] for o in objects if "namespace" not in o["metadata"]}
    for obj in moved:
        meta = obj["metadata"]
        assert meta.get("namespace") in (None, "elsewhere", "elsewhere-workers")
        assert meta["name"] not in cluster_wide
        for subject in obj.get("subjects", []):
            assert subject.get("namespace", "elsewhere") in ("elsewhere", "elsewhere-workers")
        text = str(obj)
        assert "system:serviceaccount:shepherd:" not in text
        assert "'shepherd-workers'" not in text
    bindings = [o for o in moved if o["kind"] == "RoleBinding" and o["metadata"]["name"] == "launcher"]
    assert bindings[0]["metadata"]["namespace"] == "elsewhere-workers"
    assert bindings[0]["subjects"] == [
        {"kind": "ServiceAccount", "name": "launcher", "namespace": "elsewhere"}
    ]


class _FakeAdmin:
    """Records the API calls; every object is already gone (404 on GET)."""

    def __init__(self, answers: dict[str, Any] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.answers = answers or {}

    def request(self, method: str, path: str, body: Any = None, **_: Any) -> Any:
        self.calls.append((method, path))
        if path in self.answers:
            return self.answers[path]
        if method == "GET":
            raise ApiError(404, "not found")
        return None


def _deployment(tmp_path: Path, namespace: str, workers: str, admin: _FakeAdmin) -> Deployment:
    cluster = Cluster(ClusterSettings(state_dir=tmp_path / "state", cache_dir=tmp_path / "cache"))
    deployment = Deployment(cluster, "shepherd.local/shepherd:test", namespace, workers)
    deployment.__dict__["admin"] = admin  # instead of the property's real client
    return deployment


@pytest.fixture(autouse=True)
def _fake_admin_property(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Deployment, "admin", property(lambda self: self.__dict__["admin"]))


def test_removing_the_shepherd_deployment_leaves_what_the_clusters_bootstrap_applied(tmp_path: Path) -> None:
    admin = _FakeAdmin()
    deployment = _deployment(tmp_path, "shepherd", "shepherd-workers", admin)
    assert {o["metadata"].get("namespace") for o in deployment.objects} <= {
        None,
        "shepherd",
        "shepherd-workers",
    }
    deployment.remove()
    deleted = {path for method, path in admin.calls if method == "DELETE"}
    assert "/apis/apps/v1/namespaces/shepherd/deployments/launcher" in deleted
    assert "/api/v1/namespaces/shepherd/secrets/launcher-tls" in deleted
    for kept in ("/api/v1/namespaces/shepherd", "/api/v1/namespaces/shepherd/serviceaccounts/launcher"):
        assert kept not in deleted
    assert not any("rbac.authorization.k8s.io" in p or "admissionregistration" in p for p in deleted)


def test_removing_a_relocated_deployment_deletes_everything_it_applied(tmp_path: Path) -> None:
    admin = _FakeAdmin()
    deployment = _deployment(tmp_path, "elsewhere", "elsewhere-workers", admin)
    deployment.remove()
    deleted = {path for method, path in admin.calls if method == "DELETE"}
    assert deleted == {object_path(o) for o in deployment.objects}
    assert "/api/v1/namespaces/elsewhere" in deleted


def test_the_service_proxy_picks_a_ready_endpoint_on_the_target_port_of_the_services_port() -> None:
    service = {"spec": {"ports": [{"name": "grpc", "port": 50051, "targetPort": "grpc"}]}}
    slices = {
        "items": [
            {
                "ports": [{"name": "grpc", "port": 50051}],
                "endpoints": [
                    {"addresses": ["10.89.0.7"], "conditions": {"ready": False}},
                    {"addresses": ["10.89.0.8"], "conditions": {"ready": True}},
                ],
            }
        ]
    }
    admin = _FakeAdmin(
        {
            "/api/v1/namespaces/ns/services/launcher": service,
            "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices": slices,
        }
    )
    assert ready_endpoint(admin, "ns", "launcher", 50051) == ("10.89.0.8", 50051)  # type: ignore[arg-type]
    with pytest.raises(NoEndpoint):
        ready_endpoint(admin, "ns", "launcher", 50052)  # type: ignore[arg-type]
    slices["items"][0]["endpoints"] = []
    with pytest.raises(NoEndpoint):
        ready_endpoint(admin, "ns", "launcher", 50051)  # type: ignore[arg-type]
