"""Prometheus metrics every service shares, and the plaintext port that serves them.

Each service's own metrics live next to it (services/<name>/metrics.py); this module holds what
all three have in common (health, stream subscribers, SQLite commits) and the HTTP endpoint.

Cheap on the hot path by construction: label values are enums (never task keys or pod names),
children are bound once at import so a hot path increments an attribute rather than looking a
label up, and quantities the services already keep (queue lengths, backlogs) are read by
callback when Prometheus scrapes, not maintained on every change. The endpoint runs on the
service's event loop (aiohttp), so those callbacks read the services' state on its own thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from shepherd.logging import get_logger
from shepherd.readiness import Readiness
from shepherd.release import release

PREFIX = "shepherd"
# No <name>_created series beside each counter and histogram: a second series per child that
# dashboards do not use, and that Prometheus' own clients stopped exposing by default.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Latency of calls to the API server and of SQLite commits: from a millisecond to tens of seconds.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Time a task spends in one state: from under a second (a pod admitted at once) to hours.
STATE_BUCKETS_S = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0)


class Stream(StrEnum):
    """Label values of shepherd_stream_subscribers: the server streams a service serves."""

    LAUNCH_EVENTS = "launch_events"
    POD_EVENTS = "pod_events"
    TASK_STATES = "task_states"
    TASK_LOGS = "task_logs"


class Refusal(StrEnum):
    """Label values of shepherd_rpc_refused_total: calls the interceptor refused before the RPC ran."""

    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"  # the authorization policy
    TOO_MANY_STREAMS = "too_many_streams"  # max_streams_per_identity / max_streams
    TOO_MANY_INFLIGHT = "too_many_inflight"  # max_inflight_unary
    RATE_LIMITED = "rate_limited"  # launch_rate: launches beyond the caller's rate


SERVING = Gauge(f"{PREFIX}_serving", "1 while the service's gRPC health is SERVING, else 0.")
CONDITION_UNMET = Gauge(
    f"{PREFIX}_health_condition_unmet",
    "1 while this readiness condition does not hold (the service is then NOT_SERVING): why it is not ready.",
    ["condition"],
)
BUILD_INFO = Gauge(
    f"{PREFIX}_build_info",
    "Always 1; its labels say which Shepherd release this process runs (what `shepherd status` shows).",
    ["version"],
)
SUBSCRIBERS = Gauge(f"{PREFIX}_stream_subscribers", "Open server streams, by stream.", ["stream"])
# The store's metrics are registered by the first store opened (register_store_metrics): a
# service without a store (the watcher) would otherwise report one that cannot write.
SQLITE_COMMIT_SECONDS = Histogram(
    f"{PREFIX}_sqlite_commit_duration_seconds",
    "Time to run and commit one group-commit batch of SQLite writes.",
    buckets=LATENCY_BUCKETS_S,
    registry=None,
)
SQLITE_WRITABLE = Gauge(
    f"{PREFIX}_sqlite_writable",
    "1 while the last SQLite transaction committed, 0 while the store cannot write.",
    registry=None,
)
_store_metrics_registered = False


def register_store_metrics() -> None:
    """Expose the SQLite metrics (once per process: its one store opened)."""
    global _store_metrics_registered
    if not _store_metrics_registered:
        REGISTRY.register(SQLITE_COMMIT_SECONDS)
        REGISTRY.register(SQLITE_WRITABLE)
        _store_metrics_registered = True


_REFUSED = Counter(
    f"{PREFIX}_rpc_refused_total",
    "Calls refused before the RPC ran (authentication, policy, resource bounds, launch rate), by reason.",
    ["reason"],
)
refused = {reason: _REFUSED.labels(reason.value) for reason in Refusal}
# Bound once: each open stream increments its own child, never a label lookup.
subscribers = {stream: SUBSCRIBERS.labels(stream.value) for stream in Stream}
unmet = {condition: CONDITION_UNMET.labels(condition.value) for condition in Readiness}


BUILD_INFO.labels(release()).set(1)


def set_function(gauge: Gauge, read: Callable[[], float]) -> None:
    """Compute `gauge` when scraped (a queue length, a backlog) rather than on every change."""
    gauge.set_function(read)


def seconds_since(monotonic: Callable[[], float | None]) -> Callable[[], float]:
    """A callback: seconds since the monotonic time `monotonic()` returns, 0 when it returns None."""

    def read() -> float:
        since = monotonic()
        return 0.0 if since is None else time.monotonic() - since

    return read


class MetricsServer:
    """GET /metrics in the Prometheus text format, plaintext, on a port of its own."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.wanted_port = host, port
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        """Listen; OSError (nothing left open) when the port cannot be bound."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.wanted_port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server  # aiohttp keeps the bound socket here; port 0 picks a free one
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else self.wanted_port
        get_logger(component="metrics").info("serving metrics", port=self.port)

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
