"""A second, throw-away control plane (own ports and directories) proves the lifecycle promises:
`down` leaves no process and no state, and a crashed run does not stop the next start."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import Cluster
from controlplane.cluster import DAEMONS
from controlplane.processes import owned_pids
from tests.helpers.cluster import spare_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def spare(tmp_path: Path, cluster: object) -> Iterator[Cluster]:
    """Depends on `cluster` only so the binaries are built first."""
    spare = Cluster(spare_settings(tmp_path))
    yield spare
    spare.down()


def test_down_leaves_no_process_and_no_state(spare: Cluster) -> None:
    spare.up()
    assert len(owned_pids(str(spare.settings.state_dir))) == len(DAEMONS)
    spare.down()
    assert owned_pids(str(spare.settings.state_dir)) == []
    assert not spare.settings.state_dir.exists()
    assert not spare.settings.etcd_data_dir.exists()


def test_a_crashed_run_does_not_stop_the_next_start(spare: Cluster) -> None:
    spare.up()
    apiserver = spare.supervisor.pid("kube-apiserver")
    assert apiserver is not None
    os.kill(apiserver, signal.SIGKILL)  # the earlier run dies, leaving etcd, kwok and state behind
    assert not spare.healthy()
    info = spare.up()
    assert spare.healthy()
    assert info.version.startswith("v1.")


def test_a_taken_port_stops_start_up_with_a_clear_message(spare: Cluster) -> None:
    import socket

    from controlplane import ClusterError

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", spare.settings.apiserver_port))
        squatter.listen()
        with pytest.raises(ClusterError, match=f"port {spare.settings.apiserver_port}"):
            spare.up()
    assert owned_pids(str(spare.settings.state_dir)) == []
