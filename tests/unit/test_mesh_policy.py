"""The Istio AuthorizationPolicy allows every RPC the services really call, and no more.

The calls are found in the code (every call of an RPC method by name, under services/ and, for
the scheduler side, demo/), not listed by hand: a new call without its policy line fails here
instead of being refused with PERMISSION_DENIED in a meshed cluster."""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shepherd.v1 import launcher_service_pb2, reconciler_service_pb2, watcher_service_pb2

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "deploy" / "mesh" / "istio" / "authorization.yaml"
NAMESPACE = "shepherd"
SCHEDULERS = "schedulers"  # the namespace the policy trusts as schedulers
SERVICES = {
    "launcher": launcher_service_pb2.DESCRIPTOR.services_by_name["LauncherService"],
    "watcher": watcher_service_pb2.DESCRIPTOR.services_by_name["WatcherService"],
    "reconciler": reconciler_service_pb2.DESCRIPTOR.services_by_name["ReconcilerService"],
}
# RPC method name -> (the service that serves it, its gRPC path). Names are unique across services.
RPCS = {
    method.name: (name, f"/{service.full_name}/{method.name}")
    for name, service in SERVICES.items()
    for method in service.methods
}


def calls_in(directory: Path) -> Iterator[tuple[Path, str]]:
    """(file, RPC method) for every call of a method named like an RPC, e.g. `stub.GetLaunch(...)`."""
    for path in sorted(directory.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in RPCS:
                yield path, node.func.attr


def called() -> dict[str, set[str]]:
    """Caller identity -> the gRPC paths it calls. Each service runs as the ServiceAccount of its
    name (deploy/base); the demo plays a scheduler."""
    by_caller: dict[str, set[str]] = {}
    for name in SERVICES:
        for _, method in calls_in(ROOT / "services" / name):
            by_caller.setdefault(name, set()).add(RPCS[method][1])
    for _, method in calls_in(ROOT / "demo"):
        by_caller.setdefault("scheduler", set()).add(RPCS[method][1])
    return by_caller


def _matches(patterns: list[str] | None, value: str) -> bool:
    """Istio's string match: exact, prefix `abc*`, suffix `*abc`, or `*`. No list: anything."""
    return patterns is None or any(fnmatch.fnmatchcase(value, p) for p in patterns)


def allowed(target: str, *, namespace: str, principal: str, path: str) -> bool:
    """Whether the ALLOW policy selecting `target`'s pods lets this source call `path`."""
    policies = [
        doc
        for doc in yaml.safe_load_all(POLICY.read_text())
        if doc and doc["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == target
    ]
    assert len(policies) == 1, f"expected one policy for {target}"
    spec = policies[0]["spec"]
    assert spec["action"] == "ALLOW"

    def source_ok(rule: dict[str, Any]) -> bool:
        sources = [f["source"] for f in rule.get("from", [])]
        return not sources or any(
            _matches(s.get("namespaces"), namespace) and _matches(s.get("principals"), principal)
            for s in sources
        )

    def operation_ok(rule: dict[str, Any]) -> bool:
        operations = [t["operation"] for t in rule.get("to", [])]
        return not operations or any(
            _matches(o.get("paths"), path) and _matches(o.get("methods"), "POST") for o in operations
        )

    return any(source_ok(rule) and operation_ok(rule) for rule in spec.get("rules", []))


def identity(caller: str) -> dict[str, str]:
    if caller == "scheduler":
        return {"namespace": SCHEDULERS, "principal": f"cluster.local/ns/{SCHEDULERS}/sa/airflow"}
    return {"namespace": NAMESPACE, "principal": f"cluster.local/ns/{NAMESPACE}/sa/{caller}"}


def test_the_scan_finds_the_calls_it_must() -> None:
    """Guards the scan itself: the calls known to exist are found, in the files that make them."""
    found = called()
    assert {
        "/shepherd.v1.LauncherService/WatchLaunchEvents",
        "/shepherd.v1.WatcherService/WatchPodEvents",
    } <= (found["reconciler"])
    assert "/shepherd.v1.LauncherService/LaunchTask" in found["scheduler"]
    assert len(RPCS) == sum(len(s.methods) for s in SERVICES.values())  # no name served twice


@pytest.mark.parametrize("caller", ["launcher", "watcher", "reconciler", "scheduler"])
def test_every_rpc_a_caller_makes_is_allowed(caller: str) -> None:
    denied = [
        path
        for path in sorted(called().get(caller, set()))
        if not allowed(RPCS[path.rsplit("/", 1)[1]][0], path=path, **identity(caller))
    ]
    assert not denied, f"deploy/mesh/istio would refuse {caller}'s calls: {denied}"


@pytest.mark.parametrize("caller", ["launcher", "watcher", "reconciler"])
def test_a_service_may_call_no_rpc_it_does_not_use(caller: str) -> None:
    """Least privilege between the services: what the policy grants a service is what it calls."""
    granted = {
        path
        for method, (target, path) in RPCS.items()
        if target != caller and allowed(target, path=path, **identity(caller))
    }
    assert granted == called().get(caller, set())


def test_a_stranger_is_refused_everything() -> None:
    stranger = {"namespace": "default", "principal": "cluster.local/ns/default/sa/default"}
    assert not [path for target, path in RPCS.values() if allowed(target, path=path, **stranger)]
