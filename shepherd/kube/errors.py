"""Kubernetes API errors, which of them are worth retrying, and how long to wait between tries.

Transient: 429 (with Retry-After), 409 conflicts other than AlreadyExists, every 5xx,
403 "exceeded quota" (quota frees up as pods finish), and connection-level failures.
Permanent: everything else a well-formed request can get back (400, 401, 403, 404, 422...).

A call is retried within a count (`max_retries`), or within a time (`deadline`): an API server
that is down for a minute fails any fixed number of quick retries, while a deadline says what
the caller really means ("keep trying while it is still worth it").
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson


@dataclass
class ApiError(Exception):
    """A non-2xx answer from the API server."""

    status: int
    reason: str
    message: str
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.reason}: {self.message}"

    @classmethod
    def from_response(cls, status: int, body: bytes, headers: Any) -> ApiError:
        reason, message = "", body.decode(errors="replace")[:2000]
        try:
            doc = orjson.loads(body)
            reason, message = str(doc.get("reason", "")), str(doc.get("message", message))
        except (orjson.JSONDecodeError, AttributeError):
            pass
        retry_after = None
        raw = headers.get("Retry-After") if headers is not None else None
        if raw:
            try:
                retry_after = max(0.0, float(raw))
            except ValueError:
                retry_after = None
        return cls(status=status, reason=reason, message=message, retry_after_s=retry_after)

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"


# A 403 is usually final (missing RBAC), but an API server that has just restarted can answer 403
# until its authorizer has caught up; a few retries (seconds, with backoff) ride that out, and a
# truly missing permission still fails the call soon after, with the API's own message.
FORBIDDEN_RETRIES = 4


def should_retry(error: BaseException, attempt: int, max_retries: int, *, forbidden_before: int = 0) -> bool:
    """Whether the `attempt`-th failure (counting from 0) deserves another try; `forbidden_before` is
    how many 403s the same call has already had (they have a small budget of their own)."""
    if max_retries >= 0 and attempt >= max_retries:
        return False
    if is_transient(error):
        return True
    return isinstance(error, ApiError) and error.status == 403 and forbidden_before < FORBIDDEN_RETRIES


# Backoff: the n-th retry waits between half and all of min(cap, BASE * 2**n) ("equal jitter").
# Full jitter (anywhere from 0) spreads a crowd of callers best, but lets two retries of one call
# come a few milliseconds apart: against an API server that is restarting, two tries wasted at
# once. Half the step is a floor that grows with each retry and is never under BASE / 2.
BACKOFF_BASE_S = 0.2


def backoff_s(
    attempt: int, *, base_s: float = BACKOFF_BASE_S, cap_s: float = 10.0, floor_s: float = 0.0
) -> float:
    """How long to wait before retry number `attempt` (from 1), never shorter than floor_s (e.g. a
    Retry-After)."""
    step = min(cap_s, base_s * 2 ** min(max(attempt, 0), 60))  # a long outage counts many retries
    return max(floor_s, random.uniform(step / 2, step))


@dataclass
class Retries:
    """One call's retry bookkeeping for should_retry: the retries so far, how many were 403s, and
    until when retrying is worth it.

    Bounded by a count (`max_retries`, -1 for none) and/or a time (`deadline`, epoch seconds): once
    the deadline has passed nothing more is retried, and `timed_out` says that this is why. A 403
    keeps its small budget of its own either way."""

    max_retries: int = -1
    deadline: float | None = None
    attempt: int = 0
    forbidden: int = 0
    timed_out: bool = False  # the last error was worth a retry, but the deadline had passed

    def another(self, error: BaseException) -> bool:
        """Whether to try again after `error`; when it is, the retry is counted."""
        if not should_retry(error, self.attempt, self.max_retries, forbidden_before=self.forbidden):
            return False
        if self.deadline is not None and time.time() >= self.deadline:
            self.timed_out = True
            return False
        self.attempt += 1
        self.forbidden += isinstance(error, ApiError) and error.status == 403
        return True

    def delay(self, *, cap_s: float, floor_s: float = 0.0, base_s: float = BACKOFF_BASE_S) -> float:
        """How long to wait before the retry just counted: the backoff, but never past the deadline
        (the last try comes at the deadline rather than a backoff after it)."""
        wait = backoff_s(self.attempt, base_s=base_s, cap_s=cap_s, floor_s=floor_s)
        if self.deadline is not None:
            wait = max(0.0, min(wait, self.deadline - time.time()))
        return wait


def is_transient(error: BaseException) -> bool:
    if isinstance(error, ApiError):
        if error.status == 429 or error.status >= 500:
            return True
        if error.status == 409:
            return not error.already_exists
        return error.status == 403 and "exceeded quota" in error.message
    return isinstance(error, aiohttp.ClientError | asyncio.TimeoutError | ConnectionError)
