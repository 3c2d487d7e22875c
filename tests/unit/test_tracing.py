"""Tracing's own rules, without a cluster: settings that fail fast, nothing at all while it is off,
the caller's traceparent as the launch's parent and its sampling decision kept, the pod's
annotation read into its events, the reconciler's spans under the launch's, and OTLP export to a
collector (a fake one on loopback, speaking the real OTLP/gRPC service)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from pydantic import ValidationError

from services.reconciler.engine import Engine, LaunchItem, PodItem
from services.reconciler.statemachine import Policy
from services.reconciler.store import PodActionRow, TaskStore
from services.watcher.settings import WatcherSettings
from shepherd import podevents, podmeta, tracing
from shepherd.tracing import SpanName
from shepherd.v1 import launcher_service_pb2, task_pb2
from tests.helpers import task_key
from tests.helpers.pods import container, pod_event

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@dataclass(frozen=True)
class Settings:
    """What tracing.configure reads (shepherd.tracing.TraceSettings)."""

    otlp_endpoint: str = ""
    trace_sample_ratio: float = 1.0
    trace_service_name: str = ""
    trace_file: Path | None = None
    executor_id: str = "e"


@pytest.fixture
def spans_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "spans.jsonl"
    tracing.configure(Settings(trace_file=path), "test")
    yield path
    tracing.shutdown()


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _caller(sampled: bool = True) -> list[tuple[str, str]]:
    flags = "01" if sampled else "00"
    return [("x-request-id", "r1"), (tracing.TRACEPARENT, f"00-{CALLER_TRACE}-{CALLER_SPAN}-{flags}")]


@pytest.mark.parametrize(
    "endpoint", ["otel:4317", "grpc://otel:4317", "http://", "http://otel:port", "https://otel:70000"]
)
def test_a_bad_otlp_endpoint_stops_the_service_at_start(endpoint: str) -> None:
    with pytest.raises(ValidationError, match="otlp_endpoint"):
        WatcherSettings.load(["--otlp-endpoint", endpoint])


def test_otlp_without_its_exporter_installed_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValidationError, match=r"otlp_endpoint[\s\S]*shepherd\[otlp\]"):
        WatcherSettings.load(["--otlp-endpoint", "http://otel:4317"])


def test_the_trace_settings_have_checked_defaults() -> None:
    settings = WatcherSettings.load(
        ["--otlp-endpoint", "https://otel.example:4317", "--trace-sample-ratio", "0.25"]
    )
    assert (settings.otlp_endpoint, settings.trace_sample_ratio) == ("https://otel.example:4317", 0.25)
    assert WatcherSettings.load([]).otlp_endpoint == ""  # off by default
    with pytest.raises(ValidationError, match="trace_sample_ratio"):
        WatcherSettings.load(["--trace-sample-ratio", "1.5"])


def test_off_every_hook_hands_out_one_shared_no_op() -> None:
    tracing.configure(Settings(), "test")
    assert not tracing.enabled
    traced = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    first = tracing.span(SpanName.POD_CREATE, traced)
    assert first is tracing.span(SpanName.POD_DELETE, "")  # nothing allocated per call
    with first as span:
        assert not span.is_recording()


def test_the_callers_traceparent_is_the_launch_spans_parent(spans_file: Path) -> None:
    span = tracing.start_launch(tracing.remote_parent(_caller()), time.time_ns(), {tracing.Attr.POD: "p"})
    handed_on = tracing.traceparent(span)
    span.end()
    (line,) = _read(spans_file)
    assert (line["name"], line["trace_id"], line["parent_span_id"]) == (
        SpanName.LAUNCH,
        CALLER_TRACE,
        CALLER_SPAN,
    )
    assert line["service"] == "shepherd-test"
    assert handed_on == f"00-{CALLER_TRACE}-{line['span_id']}-01"

    with tracing.span(SpanName.POD_CREATE, handed_on) as child:
        child.set_attribute(tracing.Attr.OUTCOME, "created")
    with pytest.raises(RuntimeError), tracing.span(SpanName.POD_DELETE, handed_on):
        raise RuntimeError("refused")
    created, refused = _read(spans_file)[1:]
    assert created["parent_span_id"] == refused["parent_span_id"] == line["span_id"]
    assert created["attributes"] == {tracing.Attr.OUTCOME: "created"}
    assert (refused["status"], refused["description"]) == ("ERROR", "RuntimeError: refused")


def test_an_unsampled_caller_or_a_zero_ratio_hands_nothing_on(spans_file: Path, tmp_path: Path) -> None:
    span = tracing.start_launch(tracing.remote_parent(_caller(sampled=False)), time.time_ns(), {})
    assert tracing.traceparent(span) == ""
    span.end()
    assert _read(spans_file) == []

    tracing.configure(Settings(trace_file=tmp_path / "none.jsonl", trace_sample_ratio=0.0), "test")
    span = tracing.start_launch(None, time.time_ns(), {})
    assert tracing.traceparent(span) == ""
    span.end()
    assert _read(tmp_path / "none.jsonl") == []


def test_a_pods_events_carry_its_launchs_context() -> None:
    traced = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    annotations = {**podmeta.task_annotations(task_key(), 1), podmeta.ANNOTATION_TRACEPARENT: traced}
    pod = {"metadata": {"name": "p", "uid": "u", "annotations": annotations}, "status": {"phase": "Pending"}}
    assert podevents.pod_event("ADDED", pod).traceparent == traced
    annotations[podmeta.ANNOTATION_TRACEPARENT] = "x" * (podmeta.MAX_TRACEPARENT + 1)  # hand-edited
    assert podevents.pod_event("MODIFIED", pod).traceparent == ""
    del annotations[podmeta.ANNOTATION_TRACEPARENT]
    assert podevents.pod_event("MODIFIED", pod).traceparent == ""


async def test_the_reconcilers_spans_hang_under_the_launch(spans_file: Path, tmp_path: Path) -> None:
    launch_span = tracing.start_launch(tracing.remote_parent(_caller()), time.time_ns(), {})
    traced = tracing.traceparent(launch_span)
    launch_span.end()
    key = task_key(task_id="traced")
    actions: list[PodActionRow] = []
    store = TaskStore(tmp_path / "r.db", synchronous="OFF")
    engine = Engine(store=store, policy=Policy(), executor_id="e", on_actions=actions.extend)
    runner = asyncio.create_task(engine.run())
    try:
        launch = launcher_service_pb2.Launch(
            state=launcher_service_pb2.LAUNCH_STATE_ACCEPTED,
            namespace="shepherd",
            pod_name=podmeta.pod_name(key),
            attempt=1,
            traceparent=traced,
        )
        launch.key.CopyFrom(key)
        await engine.submit(LaunchItem(1, launch))
        # The pod's events carry the context too; the launch event alone must be enough.
        done = container(phase=task_pb2.CONTAINER_PHASE_TERMINATED, reason="Completed")
        for event in (pod_event(key, "Running"), pod_event(key, "Succeeded", containers=[done])):
            await engine.submit(PodItem(event))
        await asyncio.sleep(0)
        await engine.idle()
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await store.close()
    transitions = [line for line in _read(spans_file) if line["name"] == SpanName.TRANSITION]
    assert [line["attributes"][tracing.Attr.STATE] for line in transitions] == [
        "TASK_STATE_QUEUED",
        "TASK_STATE_RUNNING",
        "TASK_STATE_SUCCEEDED",
    ]
    assert {(line["trace_id"], line["parent_span_id"]) for line in transitions} == {
        (CALLER_TRACE, traced.split("-")[2])
    }
    (delete,) = actions
    assert delete.traceparent == traced  # the pod action's span joins the trace too


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(  # noqa: N802  # the OTLP service's method
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_are_exported_by_otlp_when_an_endpoint_is_set() -> None:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)  # type: ignore[no-untyped-call]  # generated without types
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        tracing.configure(
            Settings(otlp_endpoint=f"http://127.0.0.1:{port}", trace_service_name="shepherd-otlp-test"),
            "test",
        )
        span = tracing.start_launch(tracing.remote_parent(_caller()), time.time_ns(), {tracing.Attr.POD: "p"})
        span.end()
        tracing.shutdown()  # flushes the batch
    finally:
        server.stop(grace=None)
    exported = [
        (resource.resource, s)
        for request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for s in scope.spans
    ]
    ((resource, otlp_span),) = exported
    assert otlp_span.name == SpanName.LAUNCH
    assert (otlp_span.trace_id.hex(), otlp_span.parent_span_id.hex()) == (CALLER_TRACE, CALLER_SPAN)
    names = {a.key: a.value.string_value for a in resource.attributes}
    assert names["service.name"] == "shepherd-otlp-test"
    assert names["shepherd.executor_id"] == "e"
