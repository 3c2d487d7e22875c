"""Throw-away control planes beside the shared one: own ports, own directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from controlplane import ClusterSettings
from controlplane.stack import free_port


def spare_settings(directory: Path, **overrides: Any) -> ClusterSettings:
    """Settings of a cluster that disturbs no other: its own ports and directories, and no real
    node (a machine has only one, and it belongs to the session's cluster)."""
    values: dict[str, Any] = {
        "state_dir": directory / "state",
        "etcd_data_dir": directory / "etcd",
        "nodes": 1,
        "etcd_client_port": free_port(),
        "etcd_peer_port": free_port(),
        "apiserver_port": free_port(),
        "scheduler_port": free_port(),
        "kwok_port": free_port(),
        "controller_manager_port": free_port(),
        "real_node": False,
    }
    values.update(overrides)
    return ClusterSettings(**values)


def unreachable_kubeconfig(kubeconfig: str, directory: Path) -> str:
    """A copy of a kubeconfig whose server is a closed port: every call fails as a connection error."""
    doc = yaml.safe_load(Path(kubeconfig).read_text())
    doc["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    path = directory / "unreachable.kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return str(path)
