"""The Airflow executor's state feed (`shepherd_airflow.client.StateFeed`) on its own, against the
session's services: the thread that follows WatchTaskStates and the queue it hands the scheduler.

No Airflow is needed (the feed imports none), so these run in the project's venv; the executor as
Airflow drives it is tested in test_airflow_executor.py. What is checked is what the feed hands
over: which tasks, in which states, how many at once, and that it keeps doing so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import pytest
from shepherd_airflow.client import ShepherdClient, StateFeed
from shepherd_airflow.config import Settings
from shepherd_airflow.translate import TERMINAL_STATES
from shepherd_airflow.v1 import launcher_service_pb2, task_pb2

from controlplane.stack import ServiceStack
from tests.helpers import eventually, unique_name

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

QUICK = "metadata: {annotations: {sim.shepherd.dev/run-time: '1s'}}"
# A cursor the reconciler's log has never reached: what a feed holds after the reconciler's
# store was replaced. The reconciler answers OUT_OF_RANGE and the feed must re-sync.
UNKNOWN_CURSOR = 2**62


@pytest.fixture
def shepherd(stack: ServiceStack) -> Iterator[ShepherdClient]:
    issued = stack.authority.scheduler("airflow")
    settings = Settings(
        launcher_address=stack.address("launcher"),
        reconciler_address=stack.address("reconciler"),
        tls_ca=str(issued.ca),
        tls_cert=str(issued.cert),
        tls_key=str(issued.key),
        reconnect_initial_s=0.1,
        reconnect_max_s=1.0,
    )
    client = ShepherdClient(settings)
    yield client
    client.close()


def keys_of(dag: str, *task_ids: str) -> list[task_pb2.TaskKey]:
    run = "manual__2026-12-01T00:00:00+00:00"
    return [task_pb2.TaskKey(dag_id=dag, task_id=t, run_id=run, try_number=1, map_index=-1) for t in task_ids]


def run_to_the_end(client: ShepherdClient, keys: list[task_pb2.TaskKey]) -> None:
    """Launch the tasks and wait until Shepherd has each in a terminal state."""
    results = client.launch(
        [
            launcher_service_pb2.LaunchTaskRequest(key=k, command=["run-task"], pod_override_yaml=QUICK)
            for k in keys
        ]
    )
    assert not [r for r in results if r.HasField("error")], results

    def finished() -> bool:
        return all((t := client.get(k)) is not None and t.state in TERMINAL_STATES for k in keys)

    eventually(finished, what="the tasks to finish", timeout=120)


class Received:
    """What the scheduler thread would read from the feed, drain by drain."""

    def __init__(self, feed: StateFeed) -> None:
        self.feed = feed
        self.states: dict[str, list[int]] = {}
        self.largest_drain = 0

    def drain(self) -> None:
        tasks = self.feed.drain()
        self.largest_drain = max(self.largest_drain, len(tasks))
        for task in tasks:
            self.states.setdefault(task.key.task_id, []).append(task.state)

    def terminal(self, task_id: str) -> list[int]:
        self.drain()
        return [s for s in self.states.get(task_id, []) if s in TERMINAL_STATES]


@contextlib.contextmanager
def started(feed: StateFeed) -> Iterator[StateFeed]:
    feed.start()
    try:
        yield feed
    finally:
        feed.stop()


def tracking(keys: Iterable[task_pb2.TaskKey]) -> Callable[[], list[task_pb2.TaskKey]]:
    fixed = list(keys)
    return lambda: list(fixed)


def test_after_a_refused_cursor_the_feed_rereads_its_tasks_and_replays_nothing_else(
    shepherd: ShepherdClient,
) -> None:
    """OUT_OF_RANGE (a new store, a log that moved on): the feed follows from the head again and
    reads the one task it tracks with GetTask. The retained transitions of the tasks it does not
    track are not read; a task launched afterwards is the barrier that shows the stream moved on."""
    dag = unique_name("feedresync")
    old = keys_of(dag, "tracked", "other0", "other1")
    run_to_the_end(shepherd, old)
    feed = StateFeed(shepherd, tracking(old[:1]))
    feed.cursor = UNKNOWN_CURSOR
    received = Received(feed)
    with started(feed):
        (sentinel,) = keys_of(dag, "sentinel")
        eventually(lambda: feed.resyncs >= 1, what="the refused cursor to be noticed")
        run_to_the_end(shepherd, [sentinel])
        eventually(lambda: received.terminal("sentinel"), what="the sentinel's terminal state", timeout=60)
        assert feed.is_alive()
    assert received.terminal("tracked") == [task_pb2.TASK_STATE_SUCCEEDED]
    assert "other0" not in received.states, received.states
    assert "other1" not in received.states, received.states


def test_an_unexpected_error_in_the_feed_is_survived(shepherd: ShepherdClient) -> None:
    """Anything the feed's thread raises (here the executor's `tracked` callback, failing once as
    a set changed during iteration would) is logged and retried after a backoff; the thread never
    ends on its own, and the tracked task's state still arrives, once."""
    dag = unique_name("feederror")
    keys = keys_of(dag, "t")
    run_to_the_end(shepherd, keys)
    calls = 0

    def flaky() -> list[task_pb2.TaskKey]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("Set changed size during iteration")
        return list(keys)

    feed = StateFeed(shepherd, flaky)
    feed.cursor = UNKNOWN_CURSOR
    received = Received(feed)
    with started(feed):
        eventually(lambda: received.terminal("t"), what="the task's state after the error", timeout=60)
        assert feed.is_alive()
    assert calls >= 2
    assert received.terminal("t") == [task_pb2.TASK_STATE_SUCCEEDED]


