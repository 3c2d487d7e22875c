"""Settings every service has: where to listen, how to log, which executor it is, how to reach
Kubernetes. Each service subclasses this and adds its own documented fields.

Values come from flags (`--port 50051`), then the environment (`SHEPHERD_PORT=50051`), then the
defaults; a bad value stops the process at start-up with the field's name.

The transport settings are secure by default: without certificate files the gRPC port may only be
plaintext on a loopback address, and anything else is an explicit choice (`--insecure`, or
`--client-auth mesh` when a service mesh does mutual TLS).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Literal, Self, TypeVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shepherd import tracing
from shepherd.eventlog import MESSAGE_INTERVAL_S

S = TypeVar("S", bound="ServiceSettings")
_DAY_S = 24 * 3600.0


def state_dir() -> Path:
    """Where a service keeps its SQLite file by default (XDG state directory); use a volume in a cluster."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "shepherd"


class ClientAuth(StrEnum):
    """How a service learns who is calling it."""

    CERTIFICATE = "certificate"  # mutual TLS: the caller's certificate (SPIFFE URI SAN, else its CN)
    TOKEN = "token"  # TLS, and a bearer token checked with the Kubernetes TokenReview API
    MESH = "mesh"  # an Istio/Envoy sidecar does mutual TLS; its x-forwarded-client-cert names the caller
    LINKERD = "linkerd"  # a Linkerd proxy does mutual TLS; its l5d-client-id header names the caller

    @property
    def is_mesh(self) -> bool:
        return self in (ClientAuth.MESH, ClientAuth.LINKERD)


