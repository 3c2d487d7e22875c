"""Reading the API server's audit log: the witness of how many times each pod was created or
deleted, and by whom."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

LAUNCHER = "system:serviceaccount:shepherd:launcher"
RECONCILER = "system:serviceaccount:shepherd:reconciler"


def calls_by_pod(audit_log: Path, verb: str, pods: set[str], user: str) -> Counter[str]:
    """`verb` calls (create, delete...) per pod in `pods` made by `user`, whatever they were answered."""
    counts: Counter[str] = Counter()
    for line in audit_log.read_text().splitlines():
        entry = json.loads(line)
        ref = entry.get("objectRef") or {}
        name = ref.get("name") or (entry.get("responseObject") or {}).get("metadata", {}).get("name")
        if (
            entry.get("verb") == verb
            and entry.get("stage") == "ResponseComplete"
            and entry.get("user", {}).get("username") == user
            and name in pods
        ):
            counts[name] += 1
    return counts
