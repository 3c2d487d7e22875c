"""ReconcilerService over gRPC: queries and streams read the store; changes go through the engine.

Crash-only: a failed engine commit (the store cannot write) stops the service and its restart
replays from the committed cursors (see engine.py). A CancelTask caught in such a batch is
answered UNAVAILABLE, with RetryInfo.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc

from services.reconciler import metrics as reconciler_metrics
from services.reconciler.actions import PodActions
from services.reconciler.adoption import Adopted, adopt
from services.reconciler.collector import PostMortems
from services.reconciler.engine import SOURCE_LAUNCHER, Engine, UnknownTask
from services.reconciler.forgotten import pruned_here
from services.reconciler.launcher_calls import LauncherCalls, LauncherUnavailable
from services.reconciler.postmortem import last_lines
from services.reconciler.settings import ReconcilerSettings
from services.reconciler.statemachine import Policy, is_new_life
from services.reconciler.store import TaskStore, decode_page_token, prune_finished
from services.reconciler.streams import consume_launcher, consume_watcher, recover_launch_outcomes
from services.reconciler.sweep import sweep_finished, sweep_pending
from services.reconciler.upstream import UpstreamHealth
from shepherd import channels, logstream, metrics, podmeta, tracing
from shepherd.errors import abort_invalid, abort_unavailable
from shepherd.grpcserver import Context, GrpcServer, run
from shepherd.kube import ApiError, KubeClient, load_connection
from shepherd.logging import configure, get_logger
from shepherd.readiness import Readiness
from shepherd.retention import Pruner, Retention
from shepherd.sqlite import StoreUnavailable
from shepherd.supervisor import Supervisor
from shepherd.v1 import launcher_service_pb2, launcher_service_pb2_grpc, task_pb2
from shepherd.v1 import reconciler_service_pb2 as pb
from shepherd.v1 import reconciler_service_pb2_grpc as pb_grpc
from shepherd.validation import InvalidField, check_key, check_text

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ReconcilerService"].full_name
MAX_PAGE = 1000
MAX_DEAD_EXECUTORS = 100
MAX_TAIL_LINES = 10_000


class ReconcilerServicer(pb_grpc.ReconcilerServiceServicer):
    def __init__(
        self,
        settings: ReconcilerSettings,
        store: TaskStore,
        engine: Engine,
        launcher: LauncherCalls,
        kube: KubeClient,
        adopt: Callable[[list[str]], Awaitable[Adopted]],
    ):
        self._settings = settings
        self._store = store
        self._engine = engine
        self._launcher = launcher
        self._kube = kube
        self._adopt = adopt

    async def WatchTaskStates(
        self, request: pb.WatchTaskStatesRequest, context: Context
    ) -> AsyncIterator[pb.WatchTaskStatesResponse]:
        log = self._store.transitions
        after = await logstream.start_cursor(log, request, context)
        with metrics.subscribers[metrics.Stream.TASK_STATES].track_inprogress():
            async for entries in logstream.serve_log(
                log, after, context, interval_s=self._settings.stream_interval_s
            ):
                yield pb.WatchTaskStatesResponse(changes=[change for _, change in entries])

    async def GetTask(self, request: pb.GetTaskRequest, context: Context) -> pb.GetTaskResponse:
        try:
            check_key(request.key, present=request.HasField("key"))
        except InvalidField as err:
            await abort_invalid(context, err)
        row = self._store.get(podmeta.key_string(request.key))
        if row is None and request.stored_only:
            await context.abort(grpc.StatusCode.NOT_FOUND, "key: no task with this key is stored")
        if row is None:
            task = await self._learn(request.key, context)
        else:
            task, pod_uid = row
            # Read from the committed store: a pod the reconciler deletes was committed as seen
            # first, which is what a restarted launcher relies on when it asks before re-creating.
            task.pod_uid = pod_uid
        return pb.GetTaskResponse(task=task)

    async def ListTasks(self, request: pb.ListTasksRequest, context: Context) -> pb.ListTasksResponse:
        try:
            if not 0 <= request.page_size <= MAX_PAGE:
                raise InvalidField("page_size", f"must be between 0 and {MAX_PAGE} (got {request.page_size})")
            check_text(request.dag_id, "dag_id", max_len=250, required=False)
            try:
                after = decode_page_token(request.page_token) if request.page_token else ""
            except ValueError:
                raise InvalidField(
                    "page_token", "is malformed: pass back a next_page_token unchanged"
                ) from None
        except InvalidField as err:
            await abort_invalid(context, err)
        # Read before the page: every transition up to it is committed, so the page reflects it.
        cursor = self._store.transitions.newest()
        tasks, token = self._store.list_tasks(
            page_size=request.page_size or 100, after_key=after, state=request.state, dag_id=request.dag_id
        )
        return pb.ListTasksResponse(tasks=tasks, next_page_token=token, cursor=cursor)

    async def CancelTask(self, request: pb.CancelTaskRequest, context: Context) -> pb.CancelTaskResponse:
        try:
            check_key(request.key, present=request.HasField("key"))
            check_text(request.reason, "reason", max_len=1024, required=False)
        except InvalidField as err:
            await abort_invalid(context, err)
        try:
            task, _ = await self._engine.cancel(request.key, request.reason)
        except UnknownTask:
            await self._learn(request.key, context)
            try:
                task, _ = await self._engine.cancel(request.key, request.reason)
            except UnknownTask as err:
                await context.abort(grpc.StatusCode.NOT_FOUND, str(err))
            except StoreUnavailable as err:
                await abort_unavailable(context, str(err))
        except StoreUnavailable as err:  # its batch was not committed (the service is stopping)
            await abort_unavailable(context, str(err))
        # Keep the pod from ever being created if it does not exist yet; a pod created anyway is
        # deleted when the watcher reports it, because its task is REVOKED.
        await self._launcher.cancel(request.key)
        return pb.CancelTaskResponse(task=task)

    async def _learn(self, key: task_pb2.TaskKey, context: Context) -> task_pb2.Task:
        """A task not known here yet: the launcher may have accepted it (committed before its
        LaunchTask answered) while its event is still on the way. Ask the launcher and apply
        what it has, so whoever got that answer finds the task; only a key neither knows is
        NOT_FOUND. Not a launch whose task was pruned here (forgotten.py): learnt again, it would
        go back to QUEUED, look like a pod lost before it ran, and be relaunched."""
        # The committed cursor is read before the task is looked up again: a launch event
        # committed in between has its task stored by then.
        committed = self._store.cursor(SOURCE_LAUNCHER)
        try:
            found = await self._launcher.get_launch(key)
        except LauncherUnavailable as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"key: not known here, and {err}")
        name = podmeta.key_string(key)
        row = self._store.get(name)
        if row is not None:  # its launch event was applied meanwhile
            stored, pod_uid = row
            stored.pod_uid = pod_uid
            return stored
        if self._pruned(name, found, committed):
            await context.abort(
                grpc.StatusCode.NOT_FOUND, "key: this task ended and was pruned by the retention"
            )
        try:
            task = await self._engine.learn_launch(found.launch) if found is not None else None
        except StoreUnavailable as err:
            await abort_unavailable(context, str(err))
        if task is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "key: no task with this key")
        assert task is not None
        return task

    def _pruned(
        self, name: str, found: launcher_service_pb2.GetLaunchResponse | None, committed: int
    ) -> bool:
        """Whether the task of key `name`, not stored, was pruned here: its tombstone covers the
        launch the launcher has (or it has none), or that launch's last event was applied."""
        tombstone = self._store.tombstones([name]).get(name)
        if tombstone is not None and (
            found is None
            or not is_new_life(tombstone.task, found.launch.accept_time, pruned_at=tombstone.pruned_at)
        ):
            return True
        return found is not None and pruned_here(
            found.launch,
            found.last_event_cursor,
            committed=committed,
            gap=self._engine.gap,
            now=time.time(),
            retention_s=self._settings.retention_s,
        )

    async def AdoptTasks(self, request: pb.AdoptTasksRequest, context: Context) -> pb.AdoptTasksResponse:
        dead = list(request.dead_executor_ids)
        try:
            if not 1 <= len(dead) <= MAX_DEAD_EXECUTORS:
                raise InvalidField("dead_executor_ids", f"must list 1 to {MAX_DEAD_EXECUTORS} executor ids")
            for i, executor in enumerate(dead):
                check_text(executor, f"dead_executor_ids[{i}]", max_len=63)
                if executor == self._settings.executor_id:
                    raise InvalidField(f"dead_executor_ids[{i}]", "is this executor's own id, which is alive")
        except InvalidField as err:
            await abort_invalid(context, err)
        adopted = await self._adopt(dead)
        return pb.AdoptTasksResponse(adopted=adopted.keys, cleaned_pods=adopted.cleaned_pods)

    async def GetTaskLogs(
        self, request: pb.GetTaskLogsRequest, context: Context
    ) -> AsyncIterator[pb.GetTaskLogsResponse]:
        try:
            check_key(request.key, present=request.HasField("key"))
            if not 0 <= request.tail_lines <= MAX_TAIL_LINES:
                raise InvalidField(
                    "tail_lines", f"must be between 0 and {MAX_TAIL_LINES} (got {request.tail_lines})"
                )
        except InvalidField as err:
            await abort_invalid(context, err)
        key = podmeta.key_string(request.key)
        row = self._store.get(key)
        if row is None or not row[0].pod_name:
            await context.abort(grpc.StatusCode.NOT_FOUND, "key: no task with a pod for this key")
        assert row is not None
        task, pod_uid = row
        tail_lines = request.tail_lines or 100
        try:
            with metrics.subscribers[metrics.Stream.TASK_LOGS].track_inprogress():
                async for chunk in self._kube.pod_log(
                    task.namespace,
                    task.pod_name,
                    container=podmeta.BASE_CONTAINER,
                    tail_lines=tail_lines,
                    follow=request.follow,
                ):
                    yield pb.GetTaskLogsResponse(data=chunk)
        except ApiError as err:
            kept = self._store.kept_log(key)
            if kept is not None and kept[0] == pod_uid:
                # The pod is gone (or its kubelet): the tail kept at its clean-up is all there is,
                # and a follow ends with it, since the task has finished.
                yield pb.GetTaskLogsResponse(data=last_lines(kept[1], tail_lines))
                return
            if err.status == 404:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND, f"pod {task.pod_name} is gone, and no log tail was kept"
                )
            # The API server proxies logs from the node's kubelet; without one (kwok nodes) or with
            # the pod not started, it answers with an error that says so.
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the log of pod {task.pod_name} is not available: {err.message}",
            )


