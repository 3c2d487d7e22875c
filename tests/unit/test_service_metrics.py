"""Pure pieces of the metrics: which label a retry gets, and how `shepherd status` turns a
service's /metrics into the reason it is not ready."""

from __future__ import annotations

import aiohttp
import pytest

from services.launcher.metrics import RetryCause, retry_cause
from services.launcher.reconciler_client import ReconcilerUnavailable
from shepherd import metrics
from shepherd.kube import ApiError
from shepherd.readiness import Readiness
from shepherd.release import release
from shepherd_cli import servicemetrics


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (ApiError(429, "TooManyRequests", "slow down"), RetryCause.THROTTLED),
        (ApiError(409, "Conflict", "object modified"), RetryCause.CONFLICT),
        (ApiError(503, "ServiceUnavailable", ""), RetryCause.SERVER_ERROR),
        (ApiError(403, "Forbidden", "exceeded quota: pods"), RetryCause.QUOTA),
        (ApiError(403, "Forbidden", "cannot create pods"), RetryCause.FORBIDDEN),
        (aiohttp.ClientConnectionError("refused"), RetryCause.CONNECTION),
        (TimeoutError(), RetryCause.CONNECTION),
        (ReconcilerUnavailable("down"), RetryCause.RECONCILER_UNAVAILABLE),
    ],
)
def test_each_retry_is_labelled_with_its_cause(error: BaseException, cause: RetryCause) -> None:
    assert retry_cause(error) is cause


RECONCILER_LOST_WATCHER = """
# TYPE shepherd_health_condition_unmet gauge
shepherd_health_condition_unmet{condition="started"} 0.0
shepherd_health_condition_unmet{condition="upstream"} 1.0
# TYPE shepherd_reconciler_upstream_connected gauge
shepherd_reconciler_upstream_connected{upstream="launcher"} 1.0
shepherd_reconciler_upstream_connected{upstream="watcher"} 0.0
# TYPE shepherd_reconciler_upstream_down_seconds gauge
shepherd_reconciler_upstream_down_seconds{upstream="launcher"} 0.0
shepherd_reconciler_upstream_down_seconds{upstream="watcher"} 42.4
# TYPE shepherd_reconciler_engine_queue_depth gauge
shepherd_reconciler_engine_queue_depth 3.0
# TYPE shepherd_reconciler_pod_actions_backlog gauge
shepherd_reconciler_pod_actions_backlog 4.0
"""


def test_status_names_the_lost_upstream_and_for_how_long() -> None:
    summary = servicemetrics.summary("reconciler", servicemetrics.parse(RECONCILER_LOST_WATCHER))
    assert summary == {"why": ["lost its upstream streams (watcher for 42 s)"], "backlog": 7}


def test_a_ready_service_has_no_reason() -> None:
    text = '# TYPE shepherd_health_condition_unmet gauge\nshepherd_health_condition_unmet{condition="api"} 0'
    assert servicemetrics.why(servicemetrics.parse(text)) == []


UNMET_TYPE = "# TYPE shepherd_health_condition_unmet gauge"


@pytest.mark.parametrize("condition", list(Readiness))
def test_every_readiness_condition_is_a_metric_label_that_status_explains(condition: Readiness) -> None:
    assert set(metrics.unmet) == set(Readiness)
    text = f'{UNMET_TYPE}\nshepherd_health_condition_unmet{{condition="{condition}"}} 1'
    (reason,) = servicemetrics.why(servicemetrics.parse(text))
    assert reason != condition.value, f"status shows the bare label {condition.value!r}"


def test_a_condition_status_does_not_know_is_shown_by_its_label() -> None:
    text = f'{UNMET_TYPE}\nshepherd_health_condition_unmet{{condition="quorum"}} 1'
    assert servicemetrics.why(servicemetrics.parse(text)) == ["quorum"]


def test_status_shows_the_release_each_service_runs() -> None:
    text = '# TYPE shepherd_build_info gauge\nshepherd_build_info{version="1.2.3"} 1.0'
    assert servicemetrics.summary("watcher", servicemetrics.parse(text))["version"] == "1.2.3"
    # and each service publishes its own: the package's version
    assert metrics.BUILD_INFO.labels(release())._value.get() == 1
