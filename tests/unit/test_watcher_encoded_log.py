"""The watcher keeps its event log encoded (services/watcher/encoded.py): entries joined must be
exactly the response carrying those events, in order, whatever their sizes (a length of 128 bytes
or more takes a multi-byte varint), and nothing in the log is a message object."""

from __future__ import annotations

from services.watcher import encoded
from shepherd.eventlog import MemoryLog
from shepherd.v1 import task_pb2
from shepherd.v1 import watcher_service_pb2 as wpb


def _event(i: int, message: str) -> wpb.PodEvent:
    event = wpb.PodEvent(
        type=wpb.POD_EVENT_TYPE_MODIFIED,
        namespace="shepherd-workers",
        pod_name=f"pod-{i}",
        phase="Running",
        message=message,
        task_key=task_pb2.TaskKey(dag_id="d", task_id=f"t{i}", run_id="r", try_number=1, map_index=-1),
    )
    event.labels["shepherd.dev/executor"] = "x"
    return event


def test_joined_entries_are_the_response_with_those_events_in_order() -> None:
    log: MemoryLog[bytes] = MemoryLog(retention=1000, epoch=7)
    sent = []
    # Sizes from a few bytes to ~20 KB: one-, two- and three-byte length prefixes.
    for i, size in enumerate([0, 1, 100, 127, 128, 300, 16_383, 16_384, 20_000]):
        event = _event(i, "m" * size)
        event.cursor = log.next_cursor
        assert log.append(encoded.frame(event.SerializeToString())) == event.cursor
        sent.append(event)
    entries = log.read_after(0, 100)
    assert all(isinstance(entry, bytes) for _, entry in entries)
    assert list(encoded.response(entries).events) == sent
    assert list(encoded.response(entries[3:5]).events) == sent[3:5]
    assert list(encoded.response([]).events) == []


def test_next_cursor_is_what_the_next_append_returns() -> None:
    log: MemoryLog[bytes] = MemoryLog(retention=1000, epoch=9)
    for _ in range(3):
        expected = log.next_cursor
        assert log.append(b"") == expected
        assert log.head == expected
