"""A second, throw-away control plane (own ports and directories) proves the lifecycle promises:
`down` leaves no process and no state, and a crashed run does not stop the next start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from controlplane import Cluster, ClusterSettings
from controlplane.cluster import DAEMONS
from tests.helpers.cluster import spare_settings

pytestmark = pytest.mark.integration


@pytest.fixture
def spare(tmp_path: Path, cluster: object) -> Iterator[Cluster]:
    """Depends on `cluster` only so the binaries are built first."""
    spare = Cluster(spare_settings(tmp_path))
    yield spare
    spare.down()


def daemon_pids(cluster: Cluster) -> list[int]:
    return [pid for name in DAEMONS if (pid := cluster.supervisor.pid(name)) is not None]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_down_leaves_no_process_and_no_state(spare: Cluster) -> None:
    spare.up()
    pids = daemon_pids(spare)
    assert len(pids) == len(DAEMONS)
    spare.down()
    assert not [pid for pid in pids if alive(pid)]
    assert not spare.settings.state_dir.exists()
    assert not spare.settings.etcd_data_dir.exists()


def test_down_stops_only_the_daemons_it_started(spare: Cluster) -> None:
    """`python -m controlplane down` leaves alone a user's `tail -f` of the audit log and a process
    working in a sibling directory whose name starts with the state directory's."""
    settings = spare.settings
    assert settings.state_dir != ClusterSettings().state_dir  # never the shared cluster
    spare.up()
    pids = daemon_pids(spare)
    sibling = Path(f"{settings.state_dir}-sibling")
    sibling.mkdir()
    strangers = [
        subprocess.Popen(["tail", "-f", str(spare.audit_log)], stdout=subprocess.DEVNULL),
        subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(300)", str(sibling / "data")],
        ),
    ]
    env = {
        **os.environ,
        "SHEPHERD_CLUSTER_STATE_DIR": str(settings.state_dir),
        "SHEPHERD_CLUSTER_ETCD_DATA_DIR": str(settings.etcd_data_dir),
        "SHEPHERD_CLUSTER_APISERVER_PORT": str(settings.apiserver_port),
        "SHEPHERD_CLUSTER_ETCD_CLIENT_PORT": str(settings.etcd_client_port),
    }
    try:
        subprocess.run([sys.executable, "-m", "controlplane", "down"], env=env, check=True, timeout=120)
        assert not [pid for pid in pids if alive(pid)]
        survivors = [s.poll() is None for s in strangers]
        assert survivors == [True, True], [s.args for s in strangers if s.poll() is not None]
    finally:
        for stranger in strangers:
            stranger.kill()
            stranger.wait()


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
    assert daemon_pids(spare) == []
