"""One trace per task across the three processes: the launcher, the watcher and the reconciler each
write their spans to a file of their own (the test-only `--trace-file`), and the spans of one task
must share the trace id of the caller's traceparent and hang under its launch span: accept, the
pod's create, every pod event from the first, every transition the scheduler saw, and the pod's
delete (or, for a failed task's kept pod, its mark-done). A caller that sends an unsampled
traceparent gets no spans anywhere, and its launch and pod carry no context."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from controlplane import ClusterInfo
from controlplane.stack import SERVICES, ServiceStack
from shepherd import tracing
from shepherd.tracing import SpanName
from shepherd.v1 import launcher_service_pb2 as lpb
from shepherd.v1 import task_pb2
from tests.helpers import core_api, task_key, unique_name
from tests.helpers.eventually import eventually_async
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
S = task_pb2
RUN_TIME = "sim.shepherd.dev/run-time: '500ms'"


@dataclass(frozen=True)
class Span:
    """A line of a service's trace file (shepherd.tracing.json_line)."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    status: str
    description: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class Caller:
    """The scheduler's own span, sent as the LaunchTask call's traceparent."""

    trace_id: str
    span_id: str
    sampled: bool = True

    @classmethod
    def new(cls, *, sampled: bool = True) -> Caller:
        return cls(secrets.token_hex(16), secrets.token_hex(8), sampled)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        flags = "01" if self.sampled else "00"
        return ((tracing.TRACEPARENT, f"00-{self.trace_id}-{self.span_id}-{flags}"),)


