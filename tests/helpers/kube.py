"""Kubernetes clients per identity, and pod fixtures, for integration tests."""

from __future__ import annotations

import uuid
from typing import Any

from kubernetes import client, config


def core_api(kubeconfig: str) -> client.CoreV1Api:
    """A CoreV1Api that acts as whoever the kubeconfig names (admin or a service's ServiceAccount)."""
    return client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def make_pod(
    name: str,
    *,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    cpu: str = "100m",
    node_selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A minimal worker-like pod; behaviour on kwok nodes is chosen by sim.shepherd.dev annotations."""
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "base",
                "image": "example.invalid/worker:1",
                "args": ["true"],
                "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}},
            }
        ],
    }
    if node_selector:
        spec["nodeSelector"] = node_selector
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
        "spec": spec,
    }
