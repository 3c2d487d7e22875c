"""Which Kubernetes API failures are retried: transient ones within the budget, a 403 a few times
(an API server that just restarted may answer it), permanent ones never."""

from __future__ import annotations

import time

import aiohttp
import pytest

from shepherd.kube.errors import FORBIDDEN_RETRIES, ApiError, Retries, backoff_s, is_transient, should_retry


@pytest.mark.parametrize(
    "error",
    [
        ApiError(429, "TooManyRequests", "slow down", retry_after_s=1),
        ApiError(500, "InternalError", "boom"),
        ApiError(503, "ServiceUnavailable", "restarting"),
        ApiError(409, "Conflict", "the object has been modified"),
        ApiError(403, "Forbidden", 'pods "x" is forbidden: exceeded quota: compute'),
        aiohttp.ClientConnectionError("refused"),
        TimeoutError(),
    ],
)
def test_transient_failures_are_retried(error: BaseException) -> None:
    assert is_transient(error)
    assert should_retry(error, attempt=0, max_retries=8)


@pytest.mark.parametrize(
    "error",
    [
        ApiError(400, "BadRequest", "x"),
        ApiError(422, "Invalid", "x"),
        ApiError(404, "NotFound", "x"),
        ApiError(409, "AlreadyExists", "x"),
    ],
)
def test_permanent_failures_are_not_retried(error: ApiError) -> None:
    assert not should_retry(error, attempt=0, max_retries=8)


def test_a_forbidden_answer_gets_a_few_retries_of_its_own() -> None:
    forbidden = ApiError(403, "Forbidden", "cannot create resource pods")
    assert not is_transient(forbidden)
    assert should_retry(forbidden, attempt=6, max_retries=8, forbidden_before=0)
    assert not should_retry(forbidden, attempt=1, max_retries=8, forbidden_before=FORBIDDEN_RETRIES)


def test_the_retry_budget_bounds_everything_unless_unlimited() -> None:
    error = ApiError(503, "ServiceUnavailable", "x")
    assert not should_retry(error, attempt=8, max_retries=8)
    assert should_retry(error, attempt=1000, max_retries=-1)


def test_the_403s_of_one_call_count_against_their_own_small_budget() -> None:
    retries = Retries(max_retries=100)
    forbidden = ApiError(403, "Forbidden", "cannot create resource pods")
    assert all(retries.another(forbidden) for _ in range(FORBIDDEN_RETRIES))
    assert not retries.another(forbidden)
    assert retries.another(ApiError(503, "ServiceUnavailable", "x"))  # transient errors still retry
    assert retries.attempt == FORBIDDEN_RETRIES + 1


def test_a_deadline_bounds_retries_by_time_and_says_so() -> None:
    refused = aiohttp.ClientConnectionError("refused")
    retries = Retries(deadline=time.time() + 3600)
    assert all(retries.another(refused) for _ in range(100))  # no count limit: only the deadline
    retries.deadline = time.time() - 1
    assert not retries.another(refused)
    assert retries.timed_out


def test_a_permanent_error_is_not_a_timeout_even_past_the_deadline() -> None:
    retries = Retries(deadline=time.time() - 1)
    assert not retries.another(ApiError(422, "Invalid", "x"))
    assert not retries.timed_out


def test_a_403_keeps_its_small_budget_under_a_deadline() -> None:
    retries = Retries(deadline=time.time() + 3600)
    forbidden = ApiError(403, "Forbidden", "cannot create resource pods")
    assert all(retries.another(forbidden) for _ in range(FORBIDDEN_RETRIES))
    assert not retries.another(forbidden)
    assert not retries.timed_out


def test_no_wait_goes_past_the_deadline() -> None:
    retries = Retries(deadline=time.time() + 0.05, attempt=20)
    assert retries.delay(cap_s=30.0) <= 0.05


def test_the_backoff_stays_capped_however_many_retries_an_outage_takes() -> None:
    assert 5.0 <= backoff_s(5000, cap_s=10.0) <= 10.0
