"""The control-plane tooling explains failures and never touches processes it does not own."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controlplane.kubeapi import object_path
from controlplane.pki import Authority
from controlplane.processes import Daemon, ProcessError, Supervisor, owned_pids, port_is_free


def test_a_taken_port_is_reported_with_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_is_free(port)
        with pytest.raises(ProcessError, match=rf"port {port} .* already taken.*SHEPHERD_CLUSTER_"):
            Supervisor(tmp_path).start(Daemon("etcd", ["/bin/true"], port))


def test_a_missing_binary_points_at_the_build_command(tmp_path: Path) -> None:
    with pytest.raises(ProcessError, match="make binaries"):
        Supervisor(tmp_path).start(Daemon("etcd", [str(tmp_path / "nope")], 0))


def test_stop_all_stops_only_processes_that_mention_the_state_dir(tmp_path: Path) -> None:
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(tmp_path)])
    theirs = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert ours.pid in owned_pids(str(tmp_path))
        Supervisor(tmp_path).stop_all(timeout=5)
        assert ours.wait(timeout=5) is not None
        assert theirs.poll() is None
    finally:
        theirs.kill()
        ours.kill()


def test_certificates_are_reused_so_a_restart_keeps_kubeconfigs_valid(tmp_path: Path) -> None:
    first = Authority(tmp_path).issue("admin", common_name="admin", organization="system:masters")
    cert = first.cert.read_bytes()
    second = Authority(tmp_path).issue("admin", common_name="admin", organization="system:masters")
    assert second.cert.read_bytes() == cert


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        ({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}, "/api/v1/namespaces/x"),
        (
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "a", "namespace": "n"}},
            "/api/v1/namespaces/n/serviceaccounts/a",
        ),
        (
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "b", "namespace": "n"},
            },
            "/apis/rbac.authorization.k8s.io/v1/namespaces/n/rolebindings/b",
        ),
        (
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "c"}},
            "/apis/rbac.authorization.k8s.io/v1/clusterroles/c",
        ),
    ],
)
def test_manifests_map_to_their_api_paths(obj: dict[str, Any], path: str) -> None:
    assert object_path(obj) == path


def test_a_namespaced_manifest_without_namespace_is_refused() -> None:
    with pytest.raises(ValueError, match="namespace"):
        object_path({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}})
