"""The one call the launcher makes to the reconciler: GetTask, for a replayed launch (replay.py),
and for a launch it may forget once its task ended a retention period ago (expiry.py).

Through the generated stub, over a channel from shepherd.channels: services never import one
another. Any answer but the task or NOT_FOUND means the reconciler cannot say now (down,
restarting, overloaded): ReconcilerUnavailable, a ConnectionError, so the retry policy treats it as
transient and the replayed launch waits for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from shepherd.v1 import reconciler_service_pb2, reconciler_service_pb2_grpc, task_pb2


class ReconcilerUnavailable(ConnectionError):
    """The reconciler did not answer GetTask."""


@dataclass
class ReconcilerClient:
    channel: grpc.aio.Channel
    timeout_s: float = 10.0
    _stub: reconciler_service_pb2_grpc.ReconcilerServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self._stub = reconciler_service_pb2_grpc.ReconcilerServiceStub(self.channel)

    async def get_task(self, key: task_pb2.TaskKey, *, stored_only: bool = False) -> task_pb2.Task | None:
        """The reconciler's record of the task, or None if it has none (with `stored_only`, none in
        its store: it does not ask the launcher back about an unknown key)."""
        try:
            reply = await self._stub.GetTask(
                reconciler_service_pb2.GetTaskRequest(key=key, stored_only=stored_only),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise ReconcilerUnavailable(
                f"the reconciler did not answer GetTask: {err.code().name} {err.details() or ''}".strip()
            ) from err
        task: task_pb2.Task = reply.task
        return task
