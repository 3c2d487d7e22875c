"""Reading the API server's audit log: the witness of how many times a pod was really created or
deleted, and by whom, whatever Shepherd's own records say."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAUNCHER = "system:serviceaccount:shepherd:launcher"
RECONCILER = "system:serviceaccount:shepherd:reconciler"
WATCHER = "system:serviceaccount:shepherd:watcher"


@dataclass
class AuditLog:
    """The entries appended to an audit log since this object was made (a shared cluster's log is
    long: a test reads only its own part of it)."""

    path: Path
    start: int = 0

    @classmethod
    def from_now(cls, path: Path) -> AuditLog:
        return cls(path, path.stat().st_size if path.exists() else 0)

    def entries(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open("rb") as log:
            # A rotated log starts again from zero: then everything in it is new.
            log.seek(self.start if log.seek(0, 2) >= self.start else 0)
            for line in log:
                if line.endswith(b"\n"):  # a line being written is read next time
                    yield json.loads(line)

    def calls(
        self, verb: str, pods: set[str] | None, *, user: str, status: int | None = None
    ) -> Counter[str]:
        """Completed `verb` calls on pods (not their subresources) by `user`, per pod name: only
        `pods` if given, and only those answered with HTTP `status` if given."""
        counts: Counter[str] = Counter()
        for entry in self.entries():
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
                and (status is None or (entry.get("responseStatus") or {}).get("code") == status)
            ):
                counts[name] += 1
        return counts

    def creates(self, pods: set[str]) -> Counter[str]:
        """Pods the launcher really created (201), per pod name."""
        return self.calls("create", pods, user=LAUNCHER, status=201)

    async def until_called(
        self, verb: str, pods: set[str], *, user: str, timeout: float = 120.0
    ) -> Counter[str]:
        """Wait until every pod in `pods` has had a `verb` call by `user`; those calls, per pod."""

        async def wait() -> Counter[str]:
            while set(calls := self.calls(verb, pods, user=user)) != pods:
                await asyncio.sleep(0.2)
            return calls

        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            missing = sorted(pods - set(self.calls(verb, pods, user=user)))
            raise AssertionError(f"no {verb} by {user} of {missing[:5]} (audit log {self.path})") from None

    async def until_created(self, *pods: str, timeout: float = 120.0) -> None:
        """Wait until the launcher's creates of all `pods` are in the log."""
        wanted = set(pods)

        async def wait() -> None:
            while set(self.creates(wanted)) != wanted:
                await asyncio.sleep(0.2)

        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            missing = sorted(wanted - set(self.creates(wanted)))
            raise AssertionError(f"pods never created: {missing[:5]} (audit log {self.path})") from None


def calls_by_pod(audit_log: Path, verb: str, user: str, pods: set[str] | None = None) -> Counter[str]:
    """Completed `verb` calls (create, delete) on pods by `user` over the whole log, per pod name."""
    return AuditLog(audit_log).calls(verb, pods, user=user)
