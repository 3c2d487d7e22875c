"""Reading the API server's audit log: the witness of how often a pod was created or deleted."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

LAUNCHER = "system:serviceaccount:shepherd:launcher"
RECONCILER = "system:serviceaccount:shepherd:reconciler"


def calls_by_pod(audit_log: Path, verb: str, user: str, pods: set[str] | None = None) -> Counter[str]:
    """Completed `verb` calls (create, delete) on pods by `user`, per pod name (only `pods` if given)."""
    counts: Counter[str] = Counter()
    for line in audit_log.read_text().splitlines():
        entry = json.loads(line)
        ref = entry.get("objectRef") or {}
        name = ref.get("name") or ((entry.get("responseObject") or {}).get("metadata") or {}).get("name")
        if (
            entry.get("verb") == verb
            and ref.get("resource") == "pods"
            and not ref.get("subresource")
            and entry.get("stage") == "ResponseComplete"
            and (entry.get("user") or {}).get("username") == user
            and name
            and (pods is None or name in pods)
        ):
            counts[name] += 1
    return counts
