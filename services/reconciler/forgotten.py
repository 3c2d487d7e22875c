"""Telling a task the reconciler pruned from one it has not heard of yet.

GetTask and CancelTask learn a key the reconciler has no task for from the launcher (GetLaunch):
the launcher answers LaunchTask before its event reaches the reconciler. But the launcher may
still have the launch of a task the reconciler has pruned (retention by count prunes the
reconciler's four or so transitions per task before the launcher's two events), and a task learnt
again from such a launch would go back to QUEUED and, its pod long gone, be relaunched: it would
run twice. So a launch is learnt only if the reconciler has not already applied its last event.

The reconciler applies launch events in cursor order and commits the cursor with their effects,
and an applied launch event leaves its task stored (only pruning deletes a task row). A launch
whose last event is at or before the committed cursor, with no task stored, was therefore pruned
here, unless that event was among those the launcher pruned before the reconciler read them
(a gap: it was down for longer than the launcher's retention), which it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

from shepherd.v1 import launcher_service_pb2

Launch = launcher_service_pb2.Launch


@dataclass(frozen=True)
class LaunchGap:
    """Launch events skipped unread: every cursor strictly between `after` and `upto`."""

    after: int = 0
    upto: int = 0

    def holds(self, cursor: int) -> bool:
        return self.after < cursor < self.upto


def pruned_here(
    launch: Launch, last_event_cursor: int, *, committed: int, gap: LaunchGap, now: float, retention_s: float
) -> bool:
    """Whether a launch the reconciler has no task for (read after `committed`, the launcher
    cursor it had committed) is one whose task it pruned, so must not be learnt again.

    That holds for a launch still waiting for its pod too (its task was cancelled here, and the
    cancel has not reached the launcher yet). Without the cursor of its last event (a launcher
    older than that field) only age tells, and such a launch is always learnt: a task is pruned by
    age once it ended a retention period ago, after its pod was created."""
    if last_event_cursor:
        return last_event_cursor <= committed and not gap.holds(last_event_cursor)
    if launch.state == launcher_service_pb2.LAUNCH_STATE_ACCEPTED or not launch.HasField("accept_time"):
        return False
    return launch.accept_time.ToNanoseconds() / 1e9 + retention_s <= now


__all__ = ["LaunchGap", "pruned_here"]
