"""What a restarted launcher does with a launch whose outcome it never stored.

On start, every launch still ACCEPTED is replayed. Its create may never have been sent, or may have
succeeded just before the process died (in flight, or its CREATED waiting to share a commit). A
blind re-create is not safe: by then the first pod may have run, finished and been deleted by the
reconciler, and the second create succeeds instead of answering 409 AlreadyExists; or the task may
have been cancelled while the launcher was down. So a replayed launch is checked first:

1. Its pod (by its deterministic name) exists: the launch is CREATED; nothing is created.
2. Otherwise the reconciler, the authority on whether a task still wants a pod, is asked (GetTask)
   and `decide` maps its answer to CREATE, CREATED (settled without a create) or CANCELLED.

Why "no pod now and the reconciler never saw one" means the pod was never created: a worker pod is
deleted only by the reconciler, and only after it has committed the task's state with that pod
seen; the pod is looked up first, so a pod deleted before the look-up was committed as seen before
the reconciler is asked. The residual case is a third party deleting the pod within the moment
before the watcher reports it: then the pod is created again, as it would be for a pod lost before
it ran. A create still in flight in the API server when the launcher died answers the new create
with 409 AlreadyExists, which settles the launch as CREATED.
"""

from __future__ import annotations

from enum import Enum

from shepherd.taskstates import TERMINAL
from shepherd.v1 import launcher_service_pb2, task_pb2


class Replay(Enum):
    CREATE = "create"  # no pod was ever made for this attempt: create it now
    CREATED = "created"  # a pod was made for it (it may be gone since): settle without a create
    CANCELLED = "cancelled"  # the task was revoked: settle without a create


def decide(launch: launcher_service_pb2.Launch, task: task_pb2.Task | None) -> Replay:
    """A replayed launch whose pod does not exist now, given the reconciler's record of its task
    (None: the reconciler does not know it)."""
    if task is None or task.state == task_pb2.TASK_STATE_UNSPECIFIED:
        return Replay.CREATE  # never heard of, so no pod of it was ever seen
    if task.state == task_pb2.TASK_STATE_REVOKED:
        return Replay.CANCELLED
    if task.state in TERMINAL:
        return Replay.CREATED  # it ended (its pod ran, or was lost): it wants no pod any more
    if task.launch_attempts > launch.attempt:
        return Replay.CREATED  # a pod of a later attempt was seen, so this attempt's was made
    if task.launch_attempts < launch.attempt:
        # The reconciler has not seen this attempt yet: a pod of it would have told it.
        return Replay.CREATE
    if task.pod_uid or task.state in (task_pb2.TASK_STATE_RUNNING, task_pb2.TASK_STATE_ADOPTED):
        return Replay.CREATED
    return Replay.CREATE  # queued, and no pod of this attempt seen
