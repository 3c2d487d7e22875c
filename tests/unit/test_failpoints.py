"""Failure points: armed only by the environment, counted or random, and a typo fails fast."""

from __future__ import annotations

import pytest

from shepherd import failpoints


def test_a_counted_failpoint_fails_exactly_that_many_hits() -> None:
    failpoints.configure("sqlite.commit=2")
    try:
        for _ in range(2):
            with pytest.raises(failpoints.FailpointError):
                failpoints.hit("sqlite.commit")
        failpoints.hit("sqlite.commit")  # the third goes through
    finally:
        failpoints.configure("")


def test_unarmed_and_off_failpoints_never_fail() -> None:
    failpoints.configure("sqlite.commit=off")
    failpoints.hit("sqlite.commit")
    failpoints.configure("")
    failpoints.hit("sqlite.commit")


@pytest.mark.parametrize("spec", ["sqlite.comit=1", "sqlite.commit", "sqlite.commit=p2", "sqlite.commit=x"])
def test_a_bad_spec_is_refused_naming_the_entry(spec: str) -> None:
    with pytest.raises(ValueError, match="SHEPHERD_FAILPOINTS"):
        failpoints.parse(spec)
