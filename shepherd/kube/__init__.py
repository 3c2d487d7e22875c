"""The Kubernetes adapter the services share: raw JSON over aiohttp, no client model objects."""

from shepherd.kube.client import KubeClient, WatchExpired
from shepherd.kube.config import KubeConnection, load_connection
from shepherd.kube.errors import ApiError, is_transient

__all__ = ["ApiError", "KubeClient", "KubeConnection", "WatchExpired", "is_transient", "load_connection"]
