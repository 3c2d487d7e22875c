"""Pure conversion of a raw pod (the API server's JSON, parsed with orjson) into a PodEvent: the
watcher streams them, and the reconciler's safety sweep turns listed pods into them too.

No Kubernetes client models: a watch event is a dict and only the fields the reconciler needs
are read. Everything here is a function of its input, so it is unit-tested with canned pods.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from shepherd import podmeta, timestamps
from shepherd.v1 import task_pb2, watcher_service_pb2

MAX_CONTAINER_ID = 256  # the contract's bound (task.proto, ContainerStatus.container_id)
_EVENT_TYPES = {
    "ADDED": watcher_service_pb2.POD_EVENT_TYPE_ADDED,
    "MODIFIED": watcher_service_pb2.POD_EVENT_TYPE_MODIFIED,
    "DELETED": watcher_service_pb2.POD_EVENT_TYPE_DELETED,
}


def _timestamp(value: str | None) -> Timestamp | None:
    return timestamps.parse_rfc3339(value) if value else None


def container_status(raw: dict[str, Any], kind: task_pb2.ContainerKind.ValueType) -> task_pb2.ContainerStatus:
    state = raw.get("state") or {}
    status = task_pb2.ContainerStatus(
        name=raw.get("name", ""),
        kind=kind,
        restart_count=int(raw.get("restartCount") or 0),
        container_id=str(raw.get("containerID") or "")[:MAX_CONTAINER_ID],
    )
    if (waiting := state.get("waiting")) is not None:
        status.phase = task_pb2.CONTAINER_PHASE_WAITING
        status.reason, status.message = waiting.get("reason", ""), waiting.get("message", "")
    elif (terminated := state.get("terminated")) is not None:
        status.phase = task_pb2.CONTAINER_PHASE_TERMINATED
        status.reason, status.message = terminated.get("reason", ""), terminated.get("message", "")
        status.exit_code = int(terminated.get("exitCode") or 0)
    elif state.get("running") is not None:
        status.phase = task_pb2.CONTAINER_PHASE_RUNNING
    return status


def pod_event(
    event_type: str, pod: dict[str, Any], *, synthetic: bool = False
) -> watcher_service_pb2.PodEvent:
    """The PodEvent for one watch (or re-list) event; `cursor` and `observe_time` are set by the caller."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    annotations = meta.get("annotations") or {}
    event = watcher_service_pb2.PodEvent(
        type=_EVENT_TYPES.get(event_type, watcher_service_pb2.POD_EVENT_TYPE_MODIFIED),
        synthetic=synthetic,
        namespace=meta.get("namespace", ""),
        pod_name=meta.get("name", ""),
        pod_uid=meta.get("uid", ""),
        phase=status.get("phase", ""),
        reason=status.get("reason", ""),
        message=status.get("message", ""),
        labels=meta.get("labels") or {},
        init_containers=[
            container_status(c, task_pb2.CONTAINER_KIND_INIT)
            for c in status.get("initContainerStatuses") or []
        ],
        containers=[
            container_status(c, task_pb2.CONTAINER_KIND_MAIN) for c in status.get("containerStatuses") or []
        ],
        conditions=[
            watcher_service_pb2.PodCondition(
                type=c.get("type", ""),
                status=c.get("status", ""),
                reason=c.get("reason", ""),
                message=c.get("message", ""),
            )
            for c in status.get("conditions") or []
        ],
        resource_version=meta.get("resourceVersion", ""),
        node_name=(pod.get("spec") or {}).get("nodeName", ""),
    )
    if (key := podmeta.key_from_annotations(annotations)) is not None:
        event.task_key.CopyFrom(key)
        attempt = annotations.get(podmeta.ANNOTATION_LAUNCH_ATTEMPT, "")
        event.launch_attempt = int(attempt) if attempt.isdigit() else 0
        traceparent = annotations.get(podmeta.ANNOTATION_TRACEPARENT)
        if traceparent and len(traceparent) <= podmeta.MAX_TRACEPARENT:  # no hand-edited giant in every event
            event.traceparent = traceparent
    if (created := _timestamp(meta.get("creationTimestamp"))) is not None:
        event.creation_time.CopyFrom(created)
    if (deleted := _timestamp(meta.get("deletionTimestamp"))) is not None:
        event.deletion_time.CopyFrom(deleted)
    return event