def test_the_queue_is_bounded_and_loses_nothing(shepherd: ShepherdClient) -> None:
    """With room for two tasks, a feed re-reading six finished ones waits for the scheduler to
    drain rather than holding them all; draining (which never waits) gets all six, each once."""
    dag = unique_name("feedbound")
    names = [f"t{i}" for i in range(6)]
    keys = keys_of(dag, *names)
    run_to_the_end(shepherd, keys)
    feed = StateFeed(shepherd, tracking(keys), max_queued=2)
    received = Received(feed)
    with started(feed):
        eventually(lambda: feed.tasks.qsize() == 2, what="the queue to fill up")
        eventually(lambda: all(received.terminal(n) for n in names), what="every task", timeout=60)
    assert received.largest_drain <= 2
    for name in names:
        assert received.terminal(name) == [task_pb2.TASK_STATE_SUCCEEDED], received.states


def test_a_reread_state_is_never_followed_by_an_older_one_from_the_stream(shepherd: ShepherdClient) -> None:
    """The feed subscribes, then reads its tasks; a task that moves on in between is read in its
    newest state while the stream still has its older transitions to send. Here the executor's
    task is launched as the feed subscribes and has finished when the feed reads it: the feed
    hands over SUCCEEDED once, and neither the stream's QUEUED and RUNNING after it nor the
    stream's own SUCCEEDED. A task launched afterwards is the barrier: the stream got past them."""
    dag = unique_name("feedorder")
    (key,) = keys_of(dag, "t")
    (sentinel,) = keys_of(dag, "sentinel")

    def launched_and_finished() -> list[task_pb2.TaskKey]:
        # Called by the feed once subscribed: the task runs its whole life before it is read.
        run_to_the_end(shepherd, [key])
        return [key]

    feed = StateFeed(shepherd, launched_and_finished)
    received = Received(feed)
    with started(feed):
        eventually(lambda: feed.reread >= 1, what="the tracked task to be read", timeout=120)
        run_to_the_end(shepherd, [sentinel])
        eventually(lambda: received.terminal("sentinel"), what="the sentinel's terminal state", timeout=60)
    assert received.states["t"] == [task_pb2.TASK_STATE_SUCCEEDED], received.states
