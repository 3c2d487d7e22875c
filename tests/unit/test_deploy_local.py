"""deploy/local/ (the overlay for the local cluster) as controlplane/deploy.py renders it: the base's
objects with only the local differences, and the relocation a test deploys with."""

from __future__ import annotations

from typing import Any

from controlplane.deploy import OVERLAY, merge, relocate, render

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
