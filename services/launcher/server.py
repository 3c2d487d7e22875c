"""LauncherService over gRPC: validation and answers here, the work in store.py and creator.py.

While the store cannot write, calls that must write are answered UNAVAILABLE (with RetryInfo) and
health is NOT_SERVING; both end by themselves once it can (see shepherd/sqlite.py, Database.watch).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from google.rpc import code_pb2
from opentelemetry import context as otel_context
from opentelemetry.trace import Span

from services.launcher import metrics as launcher_metrics
from services.launcher.admission import Admission, PolicyDenied
from services.launcher.creator import PodCreator
from services.launcher.expiry import LaunchExpiry, prune_launches
from services.launcher.metrics import LaunchOutcome
from services.launcher.policy import PodPolicy
from services.launcher.reconciler_client import ReconcilerClient
from services.launcher.settings import LauncherSettings
from services.launcher.store import Accepted, LaunchStore, stamp_cancelled
from services.launcher.templates import TemplateCatalog, UnknownTemplate
from shepherd import channels, logstream, metrics, podmeta, tracing
from shepherd.errors import MAX_FIELD_LEN, MAX_PROBLEM_LEN, abort_fields, abort_invalid, abort_unavailable
from shepherd.grpcserver import Context, GrpcServer, run
from shepherd.kube import KubeClient, load_connection
from shepherd.kube.reachability import ApiReachability
from shepherd.logging import configure, get_logger
from shepherd.readiness import Readiness
from shepherd.retention import Pruner, Retention
from shepherd.sqlite import StoreUnavailable
from shepherd.supervisor import Supervisor
from shepherd.v1 import launcher_service_pb2 as pb
from shepherd.v1 import launcher_service_pb2_grpc as pb_grpc
from shepherd.validation import InvalidField, check_key

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LauncherService"].full_name
MAX_BATCH = 1000


class QueueFull(Exception):
    """The launch queue is at its limit."""


class LauncherServicer(pb_grpc.LauncherServiceServicer):
    def __init__(
        self, settings: LauncherSettings, store: LaunchStore, creator: PodCreator, templates: TemplateCatalog
    ) -> None:
        self._settings = settings
        self._store = store
        self._creator = creator
        policy = PodPolicy.load(
            settings.pod_policy,
            worker_service_account=settings.worker_service_account,
            allowed_commands=sorted(settings.allowed_executables),
            namespaces=settings.namespaces,
            template_names=templates.names,
        )
        self._admission = Admission(
            templates, policy, executor_id=settings.executor_id, namespace=settings.namespace
        )
        self._log = get_logger(component="launch")  # one logger for the per-task lines, not one per line
        self._accepting: set[asyncio.Future[list[Accepted]]] = set()

    # ---- RPCs ---------------------------------------------------------------------------------

    async def LaunchTask(self, request: pb.LaunchTaskRequest, context: Context) -> pb.LaunchTaskResponse:
        call = CallTrace.of(context) if tracing.enabled else None
        try:
            (outcome,) = await self._launch([request], [""], call)
        except StoreUnavailable as err:
            launcher_metrics.launches[LaunchOutcome.STORE_UNAVAILABLE].inc()
            await abort_unavailable(context, str(err))
        if isinstance(outcome, PolicyDenied):
            await abort_fields(context, code_pb2.PERMISSION_DENIED, outcome.violations)
        elif isinstance(outcome, InvalidField):
            await abort_invalid(context, outcome)
        elif isinstance(outcome, UnknownTemplate):
            await context.abort(grpc.StatusCode.NOT_FOUND, str(outcome))
        elif isinstance(outcome, QueueFull):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(outcome))
        assert isinstance(outcome, pb.LaunchTaskResponse)
        return outcome

    async def BatchLaunchTasks(
        self, request: pb.BatchLaunchTasksRequest, context: Context
    ) -> pb.BatchLaunchTasksResponse:
        if not 1 <= len(request.requests) <= MAX_BATCH:
            await abort_invalid(context, InvalidField("requests", f"must hold 1 to {MAX_BATCH} launches"))

        prefixes = [f"requests[{i}]." for i in range(len(request.requests))]
        call = CallTrace.of(context) if tracing.enabled else None
        try:
            outcomes = await self._launch(request.requests, prefixes, call)
        except StoreUnavailable as err:  # the batch is stored in one transaction: none of it was
            launcher_metrics.launches[LaunchOutcome.STORE_UNAVAILABLE].inc(len(request.requests))
            await abort_unavailable(context, str(err))
        return pb.BatchLaunchTasksResponse(
            results=[
                _batch_result(outcome, prefix) for outcome, prefix in zip(outcomes, prefixes, strict=True)
            ]
        )

    async def RenderPod(self, request: pb.RenderPodRequest, context: Context) -> pb.RenderPodResponse:
        launch = request.launch
        try:
            check_key(launch.key, "launch.key", present=request.HasField("launch") and launch.HasField("key"))
            rendered = self._admission.render(launch)
        except InvalidField as err:
            await abort_invalid(context, _prefixed(err, "launch."))
        except UnknownTemplate as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        return pb.RenderPodResponse(
            pod_json=orjson.dumps(rendered.pod).decode(),
            allowed=not rendered.violations,
            violations=[
                pb.PolicyViolation(field=v.field, description=v.problem) for v in rendered.violations
            ],
            template_name=rendered.template,
        )

    async def GetLaunch(self, request: pb.GetLaunchRequest, context: Context) -> pb.GetLaunchResponse:
        launch = await self._existing(request.key, request.HasField("key"), context)
        return pb.GetLaunchResponse(launch=launch)

    async def CancelLaunch(
        self, request: pb.CancelLaunchRequest, context: Context
    ) -> pb.CancelLaunchResponse:
        launch = await self._existing(request.key, request.HasField("key"), context)
        in_flight = self._creator.cancel(request.key)
        # The update is conditional on the state and attempt read here; a relaunch committed in
        # between moves the launch to a new ACCEPTED attempt, which is read again and cancelled.
        for _ in range(3):
            if launch.state != pb.LAUNCH_STATE_ACCEPTED:
                break
            try:
                cancelled = await self._store.update(
                    stamp_cancelled(launch), only_if_state=pb.LAUNCH_STATE_ACCEPTED
                )
            except StoreUnavailable as err:
                await abort_unavailable(context, str(err))
            if cancelled is not None:
                return pb.CancelLaunchResponse(launch=cancelled, pod_created=in_flight)
            launch = self._store.get(request.key) or launch
        created = launch.state == pb.LAUNCH_STATE_CREATED or in_flight
        return pb.CancelLaunchResponse(launch=launch, pod_created=created)

    async def RelaunchTask(
        self, request: pb.RelaunchTaskRequest, context: Context
    ) -> pb.RelaunchTaskResponse:
        try:
            check_key(request.key, present=request.HasField("key"))
            if request.from_attempt < 1:
                raise InvalidField("from_attempt", f"must be >= 1 (got {request.from_attempt})")
        except InvalidField as err:
            await abort_invalid(context, err)
        try:
            launch, pod, relaunched = await self._store.relaunch(request.key, request.from_attempt)
        except LookupError as err:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
        except ValueError as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except StoreUnavailable as err:
            await abort_unavailable(context, str(err))
        if relaunched:
            if tracing.enabled and launch.traceparent:
                # The stored context, not the caller's: a relaunch belongs to the task's own trace.
                tracing.point(tracing.SpanName.RELAUNCH, launch.traceparent, _span_attributes(launch))
            self._creator.submit(launch, pod)
            get_logger(
                task_key=podmeta.log_key(request.key),
                pod=launch.pod_name,
                attempt=launch.attempt,
            ).info("relaunch accepted: the previous pod was lost before it ran")
        return pb.RelaunchTaskResponse(launch=launch, relaunched=relaunched)

    async def WatchLaunchEvents(
        self, request: pb.WatchLaunchEventsRequest, context: Context
    ) -> AsyncIterator[pb.WatchLaunchEventsResponse]:
        log = self._store.events
        after = await logstream.start_cursor(log, request, context)
        with metrics.subscribers[metrics.Stream.LAUNCH_EVENTS].track_inprogress():
            async for entries in logstream.serve_log(
                log, after, context, interval_s=self._settings.stream_interval_s
            ):
                yield pb.WatchLaunchEventsResponse(
                    events=[pb.LaunchEvent(cursor=cursor, launch=launch) for cursor, launch in entries]
                )

    # ---- the work behind LaunchTask -------------------------------------------------------------

    async def _existing(self, key: Any, present: bool, context: Context) -> pb.Launch:
        try:
            check_key(key, present=present)
        except InvalidField as err:
            await abort_invalid(context, err)
        launch = self._store.get(key)
        if launch is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "key: this task was never launched here")
        assert launch is not None
        return launch

    async def _launch(
        self, requests: Sequence[pb.LaunchTaskRequest], prefixes: Sequence[str], call: CallTrace | None
    ) -> list[Outcome]:
        """Launch each request (its errors naming fields under its prefix): one query for the keys
        already launched, and one transaction for the new ones, however many there are. With
        `call` (tracing is on), each request gets a launch span."""
        outcomes: list[Outcome | None] = [None] * len(requests)
        keys: dict[int, str] = {}
        for i, request in enumerate(requests):
            try:
                check_key(request.key, f"{prefixes[i]}key", present=request.HasField("key"))
                keys[i] = podmeta.key_string(request.key)
            except InvalidField as err:
                outcomes[i] = _prefixed(err, prefixes[i])
        existing = self._store.get_many(list(keys.values()))
        new: list[tuple[int, pb.Launch, dict[str, Any]]] = []
        for i, key in keys.items():
            if (launch := existing.get(key)) is not None:
                outcomes[i] = pb.LaunchTaskResponse(launch=launch, already_existed=True)
                continue
            try:
                pod = self._build(requests[i])
            except InvalidField as err:
                outcomes[i] = _prefixed(err, prefixes[i])
                continue
            except UnknownTemplate as err:
                outcomes[i] = err
                continue
            launch = pb.Launch(
                key=requests[i].key,
                namespace=pod["metadata"]["namespace"],
                pod_name=pod["metadata"]["name"],
                executor_id=self._settings.executor_id,
                attempt=1,
            )
            new.append((i, launch, pod))
        room = max(0, self._settings.queue_limit - self._creator.backlog)
        for i, _, _ in new[room:]:
            outcomes[i] = QueueFull(
                f"the launch queue is full ({self._settings.queue_limit} launches waiting); retry later"
            )
        new = new[:room]
        spans = [call.start(launch, pod) for _, launch, pod in new] if call is not None else []
        if new:
            # Shielded: if the call is cancelled (a client deadline) while its launches are being
            # stored, they still reach the creator. Nothing else would send them: a retry finds
            # them stored and answers already_existed.
            accepting = asyncio.get_running_loop().create_task(
                self._accept([(launch, pod) for _, launch, pod in new], spans), name="accept"
            )
            self._accepting.add(accepting)
            accepting.add_done_callback(self._accepted)
            accepted = await asyncio.shield(accepting)
            for (i, _, _), result in zip(new, accepted, strict=True):
                outcomes[i] = pb.LaunchTaskResponse(
                    launch=result.launch, already_existed=result.already_existed
                )
        assert all(outcome is not None for outcome in outcomes)
        for outcome in outcomes:
            launcher_metrics.launches[_outcome_label(outcome)].inc()  # type: ignore[arg-type]
        if call is not None:
            stored = {i for i, _, _ in new}  # their spans were ended when they were stored
            for i, outcome in enumerate(outcomes):
                if i not in stored:  # a repeat or a refusal: its span is only the call's
                    call.record(outcome)  # type: ignore[arg-type]
        return outcomes  # type: ignore[return-value]  # every slot is filled above

    def _accepted(self, task: asyncio.Future[list[Accepted]]) -> None:
        """A shielded store outlives its call, so it is held here until done; if it failed after
        its caller gave up, nobody is left to tell, and a retry of the call stores the launches
        again (nothing of a failed transaction was kept)."""
        self._accepting.discard(task)
        if not task.cancelled():
            task.exception()

    async def _accept(
        self, items: list[tuple[pb.Launch, dict[str, Any]]], spans: list[Span]
    ) -> list[Accepted]:
        """Store the launches, then hand the new ones to the pod creator; end their spans."""
        try:
            accepted = await self._store.accept(items)
        except BaseException as err:
            for span in spans:
                tracing.fail(span, str(err))
                span.end()
            raise
        for result, span in zip(accepted, spans, strict=False):  # no spans: not traced
            span.set_attribute(tracing.Attr.ALREADY_EXISTED, result.already_existed)
            span.end()
        for result in accepted:
            if not result.already_existed:
                self._creator.submit(result.launch, result.pod)
                self._log.info(
                    "launch accepted",
                    task_key=podmeta.log_key(result.launch.key),
                    pod=result.launch.pod_name,
                    namespace=result.launch.namespace,
                )
        return accepted

    def _build(self, request: pb.LaunchTaskRequest) -> dict[str, Any]:
        return self._admission.admit(request)


Outcome = pb.LaunchTaskResponse | InvalidField | UnknownTemplate | QueueFull


@dataclass(frozen=True)
class CallTrace:
    """A launch call while tracing is on: when it came in, and the caller's span from its metadata
    (W3C traceparent), which becomes the parent of each launch's span."""

    start_ns: int
    parent: otel_context.Context | None

    @classmethod
    def of(cls, context: Context) -> CallTrace:
        return cls(time.time_ns(), tracing.remote_parent(context.invocation_metadata()))

    def start(self, launch: pb.Launch, pod: dict[str, Any]) -> Span:
        """The span of a launch about to be stored. A sampled one's context goes with the launch
        (stored, streamed to the reconciler) and on its pod (for the watcher): the task's trace."""
        span = tracing.start_launch(self.parent, self.start_ns, _span_attributes(launch))
        if traceparent := tracing.traceparent(span):
            launch.traceparent = traceparent
            pod["metadata"]["annotations"][podmeta.ANNOTATION_TRACEPARENT] = traceparent
        return span

    def record(self, outcome: Outcome) -> None:
        """The span of a launch that stored nothing: a repeat of a stored one, or a refusal."""
        attributes = _span_attributes(outcome.launch) if isinstance(outcome, pb.LaunchTaskResponse) else {}
        span = tracing.start_launch(self.parent, self.start_ns, attributes)
        if isinstance(outcome, pb.LaunchTaskResponse):
            span.set_attribute(tracing.Attr.ALREADY_EXISTED, outcome.already_existed)
        else:
            tracing.fail(span, f"{_outcome_label(outcome)}: {outcome}")
        span.end()


