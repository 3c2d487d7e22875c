"""The Watcher's settings (on top of the shared ones)."""

from __future__ import annotations

from pydantic import Field

from shepherd.settings import ServiceSettings


class WatcherSettings(ServiceSettings):
    """Settings of the Watcher."""

    port: int = Field(default=50052, ge=0, le=65535, description="gRPC port; 0 picks a free one.")

    event_retention: int = Field(
        default=200_000,
        ge=1000,
        le=10_000_000,
        description="Pod events kept in memory for resuming clients; older cursors must re-sync.",
    )
    watch_timeout_s: int = Field(
        default=300,
        ge=1,
        le=3600,
        description="Server-side timeout of one watch request; the watch is then resumed, not restarted.",
    )
    inactivity_timeout_s: float = Field(
        default=90.0,
        ge=1,
        le=3600,
        description="A watch that sends nothing, not even a bookmark (about one a minute), for this long "
        "is treated as half-open and resumed from the last resourceVersion.",
    )
