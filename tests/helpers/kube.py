"""Kubernetes clients per identity, and pod fixtures, for integration tests."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config


def core_api(kubeconfig: str) -> client.CoreV1Api:
    """A CoreV1Api that acts as whoever the kubeconfig names (admin or a service's ServiceAccount)."""
    return client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))


# The workers' namespace enforces the restricted Pod Security Standard (deploy/namespace.yaml), so
# a pod a test makes there directly must meet it, as the launcher's pods do.
RESTRICTED_POD: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
RESTRICTED_CONTAINER: dict[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


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
        "securityContext": RESTRICTED_POD,
        "containers": [
            {
                "name": "base",
                "image": "example.invalid/worker:1",
                "args": ["true"],
                "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}},
                "securityContext": RESTRICTED_CONTAINER,
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


class Caller:
    """Calls the API server as the identity a kubeconfig holds (a bearer token or a client certificate)."""

    def __init__(self, kubeconfig: str) -> None:
        doc = yaml.safe_load(Path(kubeconfig).read_text())
        cluster = doc["clusters"][0]["cluster"]
        user = doc["users"][0]["user"]
        server = cluster["server"].removeprefix("https://")
        self.host, port = server.rsplit(":", 1)
        self.port = int(port)
        self.ctx = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
        self.headers: dict[str, str] = {}
        if "token" in user:
            self.headers["Authorization"] = f"Bearer {user['token']}"
        else:
            self._keep = tempfile.TemporaryDirectory()
            cert, key = Path(self._keep.name, "c.pem"), Path(self._keep.name, "k.pem")
            cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
            key.write_bytes(base64.b64decode(user["client-key-data"]))
            self.ctx.load_cert_chain(str(cert), str(key))

    def request(self, method: str, path: str, body: Any = None, content_type: str = "") -> tuple[int, Any]:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=30)
        try:
            headers = {**self.headers, "Accept": "application/json"}
            if content_type:
                headers["Content-Type"] = content_type
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()

    def patch_pod(self, namespace: str, name: str, patch: Any, *, dry_run: bool) -> tuple[int, Any]:
        path = f"/api/v1/namespaces/{namespace}/pods/{name}" + ("?dryRun=All" if dry_run else "")
        return self.request("PATCH", path, patch, "application/merge-patch+json")

    def pod(self, namespace: str, name: str) -> dict[str, Any]:
        status, body = self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
        assert status == 200, body
        pod: dict[str, Any] = body
        return pod
