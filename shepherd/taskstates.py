"""Facts about task states that every party needs: which are final, and their short names.

The reconciler's state machine, schedulers' clients and the benchmark all use these, so the
definition of "finished" lives in one place next to the contract.
"""

from __future__ import annotations

from shepherd.v1 import task_pb2

TERMINAL = frozenset(
    {
        task_pb2.TASK_STATE_SUCCEEDED,
        task_pb2.TASK_STATE_FAILED,
        task_pb2.TASK_STATE_UP_FOR_RESCHEDULE,
        task_pb2.TASK_STATE_REVOKED,
    }
)


def state_name(state: int) -> str:
    """'succeeded' for TASK_STATE_SUCCEEDED, and so on."""
    return task_pb2.TaskState.Name(state).removeprefix("TASK_STATE_").lower()  # type: ignore[arg-type]
