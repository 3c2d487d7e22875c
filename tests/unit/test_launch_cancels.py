"""The launcher remembers recent cancels so that queued creates stop at once, and only recent ones:
a long-running launcher that sees millions of cancels must not keep them all."""

from __future__ import annotations

from typing import Any, cast

from services.launcher import creator
from services.launcher.creator import PodCreator
from shepherd import podmeta
from tests.helpers import task_key


def _creator() -> PodCreator:
    # Cancel bookkeeping touches neither the API nor the store.
    return PodCreator(kube=cast(Any, None), store=cast(Any, None))


def test_a_cancel_is_remembered_for_the_creates_still_queued() -> None:
    pods = _creator()
    assert pods.cancel(task_key(task_id="a")) is False  # nothing in flight for it
    assert podmeta.key_string(task_key(task_id="a")) in pods._cancelled


def test_only_the_most_recent_cancels_are_remembered(monkeypatch: Any) -> None:
    monkeypatch.setattr(creator, "_CANCELS_REMEMBERED", 3)
    pods = _creator()
    for name in ("a", "b", "c", "d"):
        pods.cancel(task_key(task_id=name))
    assert list(pods._cancelled) == [podmeta.key_string(task_key(task_id=n)) for n in ("b", "c", "d")]
