"""The launcher's Prometheus metrics: launches accepted and refused, pod creates, their latency and
retries, and the backlog. Definitions only; the code that counts imports the bound children.
Labels are enums (see shepherd/metrics.py for the conventions)."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

import aiohttp
from prometheus_client import Counter, Gauge, Histogram

from services.launcher.reconciler_client import ReconcilerUnavailable
from shepherd.kube import ApiError
from shepherd.metrics import LATENCY_BUCKETS_S, PREFIX, set_function

if TYPE_CHECKING:
    from services.launcher.creator import PodCreator

_P = f"{PREFIX}_launcher"


class LaunchOutcome(StrEnum):
    """What became of one launch request (LaunchTask, or one task of BatchLaunchTasks)."""

    ACCEPTED = "accepted"  # stored, its pod to be created
    ALREADY_EXISTED = "already_existed"  # a retry of a launch already accepted: answered, nothing new
    INVALID = "invalid"  # INVALID_ARGUMENT
    POLICY_DENIED = "policy_denied"  # PERMISSION_DENIED by the pod policy
    UNKNOWN_TEMPLATE = "unknown_template"  # NOT_FOUND
    QUEUE_FULL = "queue_full"  # RESOURCE_EXHAUSTED
    STORE_UNAVAILABLE = "store_unavailable"  # UNAVAILABLE: the store cannot write


class CreateOutcome(StrEnum):
    """How a launch's pod create ended."""

    CREATED = "created"
    ALREADY_EXISTED = "already_existed"  # 409 AlreadyExists: an earlier attempt made it
    REJECTED = "rejected"  # refused by the API server for good (LaunchRejected)
    QUEUED_TIMEOUT = "queued_timeout"  # transient failures until the queued deadline (QueuedTimeout)


class RetryCause(StrEnum):
    """Why a create (or a replayed launch's check) is tried again."""

    THROTTLED = "throttled"  # 429
    CONFLICT = "conflict"  # 409 other than AlreadyExists
    SERVER_ERROR = "server_error"  # 5xx
    QUOTA = "quota"  # 403 exceeded quota
    FORBIDDEN = "forbidden"  # other 403 (an API server whose authorizer is catching up)
    CONNECTION = "connection"  # no answer: refused, reset, timed out
    RECONCILER_UNAVAILABLE = "reconciler_unavailable"  # a replayed launch could not be checked
    OTHER = "other"


def retry_cause(error: BaseException) -> RetryCause:
    if isinstance(error, ReconcilerUnavailable):  # a ConnectionError, but not the API server's
        return RetryCause.RECONCILER_UNAVAILABLE
    if isinstance(error, ApiError):
        if error.status == 429:
            return RetryCause.THROTTLED
        if error.status == 409:
            return RetryCause.CONFLICT
        if error.status >= 500:
            return RetryCause.SERVER_ERROR
        if error.status == 403:
            return RetryCause.QUOTA if "exceeded quota" in error.message else RetryCause.FORBIDDEN
        return RetryCause.OTHER
    if isinstance(error, aiohttp.ClientError | OSError | TimeoutError):
        return RetryCause.CONNECTION
    return RetryCause.OTHER


_LAUNCHES = Counter(
    f"{_P}_launches_total", "Launch requests, by outcome: accepted, or refused and why.", ["outcome"]
)
_CREATES = Counter(f"{_P}_pod_creates_total", "Pod creates finished, by outcome.", ["outcome"])
_RETRIES = Counter(f"{_P}_create_retries_total", "Create (or replay check) retries, by cause.", ["cause"])
CREATE_SECONDS = Histogram(
    f"{_P}_pod_create_duration_seconds",
    "Latency of one pod create call to the API server (each try, answered or failed).",
    buckets=LATENCY_BUCKETS_S,
)
launches = {outcome: _LAUNCHES.labels(outcome.value) for outcome in LaunchOutcome}
creates = {outcome: _CREATES.labels(outcome.value) for outcome in CreateOutcome}
retries = {cause: _RETRIES.labels(cause.value) for cause in RetryCause}

_BACKLOG = Gauge(
    f"{_P}_backlog_launches", "Launches accepted and not yet settled (queued, checked or in flight)."
)
_QUEUE = Gauge(f"{_P}_create_queue_depth", "Launches waiting for a create worker.")
_INFLIGHT = Gauge(f"{_P}_creates_in_flight", "Pod creates being made or retried now.")
_REPLAYS = Gauge(f"{_P}_replay_queue_depth", "Launches replayed on start still waiting to be checked.")


def observe_creator(creator: PodCreator) -> None:
    """Read the creator's queues when scraped."""
    set_function(_BACKLOG, lambda: creator.backlog)
    set_function(_QUEUE, creator.queue_depth)
    set_function(_INFLIGHT, creator.in_flight)
    set_function(_REPLAYS, creator.replays_waiting)
