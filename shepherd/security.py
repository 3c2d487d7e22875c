"""What a service's settings mean for its transport: how its port is secured, how callers are
identified, what its own client channels present, and what to warn about at start.

Kept apart from grpcserver.py so the decision is one pure function of the settings (unit-tested),
and so the server and the client side of a service can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import grpc

from shepherd.authn import LINKERD_HEADER, XFCC_HEADER
from shepherd.channels import PLAINTEXT, ClientCredentials
from shepherd.settings import ClientAuth, ServiceSettings, is_loopback

# Where the kubelet mounts a pod's ServiceAccount token (rotated in place).
IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class TransportError(ValueError):
    """The settings ask for a transport that is not allowed; the message says what to set."""


class Mode(StrEnum):
    MTLS = "mtls"  # TLS; callers identified by their certificates
    TOKEN = "token"  # TLS; callers identified by bearer tokens (TokenReview)
    MESH = "mesh"  # plaintext behind a sidecar; callers identified by x-forwarded-client-cert
    PLAINTEXT = "plaintext"  # no TLS and no identity: loopback without certificates, or --insecure


@dataclass(frozen=True)
class Transport:
    mode: Mode
    # None: the port is plaintext.
    server_credentials: grpc.ServerCredentials | None
    # What this service presents when it calls the other services.
    client: ClientCredentials
    # Said once at start, at warning level: every way this setup is weaker than the default.
    warnings: tuple[str, ...] = ()

    @property
    def authenticates(self) -> bool:
        """False: nobody is identified, so every caller may call every RPC (the policy is not used)."""
        return self.mode is not Mode.PLAINTEXT


def transport(settings: ServiceSettings) -> Transport:
    """The transport the settings ask for (the settings have already refused incoherent ones);
    TransportError for plaintext on an address that is not loopback, unless asked for."""
    if settings.insecure:
        where = (
            "a loopback address"
            if is_loopback(settings.host)
            else f"{settings.host}, reachable from the network"
        )
        return Transport(
            Mode.PLAINTEXT,
            None,
            PLAINTEXT,
            (f"insecure: plaintext gRPC on {where} with no authentication; every caller may call every RPC",),
        )
    if settings.client_auth.is_mesh:
        header = LINKERD_HEADER if settings.client_auth is ClientAuth.LINKERD else XFCC_HEADER
        return Transport(
            Mode.MESH,
            None,
            PLAINTEXT,
            (
                f"client_auth={settings.client_auth}: plaintext gRPC; callers are identified by the "
                f"mesh's {header} header, which is only trustworthy with the mesh's mutual TLS "
                "required for this port",
            ),
        )
    if settings.tls_cert is None or settings.tls_key is None or settings.tls_ca is None:
        if not is_loopback(settings.host):
            raise TransportError(
                f"host {settings.host!r}: without tls_cert/tls_key/tls_ca the gRPC port would be "
                "plaintext, which is allowed on a loopback host alone; give the certificate files, "
                "bind to 127.0.0.1, or choose insecure (or client_auth=mesh behind a service mesh)"
            )
        return Transport(
            Mode.PLAINTEXT,
            None,
            PLAINTEXT,
            (
                f"no certificate files: plaintext gRPC on loopback ({settings.host}) with no "
                "authentication; every local process may call every RPC",
            ),
        )
    ca = settings.tls_ca.read_bytes()
    pair = [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
    if settings.client_auth is ClientAuth.TOKEN:
        token_file = settings.client_token_file or IN_CLUSTER_TOKEN
        return Transport(
            Mode.TOKEN,
            grpc.ssl_server_credentials(pair),
            ClientCredentials(ca=settings.tls_ca, token_file=token_file),
        )
    return Transport(
        Mode.MTLS,
        grpc.ssl_server_credentials(pair, root_certificates=ca, require_client_auth=True),
        ClientCredentials(ca=settings.tls_ca, cert=settings.tls_cert, key=settings.tls_key),
    )
