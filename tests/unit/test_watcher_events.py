"""Raw pods become PodEvents without client models, and the cursor log serves resumes exactly."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shepherd import podmeta
from shepherd.eventlog import CursorOutOfRange, MemoryLog, follow
from shepherd.podevents import pod_event
from shepherd.v1 import task_pb2, watcher_service_pb2
from tests.helpers import task_key

RAW: dict[str, Any] = {
    "metadata": {
        "name": "etl-extract-abc",
        "namespace": "shepherd",
        "uid": "u-1",
        "resourceVersion": "42",
        "creationTimestamp": "2026-11-21T00:00:00Z",
        "deletionTimestamp": "2026-11-21T00:01:00Z",
        "labels": {"shepherd.dev/executor-id": "e"},
        "annotations": podmeta.task_annotations(task_key(map_index=4), attempt=2),
    },
    "spec": {"nodeName": "kwok-node-0"},
    "status": {
        "phase": "Failed",
        "reason": "Evicted",
        "message": "low memory",
        "initContainerStatuses": [
            {"name": "fetch", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}
        ],
        "containerStatuses": [
            {
                "name": "base",
                "restartCount": 1,
                "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "message": "oom"}},
            }
        ],
        "conditions": [{"type": "Ready", "status": "False", "reason": "PodFailed"}],
    },
}


def test_a_raw_pod_becomes_a_complete_pod_event() -> None:
    event = pod_event("DELETED", RAW)
    assert event.type == watcher_service_pb2.POD_EVENT_TYPE_DELETED
    assert (event.pod_name, event.namespace, event.pod_uid, event.node_name) == (
        "etl-extract-abc",
        "shepherd",
        "u-1",
        "kwok-node-0",
    )
    assert (event.phase, event.reason, event.message, event.resource_version) == (
        "Failed",
        "Evicted",
        "low memory",
        "42",
    )
    assert event.task_key == task_key(map_index=4)
    assert event.launch_attempt == 2
    assert event.deletion_time.ToJsonString() == "2026-11-21T00:01:00Z"
    base = event.containers[0]
    assert (base.phase, base.exit_code, base.reason, base.restart_count) == (
        task_pb2.CONTAINER_PHASE_TERMINATED,
        137,
        "OOMKilled",
        1,
    )
    assert event.init_containers[0].kind == task_pb2.CONTAINER_KIND_INIT
    assert event.conditions[0].reason == "PodFailed"


def test_a_pod_without_task_annotations_has_no_task_key() -> None:
    raw = {"metadata": {"name": "stranger", "uid": "u"}, "status": {"phase": "Running"}}
    assert not pod_event("ADDED", raw).HasField("task_key")


def test_a_minimal_pod_does_not_break_conversion() -> None:
    assert pod_event("MODIFIED", {}).phase == ""


def test_a_resume_gets_every_later_event_exactly_once() -> None:
    log: MemoryLog[str] = MemoryLog(retention=100, epoch=1000)
    cursors = [log.append(f"e{i}") for i in range(10)]
    assert [item for _, item in log.read_after(cursors[3], 100)] == [f"e{i}" for i in range(4, 10)]
    assert log.read_after(cursors[-1], 100) == []
    assert [item for _, item in log.read_after(0, 3)] == ["e0", "e1", "e2"]


async def test_a_follower_gets_waiting_events_as_one_batch_and_new_ones_as_they_come() -> None:
    log: MemoryLog[str] = MemoryLog(retention=100, epoch=1000)
    for i in range(5):
        log.append(f"e{i}")
    batches = follow(log, 0, batch=3)
    assert [item for _, item in await anext(batches)] == ["e0", "e1", "e2"]
    assert [item for _, item in await anext(batches)] == ["e3", "e4"]
    later = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0)
    assert not later.done()  # nothing new yet: the follower waits instead of sending empty batches
    log.append("e5")
    assert [item for _, item in await asyncio.wait_for(later, 5)] == ["e5"]


async def test_following_an_empty_log_from_cursor_zero_waits_for_the_first_event() -> None:
    log: MemoryLog[str] = MemoryLog(retention=100, epoch=1000)
    # Returning at once here would make a follower spin and starve the event loop.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(log.wait_for_append(0), 0.05)
    first = asyncio.ensure_future(anext(follow(log, 0)))
    log.append("e0")
    assert [item for _, item in await asyncio.wait_for(first, 5)] == ["e0"]


async def test_a_steady_stream_reaches_a_caught_up_follower_in_few_messages() -> None:
    log: MemoryLog[str] = MemoryLog(retention=100, epoch=1000)
    batches = follow(log, 0, interval_s=0.5)
    log.append("e0")
    assert [item for _, item in await anext(batches)] == ["e0"]  # the first goes out at once
    nxt = asyncio.ensure_future(anext(batches))
    for i in range(1, 6):  # appended one loop turn apart, well inside the interval
        log.append(f"e{i}")
        await asyncio.sleep(0)
    assert [item for _, item in await asyncio.wait_for(nxt, 5)] == [f"e{i}" for i in range(1, 6)]


def test_cursors_from_an_earlier_run_are_refused() -> None:
    old: MemoryLog[str] = MemoryLog(retention=100, epoch=1000)
    cursor = old.append("x")
    new: MemoryLog[str] = MemoryLog(retention=100, epoch=2000)
    new.append("y")
    assert new.head > cursor
    with pytest.raises(CursorOutOfRange, match="another run"):
        new.read_after(cursor, 10)


def test_cursors_older_than_the_retained_events_are_refused() -> None:
    log: MemoryLog[str] = MemoryLog(retention=5, epoch=1000)
    cursors = [log.append(str(i)) for i in range(20)]
    with pytest.raises(CursorOutOfRange, match="older than the retained"):
        log.read_after(cursors[2], 10)
    assert [item for _, item in log.read_after(cursors[14], 10)] == ["15", "16", "17", "18", "19"]


def test_cursors_from_the_future_are_refused() -> None:
    log: MemoryLog[str] = MemoryLog(retention=5, epoch=1000)
    cursor = log.append("a")
    with pytest.raises(CursorOutOfRange, match="ahead"):
        log.read_after(cursor + 5, 10)
