"""OpenTelemetry traces: one trace per launch, across the three processes.

A task's life is spread over three services and the API server, so no single log shows where its
time went. The launcher starts a span for each launch it accepts (its parent: the W3C
`traceparent` in the LaunchTask call's metadata, when the caller sent one) and passes that span's
context on twice: in the stored Launch (Launch.traceparent, which WatchLaunchEvents streams to the
reconciler) and in the pod's shepherd.dev/traceparent annotation, which the watcher copies into
every PodEvent of the pod (PodEvent.traceparent). Each service then makes its spans for the task
as children of the launch span, where the work happens, so one trace id covers them all:

    shepherd.launch            launcher    LaunchTask: checked, pod built, stored
    shepherd.pod.create        launcher    the create call, retries included, until its outcome
    shepherd.launch.relaunch   launcher    a new attempt, asked for by the reconciler when the
                                           pod was lost before it ran (its create follows)
    shepherd.pod.event         watcher     each event of the pod (the first is the pod's ADDED)
    shepherd.task.transition   reconciler  each state change, from its decision to its commit
    shepherd.pod.delete        reconciler  the pod action's call (shepherd.pod.mark_done for a
                                           failed task's pod that is kept)

Off unless configured (`otlp_endpoint`, or `trace_file` for tests and debugging). Off, `enabled`
is False and every hook in the services is one test of it before anything else: no span, no
context, no allocation per launch or per event, and the SDK is not even imported. The launcher
then writes no annotation, so the other two have nothing to trace either. On, only sampled
launches carry a context, so an unsampled one costs the watcher and the reconciler nothing.

Call sites read `tracing.enabled` through the module (never `from ... import enabled`): it is set
once, by `configure`, at start-up.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterator, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import orjson
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider

OTLP_MODULE = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
OTLP_INSTALL = "pip install 'shepherd[otlp]' (opentelemetry-exporter-otlp-proto-grpc)"
TRACEPARENT = "traceparent"  # the W3C header, as gRPC metadata carries it (lower case)
TRACESTATE = "tracestate"


class SpanName(StrEnum):
    """The spans of a task's trace (see the module's docstring)."""

    LAUNCH = "shepherd.launch"
    POD_CREATE = "shepherd.pod.create"
    RELAUNCH = "shepherd.launch.relaunch"  # a new attempt of a launch whose pod was lost before it ran
    POD_EVENT = "shepherd.pod.event"
    TRANSITION = "shepherd.task.transition"
    POD_DELETE = "shepherd.pod.delete"
    POD_MARK_DONE = "shepherd.pod.mark_done"


class Attr(StrEnum):
    """Span attribute keys: Kubernetes' semantic conventions where they exist, shepherd.* else."""

    TASK_KEY = "shepherd.task.key"  # dag/task/run/try/map, as the logs show it
    NAMESPACE = "k8s.namespace.name"
    POD = "k8s.pod.name"
    POD_UID = "k8s.pod.uid"
    ATTEMPT = "shepherd.launch.attempt"
    ALREADY_EXISTED = "shepherd.launch.already_existed"
    OUTCOME = "shepherd.outcome"  # of a create or a pod action
    RETRIES = "shepherd.retries"
    EVENT_TYPE = "shepherd.pod_event.type"
    PHASE = "shepherd.pod_event.phase"
    SYNTHETIC = "shepherd.pod_event.synthetic"
    CURSOR = "shepherd.cursor"
    STATE = "shepherd.task.state"
    PREVIOUS_STATE = "shepherd.task.previous_state"
    REASON = "shepherd.task.reason"


enabled = False  # set by configure(); read as tracing.enabled
_tracer: trace.Tracer = trace.NoOpTracer()
_provider: TracerProvider | None = None
_propagator = TraceContextTextMapPropagator()
# What a hook gets while tracing is off or the task is not traced: reused, never allocated.
_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)


def check_endpoint(endpoint: str) -> str:
    """The settings' check of `otlp_endpoint` (fail fast, with the reason): an http:// (plaintext)
    or https:// URL with a host, and the exporter installed."""
    if not endpoint:
        return endpoint
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "must be an http:// (plaintext) or https:// (TLS) URL with a host, e.g. http://otel:4317"
        )
    try:
        parts.port  # noqa: B018  # raises on a port that is not a number or out of range
    except ValueError as err:
        raise ValueError(f"bad port: {err}") from None
    if importlib.util.find_spec(OTLP_MODULE) is None:
        raise ValueError(f"OTLP export needs the exporter package: {OTLP_INSTALL}")
    return endpoint


class TraceSettings(Protocol):
    """What configure() reads from a service's settings (shepherd.settings.ServiceSettings)."""

    @property
    def otlp_endpoint(self) -> str: ...
    @property
    def trace_sample_ratio(self) -> float: ...
    @property
    def trace_service_name(self) -> str: ...
    @property
    def trace_file(self) -> Path | None: ...
    @property
    def executor_id(self) -> str: ...


