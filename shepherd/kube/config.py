"""Where the API server is and how to authenticate: from a kubeconfig file or in-cluster.

The official client's loaders do the parsing (exec plugins, embedded certificates, in-cluster
token rotation); we keep only what an HTTP request needs.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field

from kubernetes import client, config

_REFRESH_EVERY_S = 60.0


@dataclass
class KubeConnection:
    """Server URL, TLS context and the Authorization header (refreshed for rotating tokens)."""

    server: str
    ssl_context: ssl.SSLContext
    _configuration: client.Configuration
    _last_refresh: float = field(default=0.0)

    def headers(self) -> dict[str, str]:
        cfg = self._configuration
        if cfg.refresh_api_key_hook is not None and time.monotonic() - self._last_refresh > _REFRESH_EVERY_S:
            cfg.refresh_api_key_hook(cfg)
            self._last_refresh = time.monotonic()
        token = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
        if not token:
            return {}
        prefix = cfg.api_key_prefix.get("authorization", "")
        return {"Authorization": f"{prefix} {token}".strip()}


def load_connection(kubeconfig: str | None) -> KubeConnection:
    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    if cfg.verify_ssl:
        ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.cert_file and cfg.key_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    return KubeConnection(server=cfg.host.rstrip("/"), ssl_context=ctx, _configuration=cfg)
