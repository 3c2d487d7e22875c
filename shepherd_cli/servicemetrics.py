"""What `shepherd status` reads from a service's /metrics: why it is not ready, and its backlog.

gRPC health says SERVING or NOT_SERVING and nothing more; the services publish the reason as
metrics (shepherd_health_condition_unmet, and the reconciler's upstream streams), so the CLI
reads them from the metrics port the connection file names. A service without one (or one that
does not answer) is shown without them.
"""

from __future__ import annotations

import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from shepherd.readiness import Readiness

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# What each unmet condition (the metric's `condition` label) means to an operator.
_CONDITIONS = {
    Readiness.STARTED: "starting",
    Readiness.STORE: "its store cannot write",
    Readiness.API: "the Kubernetes API server is unreachable",
    Readiness.UPSTREAM: "lost its upstream streams",
}
_DOWN = "shepherd_reconciler_upstream_down_seconds"
# The figure shown as a service's backlog.
_BACKLOG = {
    "launcher": ("shepherd_launcher_backlog_launches",),
    "reconciler": ("shepherd_reconciler_engine_queue_depth", "shepherd_reconciler_pod_actions_backlog"),
}


def fetch(url: str, *, timeout_s: float = 5.0) -> Samples:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    return parse(text)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def why(samples: Samples) -> list[str]:
    """Why the service is not ready, one phrase per unmet condition (empty when all hold)."""
    reasons = []
    for (name, labels), value in sorted(samples.items()):
        if name != "shepherd_health_condition_unmet" or not value:
            continue
        condition = dict(labels).get("condition", "")
        try:
            reason = _CONDITIONS[Readiness(condition)]
        except ValueError:  # a condition this CLI does not know (a newer service): its label
            reason = condition
        if condition == Readiness.UPSTREAM:
            lost = [
                f"{dict(lab)['upstream']} for {samples.get((_DOWN, lab), 0):.0f} s"
                for (n, lab), v in sorted(samples.items())
                if n == "shepherd_reconciler_upstream_connected" and not v
            ]
            reason += f" ({', '.join(lost)})" if lost else ""
        reasons.append(reason)
    return reasons


def summary(service: str, samples: Samples) -> dict[str, Any]:
    """The figures `shepherd status` shows for a service."""
    backlog = sum(samples.get((name, ()), 0.0) for name in _BACKLOG.get(service, ()))
    found: dict[str, Any] = {"why": why(samples)}
    versions = [
        dict(labels)["version"] for (name, labels), _ in samples.items() if name == "shepherd_build_info"
    ]
    if versions:
        found["version"] = versions[0]
    if service in _BACKLOG:
        found["backlog"] = int(backlog)
    if service == "watcher":
        found["watch_silence_s"] = round(samples.get(("shepherd_watcher_watch_silence_seconds", ()), 0.0), 1)
    return found
