"""Pure: what the reconciler keeps of a finished pod before it goes, and in what shape.

Finished pods are deleted (by default), and a pod's log goes with it. So before cleaning up the
pod of a finished task whose `base` container really ran, the reconciler reads the end of that log
and keeps it, bounded in lines and bytes; GetTaskLogs answers from it once the pod is gone. For a
failed task it also reads the pod's recent Kubernetes Events (scheduling failures, pull errors,
OOM kills, evictions) into the failure details. Both reads are I/O (collector.py); everything that
can be decided without it is here: which pods are worth a read, how a tail is cut, and which
events are kept and how.
"""

from __future__ import annotations

import contextlib
from typing import Any

from shepherd import podmeta, timestamps
from shepherd.v1 import task_pb2, watcher_service_pb2

# The contract's bounds on a KubernetesEvent (task.proto).
MAX_EVENT_TYPE = 64
MAX_EVENT_REASON = 128
MAX_EVENT_MESSAGE = 1024
MAX_EVENT_SOURCE = 128
_CUT = "..."


def ran_in_a_runtime(event: watcher_service_pb2.PodEvent) -> bool:
    """Whether the pod's `base` container was created by a container runtime, and so has a log a
    kubelet can serve. Simulated (kwok) nodes report no container id: reading their pods' logs
    would only cost a failing call per pod, so they are never read."""
    return any(c.name == podmeta.BASE_CONTAINER and c.container_id for c in event.containers)


class TailBuffer:
    """The end of a byte stream, at most `max_bytes` of it, however long the stream is."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data = bytearray()
        self.cut = False  # bytes were dropped from the front

    def add(self, chunk: bytes) -> None:
        self._data += chunk
        if len(self._data) > self.max_bytes:
            del self._data[: len(self._data) - self.max_bytes]
            self.cut = True

    def tail(self, max_lines: int) -> bytes:
        """The kept end: whole lines only when the front was cut (unless one line is all there
        is), and at most `max_lines` of them."""
        data = bytes(self._data)
        if self.cut:
            newline = data.find(b"\n")
            if 0 <= newline < len(data) - 1:
                data = data[newline + 1 :]
        return last_lines(data, max_lines)


def last_lines(data: bytes, count: int) -> bytes:
    """The last `count` lines of `data` (a final line without a newline counts as one)."""
    if count <= 0:
        return b""
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    start = end
    for _ in range(count):
        start = data.rfind(b"\n", 0, start)
        if start < 0:
            return data
    return data[start + 1 :]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_CUT)] + _CUT


def _event_time(raw: dict[str, Any]) -> str:
    series = raw.get("series") or {}
    return str(
        series.get("lastObservedTime")
        or raw.get("lastTimestamp")
        or raw.get("eventTime")
        or raw.get("firstTimestamp")
        or (raw.get("metadata") or {}).get("creationTimestamp")
        or ""
    )


def kubernetes_event(raw: dict[str, Any]) -> task_pb2.KubernetesEvent:
    """One core/v1 Event (the API's JSON) as the contract's KubernetesEvent, within its bounds."""
    source = raw.get("source") or {}
    series = raw.get("series") or {}
    event = task_pb2.KubernetesEvent(
        type=_cut(str(raw.get("type") or ""), MAX_EVENT_TYPE),
        reason=_cut(str(raw.get("reason") or ""), MAX_EVENT_REASON),
        message=_cut(str(raw.get("message") or "").strip(), MAX_EVENT_MESSAGE),
        count=max(1, int(series.get("count") or raw.get("count") or 1)),
        source=_cut(str(source.get("component") or raw.get("reportingComponent") or ""), MAX_EVENT_SOURCE),
    )
    when = _event_time(raw)
    if when:
        # An Event with a malformed time is still worth its reason and message.
        with contextlib.suppress(ValueError):
            event.last_time.CopyFrom(timestamps.parse_rfc3339(when))
    return event


def _order(raw: dict[str, Any]) -> tuple[float, str]:
    try:
        when = timestamps.epoch_seconds(_event_time(raw))
    except ValueError:
        when = 0.0
    return when, str((raw.get("metadata") or {}).get("name") or "")


def recent_events(items: list[dict[str, Any]], max_events: int) -> list[task_pb2.KubernetesEvent]:
    """The `max_events` most recent of a pod's Events, oldest first."""
    if max_events <= 0:
        return []
    ordered = sorted(items, key=_order)
    return [kubernetes_event(raw) for raw in ordered[-max_events:]]


__all__ = ["TailBuffer", "kubernetes_event", "last_lines", "ran_in_a_runtime", "recent_events"]
