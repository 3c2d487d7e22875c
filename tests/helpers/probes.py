"""The gRPC health service names the kubelet asks for: read from deploy/base, so a test of what a
probe sees follows the manifests rather than a copy of them."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import yaml

DEPLOY_BASE = Path(__file__).resolve().parents[2] / "deploy" / "base"


class Probe(StrEnum):
    """The container probes a Deployment in deploy/base declares."""

    LIVENESS = "livenessProbe"
    READINESS = "readinessProbe"


def probed_service(deployment: str, probe: Probe) -> str:
    """The HealthCheckRequest.service the kubelet sends for `probe` of `deployment` (its gRPC
    probe's `service`; unset means the empty name, as in Kubernetes)."""
    docs = yaml.safe_load_all((DEPLOY_BASE / f"{deployment}.yaml").read_text())
    found = next(d for d in docs if d and d["kind"] == "Deployment")
    container = found["spec"]["template"]["spec"]["containers"][0]
    service: str = container[probe.value]["grpc"].get("service", "")
    return service