def configure(settings: TraceSettings, service: str) -> None:
    """Turn tracing on for this process when an exporter is configured; otherwise leave it off.
    Called once by each service's main(), before it makes any span; shepherd.grpcserver.run shuts it
    down (flushing what is buffered) when the service stops."""
    global enabled, _tracer, _provider
    shutdown()
    if not settings.otlp_endpoint and settings.trace_file is None:
        return
    # The SDK only when tracing is on: a service that does not trace never loads it.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create(
        {
            "service.name": settings.trace_service_name or f"shepherd-{service}",
            "service.namespace": "shepherd",
            "shepherd.executor_id": settings.executor_id,
        }
    )
    # By trace id, so all three services make the same choice for a trace; a caller's sampled
    # (or unsampled) traceparent decides for its launch.
    sampler = ParentBased(TraceIdRatioBased(settings.trace_sample_ratio))
    provider = TracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=False)
    if settings.otlp_endpoint:
        otlp = importlib.import_module(OTLP_MODULE)
        provider.add_span_processor(
            BatchSpanProcessor(otlp.OTLPSpanExporter(endpoint=settings.otlp_endpoint))
        )
    if settings.trace_file is not None:
        # Synchronous: a span is in the file as soon as it ends (tests read it), which costs a
        # write per span; fine for tests and debugging, not for production traffic.
        out: IO[str] = settings.trace_file.open("a", encoding="utf-8")
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=json_line)))
    _provider = provider
    _tracer = provider.get_tracer("shepherd")
    enabled = True


def shutdown() -> None:
    """Export what is still buffered and turn tracing off (at the end of a service's run)."""
    global enabled, _tracer, _provider
    provider, _provider = _provider, None
    enabled, _tracer = False, trace.NoOpTracer()
    if provider is not None:
        provider.shutdown()


def json_line(span: ReadableSpan) -> str:
    """One span as a JSON line (the trace_file's format): ids in hex as W3C writes them."""
    context = span.get_span_context()
    assert context is not None
    return (
        orjson.dumps(
            {
                "name": span.name,
                "service": span.resource.attributes.get("service.name", ""),
                "trace_id": f"{context.trace_id:032x}",
                "span_id": f"{context.span_id:016x}",
                "parent_span_id": f"{span.parent.span_id:016x}" if span.parent is not None else "",
                "start_ns": span.start_time,
                "end_ns": span.end_time,
                "status": span.status.status_code.name,
                "description": span.status.description or "",
                "attributes": {str(key): value for key, value in (span.attributes or {}).items()},
            }
        ).decode()
        + "\n"
    )


# ---- propagation ---------------------------------------------------------------------------------


def remote_parent(metadata: Sequence[tuple[str, str]] | None) -> Context | None:
    """The caller's span from a call's gRPC metadata (W3C traceparent/tracestate), if it sent one."""
    carrier = {key: value for key, value in metadata or () if key in (TRACEPARENT, TRACESTATE)}
    return _propagator.extract(carrier) if carrier else None


def traceparent(span: Span) -> str:
    """The span's context as a W3C traceparent, or "" when it is not sampled: only sampled launches
    carry a context, so the other services spend nothing on the rest."""
    context = span.get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _parent(traceparent: str) -> Context:
    return _propagator.extract({TRACEPARENT: traceparent})


# ---- making spans ----------------------------------------------------------------------------------


def start_launch(parent: Context | None, start_ns: int, attributes: Mapping[str, Any]) -> Span:
    """The root of a task's trace (under the caller's span, if any), started when the call came in."""
    return _tracer.start_span(
        SpanName.LAUNCH, context=parent, kind=SpanKind.SERVER, attributes=attributes, start_time=start_ns
    )


def start(name: SpanName, traceparent: str, attributes: Mapping[str, Any] | None = None) -> Span:
    """A span of a traced task, under its launch's span; the caller ends it. Only when `enabled`
    and `traceparent`: callers test both first."""
    return _tracer.start_span(name, context=_parent(traceparent), attributes=attributes)


def span(name: SpanName, traceparent: str) -> contextlib.AbstractContextManager[Span]:
    """`with tracing.span(...) as span:` around a piece of a task's work; an exception marks the
    span failed. A non-recording span (which takes attributes and ignores them) when tracing is off
    or the task is not traced, so the hook costs a call and two tests."""
    if not enabled or not traceparent:
        return _NO_SPAN
    return _ended(start(name, traceparent))


def point(name: SpanName, traceparent: str, attributes: Mapping[str, Any]) -> None:
    """A span for a moment (an event seen), under the task's launch span."""
    now = time.time_ns()
    _tracer.start_span(name, context=_parent(traceparent), attributes=attributes, start_time=now).end(now)


def fail(span: Span, description: str) -> None:
    span.set_status(Status(StatusCode.ERROR, description))


@contextlib.contextmanager
def _ended(span: Span) -> Iterator[Span]:
    try:
        yield span
    except BaseException as err:
        span.record_exception(err)
        fail(span, f"{type(err).__name__}: {err}")
        raise
    finally:
        span.end()
