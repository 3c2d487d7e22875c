"""Certificates for Shepherd's own gRPC ports and their clients, issued by the local control plane.

A CA of its own (not the API server's), in `<state dir>/grpc-pki/`, signs:
- one certificate per service, for serving and for calling the other services, naming the
  service's ServiceAccount as a SPIFFE ID (spiffe://cluster.local/ns/shepherd/sa/<name>) and
  its host names (localhost, 127.0.0.1, <name>, <name>.shepherd.svc);
- client certificates for schedulers (spiffe://cluster.local/ns/schedulers/sa/<name>), which the
  default policy lets launch, get, list, cancel and watch;
- any other identity on request (`python -m controlplane issue-cert <namespace>/<name>`).

The SPIFFE IDs have the shape Istio gives workloads, so one authorization policy serves the
local certificates, a mesh and ServiceAccount tokens alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from controlplane.pki import Authority
from shepherd.authz import spiffe_id
from shepherd.channels import ClientCredentials

TRUST_DOMAIN = "cluster.local"
SERVICE_NAMESPACE = "shepherd"
SCHEDULER_NAMESPACE = "schedulers"
SERVICES = ("launcher", "watcher", "reconciler")
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class IssuedIdentity:
    """One identity's certificate, key and the CA that signed it (which is also the CA to trust)."""

    spiffe_id: str
    cert: Path
    key: Path
    ca: Path

    def credentials(self) -> ClientCredentials:
        return ClientCredentials(ca=self.ca, cert=self.cert, key=self.key)

    def server_flags(self) -> list[str]:
        """A service's flags for serving (and calling the others) with this certificate."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]


class GrpcAuthority:
    """The CA of Shepherd's gRPC identities under one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.directory = Path(state_dir) / "grpc-pki"
        self._authority = Authority(self.directory, ca_name="shepherd-grpc-ca")

    @property
    def ca(self) -> Path:
        return self._authority.ca.cert

    def service(self, name: str) -> IssuedIdentity:
        """A service's certificate: server and client, for its ServiceAccount in `shepherd`."""
        identity = spiffe_id(TRUST_DOMAIN, SERVICE_NAMESPACE, name)
        pair = self._authority.issue(
            f"service-{name}",
            common_name=name,
            server_hosts=["localhost", "127.0.0.1", name, f"{name}.{SERVICE_NAMESPACE}.svc"],
            uris=[identity],
            client=True,
        )
        return IssuedIdentity(identity, pair.cert, pair.key, self.ca)

    def client(self, namespace: str, name: str) -> IssuedIdentity:
        """A client certificate for ServiceAccount `namespace/name` (a scheduler, a tool)."""
        for label, value in (("namespace", namespace), ("name", name)):
            if not _LABEL.match(value):
                raise ValueError(f"{label} {value!r} must be a DNS-1123 label")
        identity = spiffe_id(TRUST_DOMAIN, namespace, name)
        pair = self._authority.issue(f"client-{namespace}-{name}", common_name=name, uris=[identity])
        return IssuedIdentity(identity, pair.cert, pair.key, self.ca)

    def scheduler(self, name: str = "scheduler") -> IssuedIdentity:
        return self.client(SCHEDULER_NAMESPACE, name)

    def ensure(self) -> dict[str, IssuedIdentity]:
        """Everything the demo, the tests and the benchmark use: the services and a scheduler."""
        issued = {name: self.service(name) for name in SERVICES}
        issued["scheduler"] = self.scheduler()
        return issued
