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
from controlplane.processes import Daemon, ProcessError, Supervisor, port_is_free
from controlplane.stack import free_port


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


def _sleeper(*args: str) -> list[str]:
    return [sys.executable, "-c", "import time; time.sleep(120)", *args]


def test_stop_all_stops_only_the_daemons_it_started(tmp_path: Path) -> None:
    """Naming the state directory does not make a process ours: a user's `tail -f` of a daemon's
    log, or a process working in a sibling directory with the same prefix, survives stop_all."""
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    (state / "logs" / "audit.log").write_text("")
    supervisor = Supervisor(state)
    ours = supervisor.start(Daemon("etcd", _sleeper(f"--data-dir={state}/etcd"), free_port()))
    strangers = [
        subprocess.Popen(["tail", "-f", str(state / "logs" / "audit.log")]),
        subprocess.Popen(_sleeper(f"{state}-sibling/data")),
        subprocess.Popen(_sleeper(f"--data-dir={state}/etcd")),  # our daemon's very arguments, not ours
    ]
    try:
        assert supervisor.pid("etcd") == ours
        assert supervisor.stop_all(["etcd"], timeout=5) == [ours]
        assert not Path(f"/proc/{ours}").exists() or _zombie(ours)
        for stranger in strangers:
            assert stranger.poll() is None, f"{stranger.args!r} was stopped"
    finally:
        for stranger in strangers:
            stranger.kill()
            stranger.wait()


def test_a_pid_file_naming_another_process_is_not_trusted(tmp_path: Path) -> None:
    """A recycled pid (the pid file of a dead daemon now naming someone else) is left alone."""
    supervisor = Supervisor(tmp_path)
    supervisor.start(Daemon("etcd", _sleeper(), free_port()))
    supervisor.stop_all(["etcd"], timeout=5)
    stranger = subprocess.Popen(_sleeper(str(tmp_path)))
    try:
        (tmp_path / "run" / "etcd.pid").write_text(str(stranger.pid))
        assert supervisor.pid("etcd") is None
        supervisor.stop_all(["etcd"], timeout=5)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


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
        (
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicy",
                "metadata": {"name": "p"},
            },
            "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/p",
        ),
        (
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": {"name": "b"},
            },
            "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings/b",
        ),
    ],
)
def test_manifests_map_to_their_api_paths(obj: dict[str, Any], path: str) -> None:
    assert object_path(obj) == path


def test_a_namespaced_manifest_without_namespace_is_refused() -> None:
    with pytest.raises(ValueError, match="namespace"):
        object_path({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}})