DEFAULT_OPEN_RPCS = (
    "grpc.health.v1.Health/*,grpc.reflection.v1alpha.ServerReflection/*,grpc.reflection.v1.ServerReflection/*"
)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_EXECUTOR_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")
_NAMESPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ServiceSettings(BaseSettings):
    """Common settings of the three services."""

    model_config = SettingsConfigDict(
        env_prefix="SHEPHERD_", frozen=True, extra="forbid", cli_kebab_case=True, cli_implicit_flags=True
    )

    host: str = Field(default="0.0.0.0", description="Address the gRPC server binds to.")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    log_json: bool = Field(default=True, description="JSON log lines (false: human-readable, for terminals).")
    executor_id: str = Field(
        default="shepherd",
        description="This executor's id, kept in every pod's labels; adoption and selectors use it. "
        "Lowercase letters, digits and '-', at most 42 characters.",
    )
    kubeconfig: str | None = Field(
        default=None, description="Kubeconfig to use; unset means in-cluster ServiceAccount credentials."
    )
    namespace: str = Field(
        default="shepherd-workers",
        description="Namespace worker pods are created in unless a task's pod override names another; "
        "deploy/ keeps it apart from the services' own namespace.",
    )
    watch_namespaces: str = Field(
        default="",
        description="Further namespaces worker pods may live in: a comma-separated list, or '*' for every "
        "namespace (which needs the ClusterRole variant of the RBAC in deploy/). Empty: only `namespace`.",
    )
    shutdown_grace_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="On SIGTERM, how long running RPCs may finish before being cut.",
    )
    stream_interval_s: float = Field(
        default=MESSAGE_INTERVAL_S,
        ge=0,
        le=1,
        description="Under a steady flow of events, each event stream this service serves sends at most "
        "one message per interval, carrying everything that arrived meanwhile; an event after a quiet "
        "spell goes out at once. Each message wakes both processes, which costs far more CPU than the "
        "events in it, so a longer interval trades up to that much latency per hop for less CPU.",
    )

    # ---- transport security, identity, authorization (see README, "Security") ----------------
    tls_cert: Path | None = Field(
        default=None,
        description="PEM certificate this service serves and presents to the other services (mutual TLS).",
    )
    tls_key: Path | None = Field(default=None, description="PEM private key of tls_cert.")
    tls_ca: Path | None = Field(
        default=None,
        description="PEM CA bundle that callers' and the other services' certificates must chain to.",
    )
    client_auth: ClientAuth = Field(
        default=ClientAuth.CERTIFICATE,
        description="How callers are identified: 'certificate' (mutual TLS), 'token' (TLS plus a bearer "
        "token checked with the TokenReview API, for clients that cannot hold certificates), 'mesh' "
        "(plaintext behind an Istio/Envoy sidecar doing mutual TLS; the caller is read from the sidecar's "
        "x-forwarded-client-cert header, so only use it with the mesh's mTLS set to STRICT), or 'linkerd' "
        "(the same behind a Linkerd proxy, reading its l5d-client-id header; only with the port's "
        "Linkerd policy requiring mutual TLS).",
    )
    insecure: bool = Field(
        default=False,
        description="Serve plaintext without authentication on any address (a warning is logged). "
        "Without certificate files plaintext is otherwise only allowed on a loopback host.",
    )
    trust_domain: str = Field(
        default="cluster.local",
        description="SPIFFE trust domain a ServiceAccount token's user is mapped into "
        "(spiffe://<trust_domain>/ns/<namespace>/sa/<name>), and of the default policy's identities.",
    )
    token_audiences: str = Field(
        default="",
        description="client_auth=token: comma-separated audiences a caller's token must carry; empty "
        "accepts tokens for the API server's own audiences.",
    )
    client_token_file: Path | None = Field(
        default=None,
        description="client_auth=token: the bearer token this service presents to the other services; "
        "unset uses the in-cluster ServiceAccount token.",
    )
    auth_policy: Path | None = Field(
        default=None,
        description="YAML file saying which identities may call which RPCs; unset: the default policy "
        "(schedulers: spiffe://<trust_domain>/ns/schedulers/sa/*; the services by their ServiceAccounts).",
    )
    open_rpcs: str = Field(
        default=DEFAULT_OPEN_RPCS,
        description="Comma-separated RPCs (package.Service/Method, '*' allowed) any authenticated "
        "or not caller may use: health and reflection by default.",
    )
    health_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Also serve grpc.health.v1 alone, in plaintext, on this port (for the kubelet's "
        "gRPC probes, which cannot do TLS); 0: no such port. Must differ from port and metrics_port.",
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Serve Prometheus metrics (GET /metrics) in plaintext on this port, on `host`; 0: none. "
        "Must differ from port and health_port. Names start with shepherd_ (README.md, Metrics).",
    )
    # ---- tracing (shepherd.tracing; README.md, Tracing) -------------------------------------------
    otlp_endpoint: str = Field(
        default="",
        description="Trace with OpenTelemetry and export the spans by OTLP/gRPC to this collector: "
        "'http://host:4317' (plaintext) or 'https://host:4317' (TLS; the standard "
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE and _HEADERS variables apply). Needs the `otlp` extra. "
        "Empty, and no trace_file: no tracing at all. Turn it on in all three services.",
    )
    trace_sample_ratio: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Fraction of launches traced, chosen by trace id so the three services agree; a "
        "LaunchTask whose caller sent a traceparent follows the caller's sampling decision instead.",
    )
    trace_service_name: str = Field(
        default="",
        max_length=255,
        description="The spans' service.name; empty: shepherd-<service> (shepherd-launcher, ...).",
    )
    trace_file: Path | None = Field(
        default=None,
        description="Also write each span, as it ends, as one JSON line to this file (tests and "
        "debugging: written synchronously, not for production traffic).",
    )
    # ---- bounded resources ---------------------------------------------------------------------
    max_receive_message_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=64 * 1024,
        le=64 * 1024 * 1024,
        description="Largest request message accepted; larger ones get RESOURCE_EXHAUSTED.",
    )
    max_streams_per_identity: int = Field(
        default=64, ge=1, description="Open server streams (Watch*, GetTaskLogs) one caller may hold."
    )
    max_streams: int = Field(default=1024, ge=1, description="Open server streams of all callers together.")
    max_inflight_unary: int = Field(
        default=1024, ge=1, description="Unary calls being served at once; beyond it RESOURCE_EXHAUSTED."
    )
    launch_rate: float = Field(
        default=500.0,
        ge=0,
        description="Launches per second one caller may make on average (LaunchTask, and each task of "
        "BatchLaunchTasks); beyond it RESOURCE_EXHAUSTED with a google.rpc.RetryInfo. 0: no limit.",
    )
    launch_burst: int = Field(
        default=5000, ge=1, description="Launches one caller may make at once before launch_rate applies."
    )

    @model_validator(mode="after")
    def _transport_is_explicit(self) -> Self:
        files = {"tls_cert": self.tls_cert, "tls_key": self.tls_key, "tls_ca": self.tls_ca}
        given = [name for name, path in files.items() if path is not None]
        plaintext = self.insecure or self.client_auth.is_mesh
        if plaintext and given:
            raise ValueError(f"{', '.join(given)}: no certificate files with insecure or client_auth=mesh")
        if not plaintext and given and len(given) != len(files):
            missing = sorted(set(files) - set(given))
            raise ValueError(f"{', '.join(missing)}: tls_cert, tls_key and tls_ca go together")
        if self.client_auth is ClientAuth.TOKEN and not given:
            raise ValueError("client_auth=token: bearer tokens need TLS; give tls_cert, tls_key and tls_ca")
        # Plaintext on a host that is not loopback is refused when the server starts
        # (shepherd.security.transport), so settings used for anything else need no certificates.
        return self

    @model_validator(mode="after")
    def _ports_are_distinct(self) -> Self:
        # Caught here, before anything listens: otherwise the second bind fails after the gRPC port
        # is already serving. 0 picks a free port, so it never collides.
        ports = {"port": self.port, "health_port": self.health_port, "metrics_port": self.metrics_port}
        taken: dict[int, str] = {}
        for name, port in ports.items():
            if port and port in taken:
                raise ValueError(f"{taken[port]} and {name}: both are {port}; each needs a port of its own")
            taken.setdefault(port, name)
        return self

    @field_validator("otlp_endpoint")
    @classmethod
    def _otlp_endpoint_is_usable(cls, value: str) -> str:
        return tracing.check_endpoint(value)

    @field_validator("executor_id")
    @classmethod
    def _executor_id_is_label_safe(cls, value: str) -> str:
        if not _EXECUTOR_ID.match(value):
            raise ValueError(
                "must be 1-42 lowercase letters, digits or '-', starting and ending alphanumeric"
            )
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace_is_dns_label(cls, value: str) -> str:
        if not _NAMESPACE.match(value):
            raise ValueError("must be a DNS-1123 label (lowercase letters, digits, '-'; at most 63)")
        return value

    @field_validator("watch_namespaces")
    @classmethod
    def _namespaces_are_dns_labels(cls, value: str) -> str:
        if value.strip() == "*":
            return "*"
        for name in filter(None, (n.strip() for n in value.split(","))):
            if not _NAMESPACE.match(name):
                raise ValueError(f"{name!r} is not a DNS-1123 label")
        return value

    @property
    def namespaces(self) -> list[str] | None:
        """The namespaces worker pods may live in, `namespace` first; None means every namespace."""
        if self.watch_namespaces == "*":
            return None
        extra = [n.strip() for n in self.watch_namespaces.split(",") if n.strip()]
        return [self.namespace, *(n for n in dict.fromkeys(extra) if n != self.namespace)]

    @classmethod
    def load(cls: type[S], argv: Sequence[str] | None = None) -> S:
        """Read flags (argv), then environment, then defaults."""
        return cls(_cli_parse_args=list(argv) if argv is not None else [])  # type: ignore[call-arg]


class StoreSettings(ServiceSettings):
    """Settings of a service that keeps durable state in SQLite (the launcher and the reconciler)."""

    store_synchronous: Literal["OFF", "NORMAL", "FULL"] = Field(
        default="FULL",
        description="SQLite synchronous mode: FULL survives power loss, NORMAL only process crashes.",
    )
    # ---- retention (shepherd.retention) ---------------------------------------------------------
    retention_s: float = Field(
        default=7 * _DAY_S,
        gt=0,
        description="Log entries (launch events, task transitions) older than this are pruned, and "
        "with them finished tasks and launches whose task ended that long ago. A cursor older than "
        "the retention gets OUT_OF_RANGE, and a LaunchTask repeated for a pruned key is a new launch.",
    )
    retention_max_entries: int = Field(
        default=0,
        ge=0,
        description="Also prune the oldest log entries beyond this many (0: no count limit). Never "
        "removes a task that has not finished, nor a launch still waiting for its pod.",
    )
    retention_interval_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="How often retention runs: a tick marks the log's head with the time (the age "
        "resolution) and prunes what is due, in small batches.",
    )
    retention_batch: int = Field(
        default=500, ge=1, le=10_000, description="Log entries pruned per transaction at most."
    )
