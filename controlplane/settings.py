"""Where the local control plane keeps its binaries and state, and which ports it uses.

Every field can be set from the environment with the `SHEPHERD_CLUSTER_` prefix, so CI and a
developer with a port clash can move things without editing code.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _cache_root() -> Path:
    import os

    base = os.environ.get("SHEPHERD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shepherd"
    )
    return Path(base)


class ClusterSettings(BaseSettings):
    """Settings of the local control plane."""

    model_config = SettingsConfigDict(env_prefix="SHEPHERD_CLUSTER_", frozen=True)

    cache_dir: Path = Field(
        default_factory=_cache_root,
        description="Root of the build cache (binaries keyed by version) outside the checkout.",
    )
    state_dir: Path = Field(
        default_factory=lambda: _cache_root() / "cluster",
        description="Certificates, kubeconfigs, pid files and logs of the running cluster.",
    )
    etcd_data_dir: Path = Field(
        default=Path("/dev/shm/shepherd-etcd"),
        description="etcd data directory; tmpfs by default because tests want speed, not durability.",
    )
    etcd_client_port: int = Field(default=23790, ge=1, le=65535, description="etcd client port (loopback).")
    etcd_peer_port: int = Field(default=23800, ge=1, le=65535, description="etcd peer port (loopback).")
    apiserver_port: int = Field(default=6443, ge=1, le=65535, description="kube-apiserver TLS port.")
    scheduler_port: int = Field(default=10259, ge=1, le=65535, description="kube-scheduler health port.")
    kwok_port: int = Field(default=10247, ge=1, le=65535, description="kwok health/metrics port.")
    controller_manager_port: int = Field(
        default=10257, ge=1, le=65535, description="kube-controller-manager health port (loopback)."
    )
    real_node: bool = Field(
        default=True,
        description="Start one real node (kubelet + containerd) beside the kwok nodes. It needs root and "
        "Linux namespaces; where the machine cannot run it, start-up says why and goes on without it. "
        "Only one cluster on a machine can have it.",
    )
    real_node_name: str = Field(default="real-node-0", description="Name of the real node.")
    kubelet_port: int = Field(
        default=10250, ge=1, le=65535, description="The real node's kubelet API port (on the node IP)."
    )
    kubelet_healthz_port: int = Field(
        default=10248, ge=1, le=65535, description="The real node's kubelet health port (loopback)."
    )
    real_node_bridge: str = Field(
        default="shepherd0", max_length=15, description="Linux bridge the real node's pods are attached to."
    )
    real_node_pod_cidr: str = Field(
        default="10.89.0.0/24", description="Pod addresses on the real node (host-local IPAM on the bridge)."
    )
    nodes: int = Field(default=4, ge=1, le=100, description="Number of fake kwok nodes.")
    # Big enough that 5,000 benchmark pods of the default template (100m CPU, 128Mi) fit, while a
    # request of 100000 CPUs still cannot be placed anywhere.
    node_cpu: str = Field(default="1000", description="Allocatable CPU of each fake node.")
    node_memory: str = Field(default="4Ti", description="Allocatable memory of each fake node.")
    node_pods: int = Field(default=5000, ge=1, description="Pod capacity of each fake node.")
    pod_start_ms: int = Field(
        default=300, ge=0, description="Default delay before a scheduled pod goes Running."
    )
    pod_run_ms: int = Field(default=1000, ge=0, description="Default delay before a Running pod completes.")
    pods_watch_cache: bool = Field(
        default=True,
        description="Serve pod watches from the API server's watch cache. Off, watches read etcd directly, "
        "so compacting etcd makes a lagging watch get 410 Gone at once (used by the compaction test).",
    )
    start_timeout_s: float = Field(default=90.0, gt=0, description="How long to wait for readiness.")
    token_ttl_s: int = Field(
        default=48 * 3600, ge=600, description="Lifetime of the per-service ServiceAccount tokens."
    )

    @property
    def bin_dir(self) -> Path:
        """The stable symlink directory written by controlplane/build.sh."""
        return self.cache_dir / "bin" / "current"

    @property
    def kubeconfig_dir(self) -> Path:
        return self.state_dir / "kubeconfigs"

    @property
    def node_dir(self) -> Path:
        """The real node's kubelet and containerd state (unmounted and removed by `down`)."""
        return self.state_dir / "node"

    @property
    def image_cache_dir(self) -> Path:
        """Image tars built for the real node, keyed by their content."""
        return self.cache_dir / "images"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.kubeconfig_dir / "admin.kubeconfig"

    @property
    def apiserver_url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"