@pytest.fixture(scope="module")
def traced_stack(cluster: ClusterInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    """A stack whose three services trace every launch into a file each."""
    workdir = tmp_path_factory.mktemp("tracing")
    stack = ServiceStack(
        cluster,
        workdir,
        executor_id=f"trace-{uuid.uuid4().hex[:8]}",
        flags={name: ["--trace-file", str(workdir / f"{name}.spans.jsonl")] for name in SERVICES},
    )
    stack.start()
    yield stack
    stack.stop_all()


def _spans(stack: ServiceStack) -> list[Span]:
    spans = []
    for name in SERVICES:
        path = Path(stack.workdir) / f"{name}.spans.jsonl"
        if path.exists():
            *lines, _ = path.read_text().split("\n")  # the last: "" or a line still being written
            spans += [Span(**json.loads(line)) for line in lines]
    return spans


def _of(stack: ServiceStack, trace_id: str) -> list[Span]:
    return sorted((s for s in _spans(stack) if s.trace_id == trace_id), key=lambda s: s.start_ns)


async def _launch(
    client: SchedulerClient, key: task_pb2.TaskKey, caller: Caller, annotations: str
) -> lpb.LaunchTaskResponse:
    response: lpb.LaunchTaskResponse = await client.launcher.LaunchTask(
        lpb.LaunchTaskRequest(
            key=key, command=["run-task"], pod_override_yaml=f"metadata: {{annotations: {{{annotations}}}}}"
        ),
        metadata=caller.metadata,
        timeout=30,
    )
    return response


async def _trace_until(stack: ServiceStack, caller: Caller, last: SpanName) -> list[Span]:
    """The task's spans once its pod action's span (the last of a task's trace) is written."""

    async def done() -> list[Span] | None:
        spans = _of(stack, caller.trace_id)
        events = [s for s in spans if s.name == SpanName.POD_EVENT]
        gone = events and events[-1].attributes[tracing.Attr.EVENT_TYPE] == "POD_EVENT_TYPE_DELETED"
        return spans if gone and any(s.name == last for s in spans) else None

    return await eventually_async(done, what=f"the {last} span and the pod's DELETED event's span")


def _check_tree(
    spans: list[Span], caller: Caller, launch: lpb.Launch, states: list[int], action: SpanName
) -> None:
    by_name: dict[str, list[Span]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    assert {s.service for s in spans} == {f"shepherd-{name}" for name in SERVICES}

    (root,) = by_name[SpanName.LAUNCH]
    assert root.service == "shepherd-launcher"
    assert root.parent_span_id == caller.span_id, "the caller's traceparent is the launch span's parent"
    assert root.attributes[tracing.Attr.ALREADY_EXISTED] is False
    # The context stored with the launch (and so written on its pod) is the launch span's.
    assert launch.traceparent == f"00-{caller.trace_id}-{root.span_id}-01"
    for span in spans:
        if span is not root:
            assert span.parent_span_id == root.span_id, f"{span.name} of {span.service} is under the launch"

    (create,) = by_name[SpanName.POD_CREATE]
    assert create.service == "shepherd-launcher"
    assert create.attributes[tracing.Attr.OUTCOME] == "created"
    assert create.start_ns >= root.start_ns

    events = by_name[SpanName.POD_EVENT]
    assert {s.service for s in events} == {"shepherd-watcher"}
    assert events[0].attributes[tracing.Attr.EVENT_TYPE] == "POD_EVENT_TYPE_ADDED"  # the first watch event
    assert events[0].start_ns >= create.start_ns
    assert {s.attributes[tracing.Attr.POD] for s in events} == {launch.pod_name}

    transitions = by_name[SpanName.TRANSITION]
    assert {s.service for s in transitions} == {"shepherd-reconciler"}
    # Each transition the scheduler saw, once, in order.
    assert [S.TaskState.Value(s.attributes[tracing.Attr.STATE]) for s in transitions] == states
    assert all(s.status == "UNSET" for s in transitions)

    (acted,) = by_name[action]
    assert acted.service == "shepherd-reconciler"
    assert acted.attributes[tracing.Attr.OUTCOME] == "done"
    assert acted.start_ns >= transitions[-1].start_ns
    assert set(by_name) == {
        SpanName.LAUNCH,
        SpanName.POD_CREATE,
        SpanName.POD_EVENT,
        SpanName.TRANSITION,
        action,
    }


async def test_one_trace_covers_each_task_across_the_three_services(traced_stack: ServiceStack) -> None:
    stack = traced_stack
    run = unique_name("trace")
    ok, bad = (
        task_key(dag_id="tracing", task_id="ok", run_id=run),
        task_key(dag_id="tracing", task_id="bad", run_id=run),
    )
    ok_caller, bad_caller = Caller.new(), Caller.new()
    async with SchedulerClient.connect(stack) as client:
        ok_launch = (await _launch(client, ok, ok_caller, RUN_TIME)).launch
        bad_launch = (
            await _launch(client, bad, bad_caller, f"{RUN_TIME}, sim.shepherd.dev/outcome: fail")
        ).launch
        assert (await client.final(ok)).state == S.TASK_STATE_SUCCEEDED
        assert (await client.final(bad)).state == S.TASK_STATE_FAILED
        # The reconciler deletes a succeeded task's pod and keeps a failed one's, marked done.
        ok_spans = await _trace_until(stack, ok_caller, SpanName.POD_DELETE)
        bad_spans = await _trace_until(stack, bad_caller, SpanName.POD_MARK_DONE)
        _check_tree(ok_spans, ok_caller, ok_launch, client.states(ok), SpanName.POD_DELETE)
        _check_tree(bad_spans, bad_caller, bad_launch, client.states(bad), SpanName.POD_MARK_DONE)

        # A repeated launch is answered from the store: a span of the caller's trace, and nothing else.
        again_caller = Caller.new()
        again = await _launch(client, ok, again_caller, RUN_TIME)
        assert again.already_existed
        assert again.launch.traceparent == ok_launch.traceparent
        (repeat,) = _of(stack, again_caller.trace_id)
        assert (repeat.name, repeat.parent_span_id) == (SpanName.LAUNCH, again_caller.span_id)
        assert repeat.attributes[tracing.Attr.ALREADY_EXISTED] is True


async def test_an_unsampled_caller_gets_no_spans_anywhere(
    traced_stack: ServiceStack, cluster: ClusterInfo
) -> None:
    stack = traced_stack
    run = unique_name("untraced")
    quiet, sentinel = (
        task_key(dag_id="tracing", task_id="quiet", run_id=run),
        task_key(dag_id="tracing", task_id="sentinel", run_id=run),
    )
    quiet_caller, sentinel_caller = Caller.new(sampled=False), Caller.new()
    api = core_api(cluster.admin_kubeconfig)
    async with SchedulerClient.connect(stack) as client:
        launch = (await _launch(client, quiet, quiet_caller, RUN_TIME)).launch
        assert launch.traceparent == ""  # nothing to hand on: the pod gets no annotation either
        assert (await client.final(quiet)).state == S.TASK_STATE_SUCCEEDED

        async def pod_gone() -> bool:
            try:
                await asyncio.to_thread(api.read_namespaced_pod, launch.pod_name, launch.namespace)
            except ApiException as err:
                return bool(err.status == 404)
            return False

        await eventually_async(pod_gone, what="the quiet task's pod deleted")
        # Barrier: the sentinel's pod is made after the quiet one is gone, so by the time its own
        # delete and DELETED event are traced, anything the quiet task could make was written.
        await _launch(client, sentinel, sentinel_caller, RUN_TIME)
        assert (await client.final(sentinel)).state == S.TASK_STATE_SUCCEEDED
        await _trace_until(stack, sentinel_caller, SpanName.POD_DELETE)
    assert _of(stack, quiet_caller.trace_id) == []
    quiet_pod = [s for s in _spans(stack) if s.attributes.get(tracing.Attr.POD) == launch.pod_name]
    assert quiet_pod == []


async def test_a_relaunch_stays_in_its_tasks_trace(traced_stack: ServiceStack, cluster: ClusterInfo) -> None:
    """A pod lost before it ran is relaunched by the launcher at the reconciler's request: the
    relaunch and the second pod's create are spans of the task's trace, under its launch span."""
    stack = traced_stack
    key = task_key(dag_id="tracing", task_id="relaunched", run_id=unique_name("trace"))
    caller = Caller.new()
    api = core_api(cluster.admin_kubeconfig)
    async with SchedulerClient.connect(stack) as client:
        launch = (await _launch(client, key, caller, "sim.shepherd.dev/start-delay: '3s'")).launch
        await client.reached(key, S.TASK_STATE_QUEUED)

        async def first_pod_exists() -> bool:
            pods = await asyncio.to_thread(
                api.list_namespaced_pod, launch.namespace, field_selector=f"metadata.name={launch.pod_name}"
            )
            return bool(pods.items)

        await eventually_async(first_pod_exists, what="the first attempt's pod")
        await asyncio.to_thread(api.delete_namespaced_pod, launch.pod_name, launch.namespace)
        task = await client.final(key)
        assert (task.state, task.launch_attempts) == (S.TASK_STATE_SUCCEEDED, 2)
        spans = await _trace_until(stack, caller, SpanName.POD_DELETE)

    (root,) = [s for s in spans if s.name == SpanName.LAUNCH]
    (relaunch,) = [s for s in spans if s.name == SpanName.RELAUNCH]
    assert relaunch.service == "shepherd-launcher"
    assert relaunch.parent_span_id == root.span_id
    assert relaunch.attributes[tracing.Attr.ATTEMPT] == 2
    creates = sorted((s for s in spans if s.name == SpanName.POD_CREATE), key=lambda s: s.start_ns)
    assert [s.attributes[tracing.Attr.POD] for s in creates] == [launch.pod_name, task.pod_name]
    assert creates[1].start_ns >= relaunch.start_ns
