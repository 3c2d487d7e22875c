"""The Airflow feed's ordering rule, without a stream: a task's state re-read with GetTask is never
followed by an older one the stream had still to send (translate.ReadFloors), so what the
executor reports to Airflow never moves backwards."""

from __future__ import annotations

from shepherd_airflow import translate
from shepherd_airflow.v1 import task_pb2 as T  # noqa: N812


def task(task_id: str, state: int) -> T.Task:
    key = T.TaskKey(dag_id="etl", task_id=task_id, run_id="r1", try_number=1, map_index=-1)
    return T.Task(key=key, state=state)  # type: ignore[arg-type]


def test_states_rank_queued_running_terminal() -> None:
    rank = translate.state_rank
    assert rank(T.TASK_STATE_QUEUED) == rank(T.TASK_STATE_ADOPTED) < rank(T.TASK_STATE_RUNNING)
    for terminal in translate.TERMINAL_STATES:
        assert rank(T.TASK_STATE_RUNNING) < rank(terminal)
    assert rank(T.TASK_STATE_UNSPECIFIED) < rank(T.TASK_STATE_QUEUED)


def test_after_a_succeeded_read_the_streams_older_transitions_and_its_duplicate_are_dropped() -> None:
    floors = translate.ReadFloors()
    floors.read(task("a", T.TASK_STATE_SUCCEEDED))
    assert not floors.is_news(task("a", T.TASK_STATE_QUEUED))
    assert not floors.is_news(task("a", T.TASK_STATE_RUNNING))
    assert not floors.is_news(task("a", T.TASK_STATE_SUCCEEDED))  # the read's own transition
    assert len(floors) == 0  # caught up: the floor is gone


def test_after_a_running_read_the_streams_later_transitions_pass() -> None:
    floors = translate.ReadFloors()
    floors.read(task("a", T.TASK_STATE_RUNNING))
    assert not floors.is_news(task("a", T.TASK_STATE_QUEUED))
    assert floors.is_news(task("a", T.TASK_STATE_FAILED))  # the stream never sent RUNNING again
    assert len(floors) == 0
    assert floors.is_news(task("a", T.TASK_STATE_FAILED))  # no floor: everything passes


def test_floors_are_per_task_and_a_new_reread_starts_afresh() -> None:
    floors = translate.ReadFloors()
    floors.read(task("a", T.TASK_STATE_SUCCEEDED))
    assert floors.is_news(task("b", T.TASK_STATE_RUNNING))
    assert floors.is_news(task("a-other", T.TASK_STATE_QUEUED))
    # ADOPTED ranks with QUEUED but says something else: it passes a QUEUED read.
    floors.read(task("c", T.TASK_STATE_QUEUED))
    assert floors.is_news(task("c", T.TASK_STATE_ADOPTED))
    floors.clear()
    assert len(floors) == 0
    assert floors.is_news(task("a", T.TASK_STATE_RUNNING))
