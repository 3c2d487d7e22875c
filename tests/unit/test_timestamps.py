"""The hot-path Timestamp helpers agree with protobuf's own, slower ones."""

from __future__ import annotations

import time

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from shepherd import timestamps


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-21T04:09:00Z",
        "1970-01-01T00:00:00Z",
        "2026-11-21T04:09:00.123456Z",
        "2026-11-21T06:09:00+02:00",
    ],
)
def test_an_rfc3339_string_parses_to_the_same_instant_as_protobufs_parser(value: str) -> None:
    expected = Timestamp()
    expected.FromJsonString(value)
    assert timestamps.parse_rfc3339(value) == expected
    assert timestamps.epoch_seconds(value) == pytest.approx(expected.ToNanoseconds() / 1e9, abs=1e-6)


@pytest.mark.parametrize("value", ["", "yesterday", "2026-11-21T04:09:00"])
def test_a_string_that_is_not_an_rfc3339_instant_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match=r"isoformat|time zone"):
        timestamps.parse_rfc3339(value)


def test_now_and_stamp_now_read_the_wall_clock() -> None:
    before = time.time_ns()
    stamped = Timestamp()
    timestamps.stamp_now(stamped)
    made = timestamps.now()
    after = time.time_ns()
    for ts in (stamped, made):
        assert before <= ts.ToNanoseconds() <= after
        assert 0 <= ts.nanos < 1_000_000_000
