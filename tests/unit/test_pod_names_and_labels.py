"""Pod names are DNS-safe and deterministic; labels are valid; annotations map a pod back to its task."""

from __future__ import annotations

import re

import pytest

from shepherd import podmeta
from tests.helpers import task_key

LABEL_VALUE = re.compile(r"^(|[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)$")


@pytest.mark.parametrize(
    ("dag_id", "task_id"),
    [
        ("etl", "extract"),
        ("Sales.Report_V2", "load--to__warehouse"),
        ("x" * 250, "y" * 250),
        ("___", "..."),
        ("données", "tâche"),
    ],
)
def test_pod_names_are_dns_labels_of_at_most_63_characters(dag_id: str, task_id: str) -> None:
    name = podmeta.pod_name(task_key(dag_id=dag_id, task_id=task_id))
    assert podmeta.is_dns_label(name)
    assert len(name) <= 63


def test_the_same_key_and_attempt_always_give_the_same_name() -> None:
    assert podmeta.pod_name(task_key()) == podmeta.pod_name(task_key())


@pytest.mark.parametrize(
    "other",
    [
        task_key(try_number=2),
        task_key(map_index=0),
        task_key(run_id="manual__1"),
        task_key(task_id="extract2"),
    ],
)
def test_different_keys_get_different_names(other: object) -> None:
    assert podmeta.pod_name(task_key()) != podmeta.pod_name(other)  # type: ignore[arg-type]


def test_a_relaunch_attempt_gets_a_new_name() -> None:
    assert podmeta.pod_name(task_key(), attempt=1) != podmeta.pod_name(task_key(), attempt=2)


@pytest.mark.parametrize("value", ["simple", "a.b-c_d", "A1", ""])
def test_valid_label_values_are_kept_as_they_are(value: str) -> None:
    assert podmeta.safe_label_value(value) == value


@pytest.mark.parametrize(
    "value", ["scheduled__2026-11-21T00:00:00+00:00", "-leading", "trailing.", "x" * 100, "ü", "a b", "::"]
)
def test_changed_label_values_are_valid_and_carry_a_hash(value: str) -> None:
    safe = podmeta.safe_label_value(value)
    assert LABEL_VALUE.match(safe)
    assert len(safe) <= 63
    assert safe != value


def test_two_values_that_clean_up_alike_still_get_different_labels() -> None:
    assert podmeta.safe_label_value("run:1") != podmeta.safe_label_value("run+1")


def test_labels_carry_the_executor_and_every_key_part() -> None:
    labels = podmeta.task_labels(task_key(map_index=3), "exec-a")
    assert labels[podmeta.LABEL_EXECUTOR] == "exec-a"
    assert labels[podmeta.LABEL_MAP_INDEX] == "3"
    assert labels[podmeta.LABEL_TRY_NUMBER] == "1"
    assert all(LABEL_VALUE.match(v) for v in labels.values())


def test_an_unmapped_task_has_no_map_index_label() -> None:
    assert podmeta.LABEL_MAP_INDEX not in podmeta.task_labels(task_key(map_index=-1), "e")


def test_annotations_round_trip_to_the_exact_key() -> None:
    key = task_key(run_id="manual__2026-11-21T00:00:00+00:00 with spaces", map_index=7)
    assert podmeta.key_from_annotations(podmeta.task_annotations(key, attempt=1)) == key


@pytest.mark.parametrize("missing", [podmeta.ANNOTATION_DAG_ID, podmeta.ANNOTATION_TRY_NUMBER])
def test_a_pod_without_complete_annotations_maps_to_no_task(missing: str) -> None:
    annotations = podmeta.task_annotations(task_key(), attempt=1)
    del annotations[missing]
    assert podmeta.key_from_annotations(annotations) is None


def test_the_executor_selector_excludes_pods_marked_done() -> None:
    assert (
        podmeta.executor_selector("e1")
        == "shepherd.dev/worker=true,shepherd.dev/executor-id=e1,!shepherd.dev/done"
    )
