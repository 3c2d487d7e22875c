"""A service's ports (gRPC, health, metrics) are checked together when its settings are read: two
that would collide stop it at start-up naming both fields, before anything listens. Port 0 picks a
free port, so it never collides."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.launcher.settings import LauncherSettings
from services.reconciler.settings import ReconcilerSettings
from services.watcher.settings import WatcherSettings
from shepherd.settings import ServiceSettings


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        ({"port": 9090, "metrics_port": 9090}, "port and metrics_port: both are 9090"),
        ({"port": 8081, "health_port": 8081}, "port and health_port: both are 8081"),
        ({"health_port": 8081, "metrics_port": 8081}, "health_port and metrics_port: both are 8081"),
    ],
)
def test_two_ports_that_collide_are_refused_naming_both(ports: dict[str, int], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ServiceSettings.model_validate({"host": "127.0.0.1", **ports})


@pytest.mark.parametrize("settings_class", [LauncherSettings, WatcherSettings, ReconcilerSettings])
def test_each_service_checks_its_ports(settings_class: type[ServiceSettings]) -> None:
    with pytest.raises(ValidationError, match="health_port and metrics_port"):
        settings_class.load(["--host", "127.0.0.1", "--health-port", "8081", "--metrics-port", "8081"])


def test_port_zero_never_collides() -> None:
    assert ServiceSettings(host="127.0.0.1", port=0, health_port=0, metrics_port=0).port == 0
    settings = ServiceSettings(host="127.0.0.1", port=50051, health_port=8081, metrics_port=9090)
    assert (settings.port, settings.health_port, settings.metrics_port) == (50051, 8081, 9090)
