"""What the API server itself recorded about each pod: creates, kwok's status writes, deletes.

The control plane's audit policy logs every pod create and delete and every pod status write by
kwok (the simulated kubelet), one JSON line each (see controlplane/cluster.py). This is the
witness for "no pod created twice" and "did this pod ever run", independent of anything the
services say about themselves.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

KWOK_USER = "kwok-controller"


@dataclass
class PodAudit:
    """One pod name's history in the audit log (times are the API server's RFC 3339 stamps)."""

    created: list[str] = field(default_factory=list)  # creates answered 201, by whom they were received
    create_requests: int = 0  # every create that completed, whatever the answer (409s included)
    status_writes: list[str] = field(default_factory=list)  # kwok's successful pod status writes
    deleted_by: list[str] = field(default_factory=list)  # successful deletes, by user

    @property
    def ran(self) -> bool:
        """kwok wrote the pod's status: for the kinds in RUNS_WHEN_STARTED that first write is the
        one that puts it Running."""
        return bool(self.status_writes)


def read(path: Path, names: Iterable[str]) -> dict[str, PodAudit]:
    """The audit history of each pod in `names` (pods with no entry are left out)."""
    wanted = set(names)
    pods: dict[str, PodAudit] = {}
    if not path.exists():
        return pods
    with path.open("rb") as log:
        for line in log:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by an API server killed mid-write
            ref = entry.get("objectRef") or {}
            name = ref.get("name")
            if (
                name not in wanted
                or ref.get("resource") != "pods"
                or entry.get("stage") != "ResponseComplete"
            ):
                continue
            code = int((entry.get("responseStatus") or {}).get("code", 0))
            verb = entry.get("verb")
            user = (entry.get("user") or {}).get("username", "")
            when = entry.get("requestReceivedTimestamp", "")
            pod = pods.setdefault(name, PodAudit())
            subresource = ref.get("subresource", "")
            if verb == "create" and not subresource:
                pod.create_requests += 1
                if code == 201:
                    pod.created.append(when)
            elif subresource == "status" and user == KWOK_USER and 200 <= code < 300:
                pod.status_writes.append(when)
            elif verb == "delete" and not subresource and 200 <= code < 300:
                pod.deleted_by.append(user)
    return pods
