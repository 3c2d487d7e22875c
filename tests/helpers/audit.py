"""Counting what each identity did to which pod, from the API server's audit log: the witness
that no pod was created or deleted twice, whatever the services believe."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

LAUNCHER = "system:serviceaccount:shepherd:launcher"
RECONCILER = "system:serviceaccount:shepherd:reconciler"


def calls_by_pod(
    audit_log: Path, verb: str, pods: set[str], user: str, *, succeeded_only: bool = False
) -> Counter[str]:
    """Completed `verb` calls per pod made by `user` (only those answered 2xx, if `succeeded_only`)."""
    counts: Counter[str] = Counter()
    for line in audit_log.read_text().splitlines():
        entry = json.loads(line)
        ref = entry.get("objectRef") or {}
        if (
            entry.get("verb") == verb
            and entry.get("stage") == "ResponseComplete"
            and entry.get("user", {}).get("username") == user
            and ref.get("name") in pods
            and (not succeeded_only or 200 <= (entry.get("responseStatus") or {}).get("code", 0) < 300)
        ):
            counts[ref["name"]] += 1
    return counts


def deletes_by_pod(audit_log: Path, pods: set[str], user: str = RECONCILER) -> Counter[str]:
    """Delete calls per pod made by `user`."""
    return calls_by_pod(audit_log, "delete", pods, user)


def pods_created(audit_log: Path, pods: set[str], user: str = LAUNCHER) -> Counter[str]:
    """Creates per pod that made a pod (201), by `user`: a retry answered 409 AlreadyExists is not one."""
    return calls_by_pod(audit_log, "create", pods, user, succeeded_only=True)
