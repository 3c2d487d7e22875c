"""The reconciler's Prometheus metrics: transitions and time spent in each state, pod actions and
their failures, its backlogs, and its upstream streams. Definitions only; labels are enums (see
shepherd/metrics.py)."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

from prometheus_client import Counter, Gauge, Histogram

from shepherd.metrics import PREFIX, STATE_BUCKETS_S, set_function
from shepherd.v1 import task_pb2

_P = f"{PREFIX}_reconciler"


def _state_label(value: task_pb2.TaskState.ValueType) -> str:
    return task_pb2.TaskState.Name(value).removeprefix("TASK_STATE_").lower()


_STATES = [value for value in task_pb2.TaskState.values() if value != task_pb2.TASK_STATE_UNSPECIFIED]

_TRANSITIONS = Counter(f"{_P}_transitions_total", "Task state transitions, by the state entered.", ["state"])
_IN_STATE = Histogram(
    f"{_P}_state_duration_seconds",
    "Time a task spent in a state, observed when it leaves it (tasks this process saw enter it).",
    ["state"],
    buckets=STATE_BUCKETS_S,
)
# TaskState value -> child: one dict lookup per transition.
transitions = {value: _TRANSITIONS.labels(_state_label(value)) for value in _STATES}
time_in_state = {value: _IN_STATE.labels(_state_label(value)) for value in _STATES}


class Action(StrEnum):
    """What the reconciler does to a finished task's pod."""

    DELETE = "delete"
    MARK_DONE = "mark_done"  # label the pod done (kept for debugging)


class ActionOutcome(StrEnum):
    DONE = "done"
    ALREADY_GONE = "already_gone"  # the pod was not there any more: nothing left to do
    FAILED = "failed"  # the call failed; the action is asked again until it goes through


_ACTIONS = Counter(
    f"{_P}_pod_actions_total", "Pod action calls, by action and outcome.", ["action", "outcome"]
)
actions = {(a, o): _ACTIONS.labels(a.value, o.value) for a in Action for o in ActionOutcome}


class PostMortemRead(StrEnum):
    """What the reconciler reads of a finished pod (collector.py)."""

    LOG_TAIL = "log_tail"  # before its action, for a pod whose base container ran in a runtime
    EVENTS = "events"  # after its action, for a failed task's pod


class PostMortemOutcome(StrEnum):
    DONE = "done"  # kept (the tail) or read (the events)
    FAILED = "failed"  # failed or timed out: not retried, and the action went ahead
    DROPPED = "dropped"  # not read: the bounded queue of event reads was full


_POST_MORTEMS = Counter(
    f"{_P}_post_mortem_reads_total",
    "Reads of what a finished pod leaves behind, by read and outcome.",
    ["read", "outcome"],
)
post_mortems = {
    (r, o): _POST_MORTEMS.labels(r.value, o.value) for r in PostMortemRead for o in PostMortemOutcome
}


class Upstream(StrEnum):
    """The event streams the reconciler consumes."""

    LAUNCHER = "launcher"
    WATCHER = "watcher"


_CONNECTED = Gauge(
    f"{_P}_upstream_connected", "1 while the event stream from this upstream is subscribed.", ["upstream"]
)
_DOWN_SECONDS = Gauge(
    f"{_P}_upstream_down_seconds",
    "Seconds the event stream from this upstream has been lost (0 while subscribed).",
    ["upstream"],
)
_RECONNECTS = Counter(
    f"{_P}_upstream_reconnects_total", "Event streams that broke, by upstream.", ["upstream"]
)
connected = {u: _CONNECTED.labels(u.value) for u in Upstream}
down_seconds = {u: _DOWN_SECONDS.labels(u.value) for u in Upstream}
reconnects = {u: _RECONNECTS.labels(u.value) for u in Upstream}

_ACTIONS_BACKLOG = Gauge(f"{_P}_pod_actions_backlog", "Pod actions not carried out yet (queued or failing).")
_ACTIONS_RETRYING = Gauge(f"{_P}_pod_actions_retrying", "Pod actions failing now, waiting to be asked again.")
_ENGINE_QUEUE = Gauge(f"{_P}_engine_queue_depth", "Events and commands waiting for the engine.")
_ACTIVE = Gauge(f"{_P}_active_tasks", "Tasks not in a final state.")


def observe(
    *,
    actions_backlog: Callable[[], float],
    actions_retrying: Callable[[], float],
    engine_queue: Callable[[], float],
    active_tasks: Callable[[], float],
) -> None:
    """Read the reconciler's backlogs when scraped."""
    set_function(_ACTIONS_BACKLOG, actions_backlog)
    set_function(_ACTIONS_RETRYING, actions_retrying)
    set_function(_ENGINE_QUEUE, engine_queue)
    set_function(_ACTIVE, active_tasks)