def _span_attributes(launch: pb.Launch) -> dict[str, Any]:
    return {
        tracing.Attr.TASK_KEY: podmeta.log_key(launch.key),
        tracing.Attr.NAMESPACE: launch.namespace,
        tracing.Attr.POD: launch.pod_name,
        tracing.Attr.ATTEMPT: launch.attempt,
    }


def _outcome_label(outcome: Outcome) -> LaunchOutcome:
    if isinstance(outcome, pb.LaunchTaskResponse):
        return LaunchOutcome.ALREADY_EXISTED if outcome.already_existed else LaunchOutcome.ACCEPTED
    if isinstance(outcome, PolicyDenied):
        return LaunchOutcome.POLICY_DENIED
    if isinstance(outcome, InvalidField):
        return LaunchOutcome.INVALID
    if isinstance(outcome, UnknownTemplate):
        return LaunchOutcome.UNKNOWN_TEMPLATE
    return LaunchOutcome.QUEUE_FULL


def _prefixed(err: InvalidField, prefix: str) -> InvalidField:
    """The error with its field named from the top of the request (inside a batch: requests[i].)."""
    if isinstance(err, PolicyDenied):
        return PolicyDenied([_prefixed(v, prefix) for v in err.violations])
    return err if err.field.startswith(prefix) else InvalidField(prefix + err.field, err.problem)


