"""deploy/network/policies.yaml lets exactly the callers the default authorization policy trusts
reach each service's gRPC port: derived from shepherd/authz.py, so a new caller or RPC cannot be
allowed by one layer and silently blocked by the other. (The local cluster's network plugin does
not enforce NetworkPolicy, so this is checked here rather than by connecting.)"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from shepherd import authz

ROOT = Path(__file__).resolve().parents[2]
POLICIES = [d for d in yaml.safe_load_all((ROOT / "deploy/network/policies.yaml").read_text()) if d]
SERVICES_NAMESPACE = "shepherd"
WORKERS_NAMESPACE = "shepherd-workers"
SERVICE_OF = {
    "shepherd.v1.LauncherService": "launcher",
    "shepherd.v1.WatcherService": "watcher",
    "shepherd.v1.ReconcilerService": "reconciler",
}


def peer_of(identity: str) -> tuple[str, str]:
    """A SPIFFE ID as the NetworkPolicy peer that holds it: ("namespace", ns) for a whole
    namespace's accounts, ("pod", app) for one of the services."""
    _, _, path = identity.partition("://")
    _, _, namespace, _, account = path.split("/")
    if account == "*":
        return ("namespace", namespace)
    assert namespace == SERVICES_NAMESPACE, identity
    return ("pod", account)


def expected_peers() -> dict[str, set[tuple[str, str]]]:
    peers: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for rule in authz.default_policy("cluster.local"):
        for rpc in rule.rpcs:
            service = SERVICE_OF[rpc.strip("/").split("/")[0]]
            peers[service].update(peer_of(identity) for identity in rule.identities)
    return peers


def policy(name: str) -> dict[str, Any]:
    return next(p for p in POLICIES if p["metadata"]["name"] == name)


def grpc_peers(service: str) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    for ingress in policy(service)["spec"]["ingress"]:
        if {p["port"] for p in ingress["ports"]} != {"grpc"}:
            continue
        for peer in ingress["from"]:
            if "namespaceSelector" in peer:
                assert "podSelector" not in peer
                found.add(
                    ("namespace", peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
                )
            else:
                found.add(("pod", peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]))
    return found


def test_each_grpc_port_admits_exactly_the_callers_the_default_policy_trusts() -> None:
    expected = expected_peers()
    assert set(expected) == set(SERVICE_OF.values())
    for service in SERVICE_OF.values():
        spec = policy(service)["spec"]
        assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": service}}
        assert grpc_peers(service) == expected[service], service


def test_health_ports_are_open_to_probes_and_nothing_else_is_open_to_all() -> None:
    for service in SERVICE_OF.values():
        open_rules = [i for i in policy(service)["spec"]["ingress"] if "from" not in i]
        assert [[p["port"] for p in i["ports"]] for i in open_rules] == [["health"]], service


def test_both_namespaces_deny_other_ingress_and_workers_reach_no_service() -> None:
    denies = {
        p["metadata"]["namespace"]
        for p in POLICIES
        if p["spec"]["podSelector"] == {}
        and p["spec"]["policyTypes"] == ["Ingress"]
        and "ingress" not in p["spec"]
    }
    assert denies == {SERVICES_NAMESPACE, WORKERS_NAMESPACE}
    for service in SERVICE_OF.values():
        assert ("namespace", WORKERS_NAMESPACE) not in grpc_peers(service)
