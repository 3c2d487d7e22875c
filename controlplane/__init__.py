"""The local Kubernetes control plane that the demo, the integration tests and the benchmarks run on.

Real components only: etcd, kube-apiserver and kube-scheduler built from the Go module proxy, and
kwok as the kubelet stand-in that moves pods through their phases. `python -m controlplane up`
starts it (reusing a healthy running one), `down` stops it and removes its state.
"""

from controlplane.cluster import Cluster, ClusterError, ClusterInfo
from controlplane.settings import ClusterSettings

__all__ = ["Cluster", "ClusterError", "ClusterInfo", "ClusterSettings"]
