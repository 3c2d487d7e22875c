"""deploy/monitoring/ fits deploy/base: the PodMonitor scrapes a port every Deployment names and
serves metrics on, and the dashboard is valid JSON that queries only shepherd_ and process_
metrics (that each exists is checked against live services in tests/integration/test_metrics.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MONITORING = DEPLOY / "monitoring"


def _deployment(name: str) -> dict[str, Any]:
    docs = yaml.safe_load_all((DEPLOY / "base" / f"{name}.yaml").read_text())
    return next(d for d in docs if d and d["kind"] == "Deployment")


@pytest.mark.parametrize("name", ["launcher", "watcher", "reconciler"])
def test_the_pod_monitor_scrapes_the_port_each_service_serves_metrics_on(name: str) -> None:
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    deployment = _deployment(name)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = monitor["spec"]["selector"]
    assert selector["matchLabels"].items() <= labels.items()
    assert all(labels.get(e["key"]) in e["values"] for e in selector["matchExpressions"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port = next(p for p in container["ports"] if p["name"] == endpoint["port"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SHEPHERD_METRICS_PORT"] == str(port["containerPort"])


def test_the_monitoring_layer_builds_on_the_base_and_ships_the_dashboard() -> None:
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert "../" in kustomization["resources"]
    assert "podmonitor.yaml" in kustomization["resources"]
    assert "network-policy.yaml" in kustomization["resources"]
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["grafana-dashboard.json"]


def test_the_dashboard_queries_only_shepherd_and_process_metrics() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        names = re.findall(r"\b([a-z_]+)\{", expr)
        assert names, expr
        assert all(n.startswith(("shepherd_", "process_")) for n in names), expr


def test_the_network_policy_opens_the_metrics_port_and_only_it() -> None:
    policy = yaml.safe_load((MONITORING / "network-policy.yaml").read_text())
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert rule["from"], "open to everyone"
