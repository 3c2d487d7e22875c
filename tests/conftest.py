"""Session-wide fixtures: the control plane is started once (or a running one reused)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from controlplane import Cluster, ClusterInfo
from controlplane.identities import GrpcAuthority
from controlplane.stack import ServiceStack
from shepherd import channels
from tests.helpers.scheduler import SchedulerClient

_VERSION_KEY = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[ClusterInfo]:
    """The local control plane. Started on first use unless one is running; a cluster this
    fixture started is stopped at the end (set SHEPHERD_KEEP_CLUSTER=1 to keep it)."""
    local = Cluster()
    was_running = local.healthy()
    info = local.up()
    request.config.stash[_VERSION_KEY] = f"kube-apiserver {info.version} at {info.server}"
    # A test's channel that names no credentials calls as the scheduler the default policy knows.
    channels.configure(GrpcAuthority(local.settings.state_dir).scheduler().credentials())
    yield info
    if not was_running and not os.environ.get("SHEPHERD_KEEP_CLUSTER"):
        local.down()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    version = config.stash.get(_VERSION_KEY, None)
    if version:
        terminalreporter.write_sep("-", f"integration tests ran against {version}")


@pytest.fixture(scope="session")
def stack(cluster: ClusterInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    """The three services as real processes, each under its own ServiceAccount, with a short
    pending timeout so timeouts can be observed in a test."""
    services = ServiceStack(
        cluster,
        tmp_path_factory.mktemp("stack"),
        executor_id=f"test-{uuid.uuid4().hex[:8]}",
        flags={"reconciler": ["--pending-timeout-s", "4"]},
    )
    services.start()
    yield services
    services.stop_all()


@pytest.fixture
async def client(stack: ServiceStack) -> AsyncIterator[SchedulerClient]:
    async with SchedulerClient.connect(stack) as scheduler:
        yield scheduler
