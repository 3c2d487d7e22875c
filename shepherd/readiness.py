"""The conditions a service must meet to be ready, in one enum that everything naming them uses.

The health service (shepherd.grpcserver) is SERVING while all of them hold; each value is also
the label of shepherd_health_condition_unmet (shepherd.metrics), which `shepherd status` reads
back to say why a service is not ready. One enum, so the three cannot drift apart.
"""

from __future__ import annotations

from enum import StrEnum

# The gRPC health name of liveness (what a liveness probe checks), apart from readiness: see
# shepherd.grpcserver. Here so that a client (`shepherd status`) needs none of the server's code.
LIVENESS = "liveness"


class Readiness(StrEnum):
    """What must hold for a service to be ready; the value is the metric's `condition` label."""

    STARTED = "started"  # start-up is done (the watcher's first list, the reconciler in sync...)
    STORE = "store"  # the service's SQLite store can write
    API = "api"  # the Kubernetes API server answers (the launcher: it can do nothing without)
    UPSTREAM = "upstream"  # its event streams are up, or were lost only briefly (the reconciler)
