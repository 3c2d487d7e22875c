"""The watcher's Prometheus metrics: pod events by type, how far the watch lags behind the API
server, and why watches restart. Definitions only; labels are enums (see shepherd/metrics.py)."""

from __future__ import annotations

import time
from datetime import datetime
from enum import StrEnum
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from shepherd.metrics import PREFIX, seconds_since, set_function
from shepherd.v1 import watcher_service_pb2

_P = f"{PREFIX}_watcher"


class Restart(StrEnum):
    """Why a watch request ended and was resumed or re-listed."""

    EXPIRED = "expired"  # 410 Gone: re-listed
    SILENT = "silent"  # nothing, not even a bookmark, for inactivity_timeout_s: resumed
    ERROR = "error"  # a failed request or connection: retried with backoff


_EVENTS = Counter(
    f"{_P}_pod_events_total",
    "Pod events appended to the event log, by type; synthetic: rebuilt from a re-list after a gap.",
    ["type", "synthetic"],
)
# (PodEventType value, synthetic) -> child: one dict lookup per event, no label formatting.
events = {
    (value, synthetic): _EVENTS.labels(
        watcher_service_pb2.PodEventType.Name(value).removeprefix("POD_EVENT_TYPE_").lower(),
        str(synthetic).lower(),
    )
    for value in watcher_service_pb2.PodEventType.values()
    if value != watcher_service_pb2.POD_EVENT_TYPE_UNSPECIFIED
    for synthetic in (False, True)
}
_RESTARTS = Counter(f"{_P}_watch_restarts_total", "Watch requests resumed or re-listed, by cause.", ["cause"])
restarts = {cause: _RESTARTS.labels(cause.value) for cause in Restart}
EVENT_LAG_SECONDS = Histogram(
    f"{_P}_event_lag_seconds",
    "How long after the API server last wrote a pod (the newest managedFields time, whole seconds) "
    "the watcher received the event: the watch's lag behind the API server.",
    buckets=(0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0),
)
_SILENCE = Gauge(
    f"{_P}_watch_silence_seconds",
    "Seconds since any watch last heard from the API server (an event or a bookmark, about one a minute).",
)
_LOG_HEAD = Gauge(f"{_P}_event_log_cursor", "Cursor of the newest pod event in the log.")


def observe_lag(pod: dict[str, Any]) -> None:
    """The event's lag: now minus the newest time the API server stamped on a write to the pod.
    Those stamps have whole seconds, so a lag is up to a second longer than measured."""
    newest = ""
    for entry in (pod.get("metadata") or {}).get("managedFields") or ():
        stamp = entry.get("time") or ""
        if stamp > newest:  # RFC 3339 in UTC: the text order is the time order
            newest = stamp
    if newest:
        try:
            written = datetime.fromisoformat(newest).timestamp()
        except ValueError:
            return
        EVENT_LAG_SECONDS.observe(max(0.0, time.time() - written))


def observe_informer(last_heard: Any, head: Any) -> None:
    """Read the informer's state when scraped: `last_heard()` (monotonic, or None), `head()`."""
    set_function(_SILENCE, seconds_since(last_heard))
    set_function(_LOG_HEAD, head)
