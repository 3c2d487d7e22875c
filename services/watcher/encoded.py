"""The watcher's event log keeps each pod event encoded, not as a message object.

The log holds `event_retention` events (200,000 by default) for subscribers that resume. A
PodEvent built field by field costs about 5 KB as a Python protobuf object and about 700 bytes
encoded, so as objects the log alone would grow past 1 GB; encoded, about 150 MB. The scale
benchmark found it: the watcher's RSS passed 350 MB before its log was a third full.

Each entry is stored framed as one element of WatchPodEventsResponse.events (the field's key and
the event's length, then the event), so a batch of entries, joined, is an encoded response: it is
parsed once per batch on its way out, and no per-event object is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

from shepherd.v1 import watcher_service_pb2

_EVENTS = watcher_service_pb2.WatchPodEventsResponse.DESCRIPTOR.fields_by_name["events"]
_LENGTH_DELIMITED = 2  # the wire type of an embedded message
_KEY = bytes([(_EVENTS.number << 3) | _LENGTH_DELIMITED])
assert _EVENTS.number < 16, "a one-byte field key"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def frame(event: bytes) -> bytes:
    """An encoded PodEvent as one framed element of WatchPodEventsResponse.events."""
    return _KEY + _varint(len(event)) + event


def response(entries: Sequence[tuple[int, bytes]]) -> watcher_service_pb2.WatchPodEventsResponse:
    """The response carrying these log entries' events, in order."""
    return watcher_service_pb2.WatchPodEventsResponse.FromString(b"".join(entry for _, entry in entries))
