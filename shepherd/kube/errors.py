"""Kubernetes API errors, and which of them are worth retrying.

Transient: 429 (with Retry-After), 409 conflicts other than AlreadyExists, every 5xx,
403 "exceeded quota" (quota frees up as pods finish), and connection-level failures.
Permanent: everything else a well-formed request can get back (400, 401, 403, 404, 422...).
"""

from __future__ import annotations

import asyncio
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


@dataclass
class Retries:
    """One call's retry bookkeeping for should_retry: the retries so far, and how many were 403s."""

    max_retries: int  # -1: transient errors are retried forever
    attempt: int = 0
    forbidden: int = 0

    def another(self, error: BaseException) -> bool:
        """Whether to try again after `error`; when it is, the retry is counted."""
        if not should_retry(error, self.attempt, self.max_retries, forbidden_before=self.forbidden):
            return False
        self.attempt += 1
        self.forbidden += isinstance(error, ApiError) and error.status == 403
        return True


def is_transient(error: BaseException) -> bool:
    if isinstance(error, ApiError):
        if error.status == 429 or error.status >= 500:
            return True
        if error.status == 409:
            return not error.already_exists
        return error.status == 403 and "exceeded quota" in error.message
    return isinstance(error, aiohttp.ClientError | asyncio.TimeoutError | ConnectionError)
