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
_REAL_NODE_TESTS = pytest.StashKey[set[str]]()
_REAL_NODE_ABSENT = pytest.StashKey[str]()
_STARTED_CLUSTER = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[ClusterInfo]:
    """The local control plane. Started on first use unless one is running; a cluster this
    fixture started is stopped at the end (set SHEPHERD_KEEP_CLUSTER=1 to keep it)."""
    local = Cluster()
    was_running = local.healthy()
    info = local.up()
    request.config.stash[_STARTED_CLUSTER] = not was_running
    request.config.stash[_VERSION_KEY] = f"kube-apiserver {info.version} at {info.server}"
    # A test's channel that names no credentials calls as the scheduler the default policy knows.
    channels.configure(GrpcAuthority(local.settings.state_dir).scheduler().credentials())
    yield info
    if not was_running and not os.environ.get("SHEPHERD_KEEP_CLUSTER"):
        local.down()


@pytest.fixture(scope="session")
def real_node(cluster: ClusterInfo, request: pytest.FixtureRequest) -> str:
    """The name of the cluster's real node (kubelet + containerd). Where the machine cannot run
    one, the tests that need it are skipped with the reason cluster-up gave."""
    if cluster.real_node is None:
        reason = cluster.real_node_unavailable or "the cluster has no real node"
        request.config.stash[_REAL_NODE_ABSENT] = reason
        pytest.skip(f"no real node: {reason}")
    return cluster.real_node


@pytest.fixture
def free_real_node(real_node: str, request: pytest.FixtureRequest) -> Iterator[None]:
    """For a test that starts a real node of its own: the session's cluster gives up the machine's
    one real node and takes it back afterwards. Only a cluster this session started lends it; a
    cluster other sessions share keeps its node, and the test is skipped."""
    if not request.config.stash.get(_STARTED_CLUSTER, False):
        pytest.skip(
            "the real node belongs to a cluster this test session did not start (others may use it); "
            "a session that starts its own cluster runs this test"
        )
    local = Cluster()
    local.stop_real_node()
    try:
        yield
    finally:
        local.start_real_node()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    config.stash[_REAL_NODE_TESTS] = {
        item.nodeid for item in items if "real_node" in getattr(item, "fixturenames", ())
    }


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    version = config.stash.get(_VERSION_KEY, None)
    if version:
        terminalreporter.write_sep("-", f"integration tests ran against {version}")
    wanted = config.stash.get(_REAL_NODE_TESTS, set())
    if wanted:
        outcomes: dict[str, int] = {}
        for category in ("passed", "failed", "error", "skipped"):
            nodeids = {r.nodeid for r in terminalreporter.stats.get(category, []) if r.nodeid in wanted}
            if nodeids:
                outcomes[category] = len(nodeids)
        line = ", ".join(f"{n} {c}" for c, n in outcomes.items()) or "none run"
        absent = config.stash.get(_REAL_NODE_ABSENT, None)
        terminalreporter.write_sep(
            "-", f"real-node tests: {line}" + (f" (skipped because {absent})" if absent else "")
        )


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
