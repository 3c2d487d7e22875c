"""An outcome recorded late (held while the store was full, or waiting for a shared commit) belongs
to the attempt that made it. If a relaunch moved the task on meanwhile, writing it would mark the
new attempt CREATED before its pod exists, so the new pod would never be created."""

from __future__ import annotations

from pathlib import Path

from services.launcher.store import LaunchStore, stamp_created
from shepherd.v1 import launcher_service_pb2
from tests.helpers import task_key


async def test_an_earlier_attempts_outcome_does_not_overwrite_a_relaunch(tmp_path: Path) -> None:
    store = LaunchStore(tmp_path / "launches.db")
    try:
        key = task_key(task_id="late")
        first = launcher_service_pb2.Launch(
            key=key,
            namespace="default",
            pod_name="late-1",
            attempt=1,
            state=launcher_service_pb2.LAUNCH_STATE_ACCEPTED,
        )
        pod: dict[str, object] = {"metadata": {"name": "late-1", "annotations": {}}}
        await store.accept([(first, pod)])
        # attempt 1 was created, but its outcome is still held; meanwhile the task is relaunched.
        await store.update(stamp_created(first))
        second, _, relaunched = await store.relaunch(key, from_attempt=1)
        assert relaunched
        assert second.state == launcher_service_pb2.LAUNCH_STATE_ACCEPTED

        changed = await store.update_soon(
            stamp_created(first), only_if_state=launcher_service_pb2.LAUNCH_STATE_ACCEPTED, lazy=False
        )

        stored = store.get(key)
        assert stored is not None
        assert not changed
        assert (stored.attempt, stored.state) == (2, launcher_service_pb2.LAUNCH_STATE_ACCEPTED)
        assert [launch.pod_name for launch, _ in store.pending()] == [second.pod_name]
    finally:
        await store.close()