def _batch_result(outcome: Outcome, prefix: str) -> pb.BatchLaunchResult:
    if isinstance(outcome, pb.LaunchTaskResponse):
        return pb.BatchLaunchResult(response=outcome)
    if isinstance(outcome, PolicyDenied):
        code, field = grpc.StatusCode.PERMISSION_DENIED, outcome.field
    elif isinstance(outcome, InvalidField):
        code, field = grpc.StatusCode.INVALID_ARGUMENT, outcome.field
    elif isinstance(outcome, UnknownTemplate):
        code, field = grpc.StatusCode.NOT_FOUND, f"{prefix}template_name"
    else:
        code, field = grpc.StatusCode.RESOURCE_EXHAUSTED, ""
    message = str(outcome)[:MAX_PROBLEM_LEN]
    return pb.BatchLaunchResult(
        error=pb.LaunchError(code=code.value[0], message=message, field=field[:MAX_FIELD_LEN])
    )


async def serve(settings: LauncherSettings) -> None:
    log = get_logger(service="launcher")
    templates = TemplateCatalog(settings.templates_dir, settings.default_template)
    store = LaunchStore(settings.store_path, synchronous=settings.store_synchronous)
    kube = KubeClient(load_connection(settings.kubeconfig), max_connections=settings.create_concurrency + 8)
    reconciler_channel = channels.aio_channel(settings.reconciler_address)
    server = GrpcServer(settings, service_names=[SERVICE_NAME])
    # Health follows the API server: SERVING once it answers, NOT_SERVING while it does not.
    api = ApiReachability(
        kube,
        on_change=lambda ok: server.set_serving(ok, condition=Readiness.API),
        probe_interval_s=settings.api_probe_interval_s,
    )
    creator = PodCreator(
        kube=kube,
        store=store,
        concurrency=settings.create_concurrency,
        queued_timeout_s=settings.task_queued_timeout_s,
        backoff_cap_s=settings.create_backoff_cap_s,
        api=api,
        reconciler=ReconcilerClient(reconciler_channel),
    )
    retention = Retention.of(settings)
    pruner = Pruner(
        store.db,
        store.events,
        "launch",
        retention,
        lambda conn, rows: prune_launches(conn, rows, time.time()),
    )
    expiry = LaunchExpiry(store, ReconcilerClient(reconciler_channel), retention)
    launcher_metrics.observe_creator(creator)
    replay = store.pending()
    for launch, pod in replay:
        creator.submit(launch, pod, replayed=True)
    pb_grpc.add_LauncherServiceServicer_to_server(
        LauncherServicer(settings, store, creator, templates), server.server
    )
    await server.start()
    await server.set_serving(False, condition=Readiness.API)  # until the first answer says
    await server.set_serving(True)
    supervisor = Supervisor(server)
    supervisor.spawn(creator.run(), name="pod-creator")
    supervisor.spawn(api.run(), name="api-reachability")
    supervisor.spawn(
        store.db.watch(lambda ok: server.set_serving(ok, condition=Readiness.STORE)), name="store-health"
    )
    supervisor.spawn(pruner.run(), name="retention")
    supervisor.spawn(expiry.run(), name="launch-expiry")
    log.info("ready", replayed=len(replay), templates=templates.names, executor_id=settings.executor_id)
    # Accepted launches not yet created stay ACCEPTED in the store and are replayed on next start.
    await supervisor.run_until_stopped(settings.shutdown_grace_s)
    await reconciler_channel.close()
    await store.close()
    await kube.close()
    log.info("stopped", stats=vars(creator.stats))
    supervisor.raise_if_failed()


def main(argv: Sequence[str] | None = None) -> None:
    settings = LauncherSettings.load(argv)
    configure("launcher", settings.log_level, json=settings.log_json)
    tracing.configure(settings, "launcher")
    run(serve(settings), settings)
