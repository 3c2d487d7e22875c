"""Settings every service has: where to listen, how to log, which executor it is, how to reach
Kubernetes. Each service subclasses this and adds its own documented fields.

Values come from flags (`--port 50051`), then the environment (`SHEPHERD_PORT=50051`), then the
defaults; a bad value stops the process at start-up with the field's name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shepherd.eventlog import MESSAGE_INTERVAL_S

S = TypeVar("S", bound="ServiceSettings")


def state_dir() -> Path:
    """Where a service keeps its SQLite file by default (XDG state directory); use a volume in a cluster."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "shepherd"


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
        default="shepherd",
        description="Namespace worker pods are created in unless a task's pod override names another.",
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
