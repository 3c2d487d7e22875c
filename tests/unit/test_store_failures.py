"""A store that cannot write: its writes fail as StoreUnavailable naming the path (nothing of
them kept), `watch` reports it and probes until the store can write again, a damaged file fails
at open, and an engine batch that failed to commit is never followed by a later one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.reconciler.engine import Engine, PodItem
from services.reconciler.statemachine import Policy
from services.reconciler.store import Batch, TaskStore
from shepherd import failpoints
from shepherd.sqlite import Database, StoreUnavailable
from shepherd.v1 import task_pb2
from tests.helpers import task_key
from tests.helpers.pods import pod_event

S = task_pb2
SCHEMA = "CREATE TABLE IF NOT EXISTS t (x INTEGER);"


@pytest.fixture(autouse=True)
def disarm() -> Iterator[None]:
    yield
    failpoints.configure("")


async def test_a_failed_commit_is_retryable_names_the_path_and_keeps_nothing(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db", SCHEMA, synchronous="OFF")
    failpoints.configure("sqlite.commit=1")
    with pytest.raises(StoreUnavailable) as failed:
        await db.write(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
    assert str(tmp_path / "s.db") in str(failed.value)
    assert "sqlite.commit" in str(failed.value)
    assert not db.writable
    await db.write(lambda _: None)  # commits even on a read-only disk: proves nothing
    assert not db.writable
    await db.write(lambda conn: conn.execute("INSERT INTO t VALUES (2)"))
    assert db.writable
    assert db.reader.execute("SELECT x FROM t").fetchall() == [(2,)]
    await db.close()


async def test_watch_reports_the_store_unwritable_then_probes_until_it_writes_again(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db", SCHEMA, synchronous="OFF")
    seen: list[bool] = []
    changed = asyncio.Event()

    async def report(writable: bool) -> None:
        seen.append(writable)
        changed.set()

    watcher = asyncio.create_task(db.watch(report, probe_every_s=0.05))
    failpoints.configure("sqlite.commit=3")  # this write fails, and so do the first two probes
    with pytest.raises(StoreUnavailable):
        await db.write(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
    # Nothing else writes: the probes alone find the store working again.
    while seen != [False, True]:
        changed.clear()
        await asyncio.wait_for(changed.wait(), 10)
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    await db.close()


async def test_a_damaged_file_fails_at_open_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "damaged.db"
    path.write_bytes(b"not a database at all " * 100)
    with pytest.raises(StoreUnavailable, match="file is not a database") as failed:
        Database(path, SCHEMA)
    assert str(path) in str(failed.value)


def _batch(store: TaskStore, name: str) -> Batch:
    task = task_pb2.Task(state=S.TASK_STATE_QUEUED)
    task.key.CopyFrom(task_key(task_id=name))
    change = task_pb2.TaskStateChange(previous_state=S.TASK_STATE_UNSPECIFIED)
    change.task.CopyFrom(task)
    return Batch(tasks={name: (task, "")}, changes=[change], cursors={"launcher": len(name)})


async def test_no_engine_batch_commits_after_one_that_failed(tmp_path: Path) -> None:
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    failpoints.configure("sqlite.commit=1")
    with pytest.raises(StoreUnavailable):
        await store.commit(_batch(store, "first"))
    with pytest.raises(StoreUnavailable, match="batch 1 was not committed"):
        await store.commit(_batch(store, "second"))
    assert store.transitions.head() == 0
    assert store.get("second") is None
    assert store.cursor("launcher") == 0
    await store.close()

    restarted = TaskStore(tmp_path / "r.db", synchronous="OFF")
    await restarted.commit(_batch(restarted, "third"))
    assert restarted.get("third") is not None
    await restarted.close()


async def test_an_engine_whose_commit_fails_stops_and_its_restart_replays_the_batch(tmp_path: Path) -> None:
    key = task_key(task_id="replayed")
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    engine = Engine(store=store, policy=Policy(), executor_id="e", on_actions=lambda _: None)
    failpoints.configure("sqlite.commit=1")
    runner = asyncio.create_task(engine.run())
    await engine.submit(PodItem(pod_event(key, "Running")))
    with pytest.raises(ExceptionGroup) as stopped:
        await asyncio.wait_for(runner, 10)
    assert stopped.group_contains(StoreUnavailable)
    assert store.transitions.head() == 0  # nothing of the batch became visible
    await store.close()

    # The restart: memory rebuilt from the store, the event seen again (the watcher's snapshot).
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    engine = Engine(store=store, policy=Policy(), executor_id="e", on_actions=lambda _: None)
    runner = asyncio.create_task(engine.run())
    await engine.submit(PodItem(pod_event(key, "Running")))
    await asyncio.sleep(0)
    await engine.idle()
    states = [change.task.state for _, change in store.transitions.read_after(0, 10)]
    assert states == [S.TASK_STATE_RUNNING]
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await store.close()
