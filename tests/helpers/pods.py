"""Canned pod events for engine and state-machine tests."""

from __future__ import annotations

import time

from google.protobuf.timestamp_pb2 import Timestamp

from shepherd.v1 import task_pb2, watcher_service_pb2

PodEvent = watcher_service_pb2.PodEvent
_cursor = [0]


def container(
    name: str = "base",
    *,
    phase: task_pb2.ContainerPhase.ValueType = task_pb2.CONTAINER_PHASE_RUNNING,
    reason: str = "",
    message: str = "",
    exit_code: int = 0,
    init: bool = False,
) -> task_pb2.ContainerStatus:
    kind = task_pb2.CONTAINER_KIND_INIT if init else task_pb2.CONTAINER_KIND_MAIN
    return task_pb2.ContainerStatus(
        name=name, kind=kind, phase=phase, reason=reason, message=message, exit_code=exit_code
    )


def pod_event(
    key: task_pb2.TaskKey,
    phase: str,
    *,
    kind: watcher_service_pb2.PodEventType.ValueType = watcher_service_pb2.POD_EVENT_TYPE_MODIFIED,
    uid: str = "uid-1",
    deleting: bool = False,
    containers: list[task_pb2.ContainerStatus] | None = None,
    init_containers: list[task_pb2.ContainerStatus] | None = None,
    reason: str = "",
    created: float | None = None,
    attempt: int = 1,
    labels: dict[str, str] | None = None,
    gone: watcher_service_pb2.PodGone.ValueType = watcher_service_pb2.POD_GONE_UNSPECIFIED,
) -> PodEvent:
    _cursor[0] += 1
    event = PodEvent(
        cursor=_cursor[0],
        type=kind,
        namespace="shepherd",
        pod_name=f"pod-{uid}",
        pod_uid=uid,
        phase=phase,
        reason=reason,
        containers=containers or [],
        init_containers=init_containers or [],
        launch_attempt=attempt,
        labels=labels or {},
        gone=gone,
    )
    event.task_key.CopyFrom(key)
    created_ts = Timestamp()
    created_ts.FromNanoseconds(int((created if created is not None else time.time()) * 1e9))
    event.creation_time.CopyFrom(created_ts)
    if deleting:
        event.deletion_time.GetCurrentTime()
    return event
