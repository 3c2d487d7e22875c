"""Session-wide fixtures: the control plane is started once (or a running one reused)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from controlplane import Cluster, ClusterInfo

_VERSION_KEY = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[ClusterInfo]:
    """The local control plane. Started on first use unless one is running; a cluster this
    fixture started is stopped at the end (set SHEPHERD_KEEP_CLUSTER=1 to keep it)."""
    local = Cluster()
    was_running = local.healthy()
    info = local.up()
    request.config.stash[_VERSION_KEY] = f"kube-apiserver {info.version} at {info.server}"
    yield info
    if not was_running and not os.environ.get("SHEPHERD_KEEP_CLUSTER"):
        local.down()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    version = config.stash.get(_VERSION_KEY, None)
    if version:
        terminalreporter.write_sep("-", f"integration tests ran against {version}")