async def serve(settings: ReconcilerSettings) -> None:
    log = get_logger(service="reconciler")
    store = TaskStore(settings.store_path, synchronous=settings.store_synchronous)
    kube = KubeClient(load_connection(settings.kubeconfig), max_connections=settings.action_concurrency + 8)
    actions = PodActions(
        kube=kube,
        store=store,
        concurrency=settings.action_concurrency,
        backoff_cap_s=settings.action_retry_cap_s,
    )
    policy = Policy(
        settings.delete_worker_pods, settings.delete_worker_pods_on_failure, settings.fatal_reasons
    )
    engine = Engine(
        store=store,
        policy=policy,
        executor_id=settings.executor_id,
        on_actions=actions.submit,
        batch_size=settings.batch_size,
        pending_timeout_s=settings.pending_timeout_s,
        launch_failure_retries=settings.launch_failure_retries,
    )
    actions.post_mortems = PostMortems(
        kube=kube,
        store=store,
        on_events=engine.failure_events,
        log_lines=settings.kept_log_lines,
        log_bytes=settings.kept_log_bytes,
        logs_kept_max=settings.kept_logs_max,
        events_max=settings.failure_events_max,
        timeout_s=settings.post_mortem_timeout_s,
        concurrency=settings.post_mortem_concurrency,
    )
    actions.submit(store.pending_actions())
    launcher_channel = channels.aio_channel(settings.launcher_address)
    launcher = LauncherCalls(launcher_service_pb2_grpc.LauncherServiceStub(launcher_channel))
    engine.on_relaunch = launcher.relaunch
    launcher.on_refused = engine.relaunch_refused

    async def adopt_dead(dead: list[str]) -> Adopted:
        return await adopt(
            dead,
            kube=kube,
            engine=engine,
            actions=actions,
            policy=policy,
            executor_id=settings.executor_id,
            namespaces=settings.namespaces,
        )

    reconciler_metrics.observe(
        actions_backlog=lambda: actions.backlog,
        actions_retrying=actions.retrying,
        engine_queue=lambda: engine.queue_depth,
        active_tasks=lambda: engine.active_tasks,
    )
    server = GrpcServer(settings, service_names=[SERVICE_NAME])
    # Health follows the upstream streams too: NOT_SERVING once one is lost for too long.
    upstreams = UpstreamHealth(
        on_change=lambda ok: server.set_serving(ok, condition=Readiness.UPSTREAM),
        loss_timeout_s=settings.upstream_loss_timeout_s,
    )
    pb_grpc.add_ReconcilerServiceServicer_to_server(
        ReconcilerServicer(settings, store, engine, launcher, kube, adopt_dead), server.server
    )
    await server.start()
    supervisor = Supervisor(server)
    supervisor.spawn(engine.run(), name="engine")
    supervisor.spawn(engine.run_pending_timer(), name="pending-timer")
    supervisor.spawn(actions.run(), name="pod-actions")
    supervisor.spawn(launcher.run(), name="launcher-calls")
    supervisor.spawn(
        sweep_pending(
            kube,
            engine,
            executor_id=settings.executor_id,
            namespaces=settings.namespaces,
            timeout_s=settings.pending_timeout_s,
            interval_s=settings.pending_check_interval_s,
            batch=settings.pending_check_batch_size,
        ),
        name="pending-sweep",
    )
    supervisor.spawn(
        sweep_finished(
            kube,
            engine,
            store,
            actions,
            executor_id=settings.executor_id,
            namespaces=settings.namespaces,
            interval_s=settings.pending_check_interval_s,
            batch=settings.pending_check_batch_size,
        ),
        name="cleanup-sweep",
    )
    supervisor.spawn(consume_launcher(settings.launcher_address, engine, upstreams), name="launcher-stream")
    supervisor.spawn(consume_watcher(settings.watcher_address, engine, upstreams), name="watcher-stream")
    supervisor.spawn(recover_launch_outcomes(engine, launcher), name="launch-gap-check")
    supervisor.spawn(upstreams.run(), name="upstream-health")
    supervisor.spawn(
        store.db.watch(lambda ok: server.set_serving(ok, condition=Readiness.STORE)), name="store-health"
    )
    bounds = Retention.of(settings)
    pruner = Pruner(
        store.db, store.transitions, "change", bounds, functools.partial(prune_finished, bounds=bounds)
    )
    supervisor.spawn(pruner.run(), name="retention")

    async def mark_ready() -> None:
        # Ready means in sync: the watcher's snapshot of current pods has been applied, so no
        # state a pod passes through from now on can be missed.
        await engine.synced.wait()
        if settings.dead_executors:
            await adopt_dead(settings.dead_executors)
        await server.set_serving(True)
        log.info("ready", active_tasks=engine.active_tasks, executor_id=settings.executor_id)

    supervisor.spawn(mark_ready(), name="readiness", finishes=True)
    # Events read but not committed are not lost: their cursors were not committed either, so they
    # are read again after restart. Committed transitions are all in the store.
    await supervisor.run_until_stopped(settings.shutdown_grace_s)
    await launcher_channel.close()
    await store.close()
    await kube.close()
    log.info(
        "stopped",
        engine=vars(engine.stats),
        actions=vars(actions.refresh_stats()),
        post_mortems=vars(actions.post_mortems.stats),
    )
    supervisor.raise_if_failed()


def main(argv: Sequence[str] | None = None) -> None:
    settings = ReconcilerSettings.load(argv)
    configure("reconciler", settings.log_level, json=settings.log_json)
    tracing.configure(settings, "reconciler")
    run(serve(settings), settings)
