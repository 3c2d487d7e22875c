"""The resumption of a try (how many times Airflow queued the same try again after it handed control
back) is part of a task's identity everywhere: the key string, the pod name, the labels and the
annotations the watcher reads back, the CLI's key syntax, validation, and the Airflow executor's
keys. Resumption 0 leaves every one of them exactly as it was before resumptions existed, so
stored tasks and running pods keep their identity."""

from __future__ import annotations

import datetime as dt

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from shepherd_airflow import translate
from shepherd_airflow.v1 import task_pb2 as airflow_pb2

from shepherd import podmeta, validation
from shepherd.v1 import task_pb2
from shepherd_cli.keys import KeySyntaxError, format_key, parse_key
from tests.helpers import task_key


def test_resumption_zero_keeps_the_key_string_and_pod_name_of_before() -> None:
    key = task_key()
    assert podmeta.key_string(key) == "\x1f".join(
        ("etl_daily", "extract", "scheduled__2026-11-21T00:00:00+00:00", "1", "-1")
    )
    # The name pods got before resumptions existed (sha256 of the key string and attempt 1).
    assert podmeta.pod_name(key) == "etl-daily-extract-78ba9ed1fa"


@pytest.mark.parametrize("resumption", [1, 2, 999_999])
def test_each_resumption_is_a_task_of_its_own(resumption: int) -> None:
    first, later = task_key(), task_key(resumption=resumption)
    assert podmeta.key_string(later) == podmeta.key_string(first) + f"\x1f{resumption}"
    assert podmeta.log_key(later).endswith(f"/1/-1/{resumption}")
    assert podmeta.pod_name(later) != podmeta.pod_name(first)
    assert podmeta.pod_name(later, attempt=2) != podmeta.pod_name(later)
    assert podmeta.is_dns_label(podmeta.pod_name(later))


def test_resumption_round_trips_through_annotations_and_shows_in_labels() -> None:
    key = task_key(map_index=3, resumption=4)
    annotations = podmeta.task_annotations(key, attempt=2)
    assert annotations[podmeta.ANNOTATION_RESUMPTION] == "4"
    assert podmeta.key_from_annotations(annotations) == key
    assert podmeta.task_labels(key, "e")[podmeta.LABEL_RESUMPTION] == "4"


def test_a_first_run_carries_no_resumption_and_old_pods_map_to_resumption_zero() -> None:
    key = task_key()
    annotations = podmeta.task_annotations(key, attempt=1)
    assert podmeta.ANNOTATION_RESUMPTION not in annotations
    assert podmeta.LABEL_RESUMPTION not in podmeta.task_labels(key, "e")
    assert podmeta.key_from_annotations(annotations) == key


@pytest.mark.parametrize("bad", ["x", "-1", "1000001", ""])
def test_a_malformed_resumption_annotation_maps_to_no_task(bad: str) -> None:
    annotations = podmeta.task_annotations(task_key(), attempt=1)
    annotations[podmeta.ANNOTATION_RESUMPTION] = bad
    assert podmeta.key_from_annotations(annotations) is None


def test_validation_bounds_the_resumption_and_names_the_field() -> None:
    validation.check_key(task_key(resumption=validation.MAX_RESUMPTION))
    with pytest.raises(validation.InvalidField) as err:
        validation.check_key(task_key(resumption=validation.MAX_RESUMPTION + 1), "requests[3].key")
    assert err.value.field == "requests[3].key.resumption"
    assert "at most 1000000" in err.value.problem


@pytest.mark.parametrize(
    ("text", "resumption"),
    [("etl/extract/r1/2/-1/5", 5), ("etl/extract/r1/2/7/1", 1), ("etl/extract/r1/2/7/0", 0)],
)
def test_the_cli_key_syntax_takes_a_resumption_after_the_map_index(text: str, resumption: int) -> None:
    key = parse_key(text)
    assert key.resumption == resumption
    assert parse_key(format_key(key)) == key


def test_the_cli_writes_a_resumption_only_when_there_is_one() -> None:
    key = task_pb2.TaskKey(dag_id="d", task_id="t", run_id="r", try_number=2, map_index=-1)
    assert format_key(key) == "d/t/r/2"
    key.resumption = 3
    assert format_key(key) == "d/t/r/2/-1/3"
    with pytest.raises(KeySyntaxError, match="resumption"):
        parse_key("d/t/r/2/-1/x")


# -- the Airflow executor's side ---------------------------------------------------------------


class Key:
    dag_id, task_id, run_id, try_number, map_index = "d", "t", "r", 2, -1


def test_the_executor_keys_a_queueing_by_its_resumption() -> None:
    assert translate.task_key(Key()).resumption == 0
    key = translate.task_key(Key(), resumption=3)
    assert key.resumption == 3
    assert translate.key_text(key) == "d/t/r/2/-1/3"
    assert translate.key_text(Key()) == "d/t/r/2/-1"
    assert translate.key_fields(key) == ("d", "t", "r", 2, -1)  # still Airflow's five fields


def _tasks(highest: int, lowest: int = 0) -> tuple[dict[int, airflow_pb2.Task], list[int]]:
    tasks = {
        r: airflow_pb2.Task(key=translate.task_key(Key(), resumption=r)) for r in range(lowest, highest + 1)
    }
    return tasks, []


@pytest.mark.parametrize("highest", [0, 1, 2, 5, 64, 1000, 4097])
def test_the_latest_resumption_is_found_in_logarithmically_many_reads(highest: int) -> None:
    tasks, asked = _tasks(highest)

    def lookup(r: int) -> airflow_pb2.Task | None:
        asked.append(r)
        return tasks.get(r)

    found = translate.latest_resumption(lookup, tasks[0])
    assert found.key.resumption == highest
    assert len(asked) <= 2 * max(1, highest).bit_length() + 2, asked


def test_the_latest_resumption_search_starts_from_a_known_one_even_when_earlier_ones_are_pruned() -> None:
    tasks, _ = _tasks(40, lowest=30)
    assert translate.latest_resumption(tasks.get, tasks[33]).key.resumption == 40


def _queued_at(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC) + dt.timedelta(seconds=seconds))
    return stamp


def test_a_task_accepted_before_the_instance_was_queued_belongs_to_an_earlier_queueing() -> None:
    queued = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
    earlier = airflow_pb2.Task(queued_time=_queued_at(-60))
    this = airflow_pb2.Task(queued_time=_queued_at(0.5))
    skewed = airflow_pb2.Task(queued_time=_queued_at(-0.5))  # clocks a little apart: still this one
    assert translate.predates(earlier, queued)
    assert not translate.predates(this, queued)
    assert not translate.predates(skewed, queued)
    assert not translate.predates(earlier, None)  # nothing to compare with: take it as this one
    assert not translate.predates(airflow_pb2.Task(), queued)
