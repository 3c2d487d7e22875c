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


def is_transient(error: BaseException) -> bool:
    if isinstance(error, ApiError):
        if error.status == 429 or error.status >= 500:
            return True
        if error.status == 409:
            return not error.already_exists
        return error.status == 403 and "exceeded quota" in error.message
    return isinstance(error, aiohttp.ClientError | asyncio.TimeoutError | ConnectionError)
