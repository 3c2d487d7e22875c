"""A tiny synchronous JSON client for bootstrapping the local cluster as its admin.

The tooling needs a handful of calls (server-side apply, TokenRequest, /readyz) before any
service exists; a dozen lines of http.client keep it free of client-model quirks.
"""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

# Kinds whose objects are not namespaced; everything else we apply lives in a namespace.
_CLUSTER_SCOPED = {
    "Namespace",
    "Node",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
}


class ApiError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass
class AdminClient:
    host: str
    port: int
    ca_file: str
    cert_file: str
    key_file: str
    timeout: float = 10.0

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
    ) -> Any:
        conn = http.client.HTTPSConnection(
            self.host, self.port, context=self._context(), timeout=self.timeout
        )
        try:
            url = path + ("?" + urlencode(query) if query else "")
            payload = (
                None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            )
            conn.request(
                method,
                url,
                body=payload,
                headers={"Content-Type": content_type, "Accept": "application/json"},
            )
            resp = conn.getresponse()
            data = resp.read().decode(errors="replace")
        finally:
            conn.close()
        if resp.status >= 400:
            raise ApiError(resp.status, data)
        try:
            return json.loads(data) if data else None
        except json.JSONDecodeError:
            return data

    def apply(
        self, obj: dict[str, Any], field_manager: str = "shepherd-controlplane", *, dry_run: bool = False
    ) -> Any:
        """Server-side apply: idempotent, so `up` can run against a cluster that already has it.
        With dry_run the API server validates and defaults the object but stores nothing."""
        query = {"fieldManager": field_manager, "force": "true"}
        if dry_run:
            query["dryRun"] = "All"
        return self.request(
            "PATCH", object_path(obj), obj, content_type="application/apply-patch+yaml", query=query
        )


def object_path(obj: dict[str, Any]) -> str:
    api_version: str = obj["apiVersion"]
    kind: str = obj["kind"]
    name: str = obj["metadata"]["name"]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    lower = kind.lower()
    plural = lower[:-1] + "ies" if lower.endswith("y") else lower + "s"
    if kind in _CLUSTER_SCOPED:
        return f"{base}/{plural}/{name}"
    namespace = obj["metadata"].get("namespace")
    if not namespace:
        raise ValueError(f"{kind}/{name} must name its namespace")
    return f"{base}/namespaces/{namespace}/{plural}/{name}"
