"""ShepherdExecutor: Airflow's executor interface on top of Shepherd's launcher and reconciler.

Selected with `[core] executor = shepherd_airflow.ShepherdExecutor`. It runs inside the Airflow
scheduler and keeps almost nothing there: queued task instances become one BatchLaunchTasks call
per heartbeat (Shepherd stores each durably before answering and creates the pods itself), and
one WatchTaskStates stream, followed in a background thread, feeds the event buffer. What a
scheduler restart loses is only the in-memory `running` set, which adoption rebuilds from
GetTask: the pods keep running, and none is made twice, because Shepherd's pod name and launch
are a function of the task instance key and its resumption.

Airflow queues the same task instance key (same try) again when a deferred task resumes and on
every poke of a reschedule-mode sensor. Each such queueing is a run of its own, as with the
KubernetesExecutor: the next resumption of the Shepherd task (TaskKey.resumption), with a new pod.
The executor remembers the resumption of each key it follows and reports to Airflow only the
states of that one, never a late state of an earlier run; a scheduler that never saw the earlier
runs learns the latest from Shepherd when a launch answers that it exists already.

Both executor interfaces are covered: Airflow 3 hands over ExecuteTask workloads
(`_process_workloads`), which the pod runs with the Task SDK's `execute_workload`; Airflow 2.10
hands over `airflow tasks run ...` commands (`execute_async`). Translation decisions live in
translate.py; this module is the adapter and holds the executor's bookkeeping.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from airflow.configuration import conf
from airflow.executors.base_executor import BaseExecutor
from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.utils.state import TaskInstanceState

from shepherd_airflow import translate
from shepherd_airflow.client import ShepherdClient, StateFeed
from shepherd_airflow.config import SECTION, Settings
from shepherd_airflow.translate import Event, ExecutorConfigError, Outcome
from shepherd_airflow.v1 import launcher_service_pb2, task_pb2

log = logging.getLogger(__name__)

# Refusals that say "not now" rather than "never": the launch is tried again next heartbeat.
_RETRY_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], grpc.StatusCode.UNAVAILABLE.value[0]})
# Finished keys whose last resumption is remembered, so the next queueing of one (a sensor's next
# poke) needs no read; a key forgotten costs a few GetTask calls when it comes back.
_REMEMBERED_RUNS = 10_000


def load_settings() -> Settings:
    def get(option: str) -> str | None:
        value = conf.get(SECTION, option, fallback=None)
        return None if value is None else str(value)

    return Settings.from_options(get)


class ShepherdExecutor(BaseExecutor):  # type: ignore[misc]
    """Runs each task instance as a Shepherd task (a worker pod) and reports its states."""

    supports_ad_hoc_ti_run = True
    supports_pickling = False  # Airflow 2 only; pickled DAGs were never sent to pods
    is_local = False
    serve_logs = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings: Settings | None = None
        self.client: ShepherdClient | None = None
        self.feed: StateFeed | None = None
        # Accepted from Airflow, not yet accepted by Shepherd: launched at the next sync, in order.
        self._to_launch: dict[TaskInstanceKey, launcher_service_pb2.LaunchTaskRequest] = {}
        # Refused before launching (a bad executor_config or command), reported FAILED at the next
        # sync: Airflow 2 adds the key to `running` only after execute_async returns, so failing it
        # there would leave it in `running` for good.
        self._refused: dict[TaskInstanceKey, str] = {}
        self._template_cache: dict[str, str] = {}
        # The resumption of the current queueing of each key followed (in `running` or
        # `_to_launch`): only that Shepherd task's states reach Airflow.
        self._resumptions: dict[TaskInstanceKey, int] = {}
        # The last resumption of keys reported finished, oldest first (bounded).
        self._finished_runs: OrderedDict[TaskInstanceKey, int] = OrderedDict()
        # Keys whose launch was sent without an answer (the call failed): a later "already
        # existed" is that launch, not an earlier queueing's.
        self._unsure: set[TaskInstanceKey] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.settings = load_settings()
        self.client = ShepherdClient(self.settings)
        self._start_feed()
        log.info(
            "shepherd: executor started (launcher %s, reconciler %s, parallelism %s)",
            self.settings.launcher_address,
            self.settings.reconciler_address,
            self.parallelism,
        )

    def _start_feed(self) -> None:
        assert self.client is not None
        self.feed = StateFeed(self.client, self._tracked_keys)
        self.feed.start()

    def _check_feed(self) -> None:
        """Replace a feed thread that ended without being stopped.

        The feed survives every error by itself (it logs, backs off and reconnects), so this is a
        failure beyond it, such as a bug. Like the KubernetesExecutor with a dead pod watcher
        (its scheduler's sync() makes a new watcher that lists again), the executor starts a new
        feed rather than raising: a raise would restart the whole scheduler to recover what a
        new thread recovers, and the new feed loses nothing, since it follows from the head after
        re-reading every tracked task. What the dead one had queued is applied first."""
        feed = self.feed
        if feed is None or feed.is_alive():
            return
        log.error(
            "shepherd: the state feed thread ended unexpectedly; starting a new one, which re-reads "
            "the %d tracked task(s)",
            len(self.running),
        )
        for task in feed.drain():
            self._apply(task)
        self._start_feed()

    def _tracked_keys(self) -> list[task_pb2.TaskKey]:
        # Called from the feed thread: copy first, the scheduler thread changes `running`.
        return [
            translate.task_key(k, self._resumptions.get(k, 0))
            for k in list(self.running)
            if isinstance(k, TaskInstanceKey)
        ]

    def end(self) -> None:
        """Hand over what Airflow queued, report what is known, then stop following."""
        if self.client is None:
            return
        self._launch_pending()
        self._apply_feed()
        self._shut()

    def terminate(self) -> None:
        """Stop following at once; the tasks keep running in Shepherd and are adopted later."""
        self._shut()

    def _shut(self) -> None:
        if self.feed is not None:
            self.feed.stop()
            self.feed = None
        if self.client is not None:
            self.client.close()
            self.client = None

    # -- queueing ------------------------------------------------------------------------------

    def _process_workloads(self, workloads: Sequence[Any]) -> None:
        """Airflow 3: each ExecuteTask workload is launched with its JSON as the pod's command."""
        for workload in workloads:
            ti = getattr(workload, "ti", None)
            if ti is None:
                raise ValueError(
                    f"ShepherdExecutor runs ExecuteTask workloads only, not {type(workload).__name__}"
                )
            key = ti.key
            self.queued_tasks.pop(key, None)
            self.running.add(key)
            try:
                command = translate.workload_command(workload.model_dump_json())
            except ExecutorConfigError as err:
                self._refused[key] = f"shepherd: {err}"
                continue
            self._accept(key, command, getattr(ti, "executor_config", None))

    def execute_async(
        self,
        key: TaskInstanceKey,
        command: Sequence[str],
        queue: str | None = None,
        executor_config: Mapping[str, Any] | None = None,
    ) -> None:
        """Airflow 2: the `airflow tasks run ...` command is the pod's command."""
        try:
            args = translate.legacy_command(command)
        except ExecutorConfigError as err:
            self._refused[key] = f"shepherd: {err}"
            return
        self._accept(key, args, executor_config)

    def _accept(self, key: TaskInstanceKey, command: list[str], executor_config: Any) -> None:
        assert self.settings is not None, "start() was not called"
        try:
            layers = translate.pod_layers(
                executor_config if isinstance(executor_config, Mapping) else None,
                default_template_file=self.settings.pod_template_file,
                default_template_name=self.settings.template_name,
                read_file=self._read_template,
            )
        except ExecutorConfigError as err:
            self._refused[key] = f"shepherd: invalid executor_config: {err}"
            return
        resumption = self._next_resumption(key)
        self._resumptions[key] = resumption
        self._to_launch[key] = launcher_service_pb2.LaunchTaskRequest(
            key=translate.task_key(key, resumption),
            command=command,
            template_name=layers.template_name,
            template_yaml=layers.template_yaml,
            pod_override_yaml=layers.pod_override_yaml,
        )

    def _next_resumption(self, key: TaskInstanceKey) -> int:
        """The resumption for a new queueing of `key`: the one after the run this executor last
        launched for it (whose pod may still be winding down after it handed control back), or 0
        when it knows of none. A key already waiting to be launched keeps its resumption."""
        if key in self._to_launch:
            return self._resumptions[key]
        if key in self._resumptions:
            return self._resumptions[key] + 1
        if key in self._finished_runs:
            return self._finished_runs.pop(key) + 1
        return 0

    def _forget(self, key: TaskInstanceKey, *, launched: bool = True) -> None:
        """`key` is no longer followed; remember its last launched resumption for the next queueing."""
        resumption = self._resumptions.pop(key, None)
        self._unsure.discard(key)
        if resumption is not None and not launched:
            resumption = resumption - 1 if resumption else None
        if resumption is None:
            return
        self._finished_runs[key] = resumption
        self._finished_runs.move_to_end(key)
        while len(self._finished_runs) > _REMEMBERED_RUNS:
            self._finished_runs.popitem(last=False)

    def _read_template(self, path: str) -> str:
        if path not in self._template_cache:
            self._template_cache[path] = Path(path).expanduser().read_text()
        return self._template_cache[path]

    def sync(self) -> None:
        """Once per heartbeat: launch what was queued since the last one, then apply the states
        the feed brought. Neither waits for a pod."""
        if self.client is None:
            return
        self._check_feed()
        self._launch_pending()
        self._apply_feed()

    def _launch_pending(self) -> None:
        assert self.client is not None
        assert self.settings is not None
        for key, info in list(self._refused.items()):
            del self._refused[key]
            self.fail(key, info)
        pending = list(self._to_launch.items())
        for batch in translate.batches(pending, self.settings.launch_batch_size):
            try:
                results = self.client.launch([request for _, request in batch])
            except grpc.RpcError as err:
                # Launches are idempotent per key, so the whole batch is simply sent again.
                self._unsure.update(key for key, _ in batch)
                log.warning(
                    "shepherd: BatchLaunchTasks failed (%s: %s); %d task(s) retried next heartbeat",
                    err.code().name,
                    err.details(),
                    len(pending),
                )
                return
            existing: list[TaskInstanceKey] = []
            for (key, request), result in zip(batch, results, strict=True):
                if result.HasField("error"):
                    if result.error.code in _RETRY_CODES:
                        continue  # stays in _to_launch
                    del self._to_launch[key]
                    self._forget(key, launched=False)
                    field = f" ({result.error.field})" if result.error.field else ""
                    self.fail(key, f"shepherd refused the launch: {result.error.message}{field}")
                    continue
                if not result.response.already_existed:
                    del self._to_launch[key]
                    self._unsure.discard(key)
                elif key in self._unsure:
                    del self._to_launch[key]  # our own earlier send went through
                    self._unsure.discard(key)
                    existing.append(key)
                else:
                    self._skip_earlier_runs(key, request)  # stays in _to_launch
            self._catch_up(existing)

    def _skip_earlier_runs(
        self, key: TaskInstanceKey, request: launcher_service_pb2.LaunchTaskRequest
    ) -> None:
        """Shepherd already has this resumption of a key Airflow has just queued, and not from a
        send of ours: it is an earlier queueing's run (this scheduler started after it), which
        ended or is winding down after handing control back. The launch moves to the resumption
        after the latest Shepherd has, and goes out at the next heartbeat."""
        assert self.client is not None
        client = self.client

        def lookup(resumption: int) -> task_pb2.Task | None:
            return client.get(translate.task_key(key, resumption))

        try:
            known = lookup(request.key.resumption) or task_pb2.Task(key=request.key)
            latest = translate.latest_resumption(lookup, known)
        except grpc.RpcError as err:
            log.warning("shepherd: GetTask %s failed: %s", translate.key_text(key), err.details())
            return  # asked again at the next heartbeat
        resumption = latest.key.resumption + 1
        if resumption > translate.MAX_RESUMPTION:
            del self._to_launch[key]
            self._forget(key, launched=False)
            self.fail(
                key,
                f"shepherd: {translate.key_text(key)} was queued more than {translate.MAX_RESUMPTION} times",
            )
            return
        log.info(
            "shepherd: %s queued again after %s ran; launching resumption %d",
            translate.key_text(key),
            translate.key_text(latest.key),
            resumption,
        )
        self._resumptions[key] = resumption
        request.key.resumption = resumption

    def _catch_up(self, keys: Sequence[TaskInstanceKey]) -> None:
        """A key Shepherd already had may have moved on before the feed started: read it once."""
        assert self.client is not None
        for key in keys:
            try:
                task = self.client.get(translate.task_key(key, self._resumptions.get(key, 0)))
            except grpc.RpcError as err:
                log.warning("shepherd: GetTask %s failed: %s", translate.key_text(key), err.details())
                continue
            if task is not None:
                self._apply(task)

    # -- states --------------------------------------------------------------------------------

    def _apply_feed(self) -> None:
        if self.feed is None:
            return
        for task in self.feed.drain():
            self._apply(task)

    def _apply(self, task: task_pb2.Task) -> None:
        event = translate.event_for(task)
        if event is None:
            return
        key = TaskInstanceKey(*event.key)
        if key not in self.running:
            return  # not ours (another scheduler's, or already reported)
        if task.key.resumption != self._resumptions.get(key, 0):
            return  # an earlier queueing's run, ending after Airflow queued the try again
        self._report(key, event)
        if event.terminal:
            self._forget(key)

    def _report(self, key: TaskInstanceKey, event: Event) -> None:
        if event.outcome is Outcome.RUNNING:
            self.running_state(key, event.info)
        elif event.outcome is Outcome.SUCCESS:
            self.success(key, event.info)
        elif event.outcome is Outcome.FAILED:
            self.fail(key, event.info)
        else:
            self._requeue(key, event.info)

    def _requeue(self, key: TaskInstanceKey, info: str) -> None:
        """The try never ran its code (its pod was lost before it started, past Shepherd's own
        relaunches). Airflow gets the instance back without losing a retry: as for a task cleared
        while it ran, the instance is set to no state with one more try allowed, so the scheduler
        schedules it again under the next try number, which is a new Shepherd task. Only an
        instance still QUEUED under this try is touched; otherwise (or without a database)
        the try is reported FAILED with the reason, so nothing hangs."""
        self.running.discard(key)
        try:
            if _reset_for_another_try(key, info):
                log.warning(
                    "shepherd: %s requeued without spending a retry: %s", translate.key_text(key), info
                )
                return
        except Exception:  # the database is Airflow's; any failure there falls back to FAILED
            log.exception("shepherd: could not requeue %s", translate.key_text(key))
        self.event_buffer[key] = (TaskInstanceState.FAILED, info)

    # -- the rest of the interface -------------------------------------------------------------

    def try_adopt_task_instances(self, tis: Sequence[Any]) -> Sequence[Any]:
        """Re-attach task instances a dead scheduler queued: those Shepherd has are tracked again
        (their pods are not touched, let alone relaunched); the rest go back to Airflow to reset.

        An instance is attached to the latest resumption Shepherd has of its try, unless Shepherd
        accepted that one before the instance was last queued: then the dead scheduler never
        launched the current queueing (a resumed try), and the instance goes back to be reset
        rather than be told an earlier run's outcome."""
        assert self.client is not None
        not_adopted = []
        for ti in tis:
            key = ti.key
            # Tracked before it is read: a feed (re)subscribing meanwhile re-reads it, so no
            # transition between this read and the feed's subscription is missed.
            self.running.add(key)
            try:
                task = _latest_run(self.client, translate.task_key(key))
            except grpc.RpcError as err:
                log.warning("shepherd: cannot adopt %s: %s", translate.key_text(key), err.details())
                task = None
            if task is None or translate.predates(task, getattr(ti, "queued_dttm", None)):
                self.running.discard(key)
                not_adopted.append(ti)
                continue
            self._resumptions[key] = task.key.resumption
            self._apply(task)
        return not_adopted

    def revoke_task(self, *, ti: Any) -> None:
        """Cancel the Shepherd task (its pod is deleted, or never created) and forget it. No
        event, as Airflow asks; errors are logged, never raised."""
        key = ti.key
        self.queued_tasks.pop(key, None)
        self.running.discard(key)
        request = self._to_launch.pop(key, None)
        shepherd_key = translate.task_key(key, self._resumptions.get(key, 0))
        self._forget(key, launched=request is None or key in self._unsure)
        if self.client is None:
            return
        try:
            self.client.cancel(shepherd_key, "revoked by the Airflow scheduler")
        except grpc.RpcError as err:
            if request is None:
                log.warning("shepherd: CancelTask %s failed: %s", translate.key_text(key), err.details())

    def cleanup_stuck_queued_tasks(self, tis: Sequence[Any]) -> list[str]:
        """Airflow 2.10 (and 3's fallback): revoke each stuck instance and report it failed."""
        readable = []
        for ti in tis:
            self.revoke_task(ti=ti)
            self.event_buffer[ti.key] = (
                TaskInstanceState.FAILED,
                "shepherd: stuck in queued past [scheduler] task_queued_timeout; cancelled",
            )
            readable.append(repr(ti))
        return readable

    def get_task_log(self, ti: Any, try_number: int) -> tuple[list[str], list[str]]:
        """The tail of the `base` container log of the try's latest run (resumption), through
        GetTaskLogs.

        Airflow's API server (its webserver in 2.10) calls this on an executor it made only to
        read logs and never started, so such a call opens a client of its own for the one read.
        """
        key = translate.task_key(ti.key)
        key.try_number = int(try_number)
        client = self.client
        try:
            if client is None:
                client = ShepherdClient(load_settings())
            latest = _latest_run(client, key)
            if latest is not None:
                key = latest.key
            text = client.log_tail(key)
        except grpc.RpcError as err:
            return [f"shepherd: no log for {translate.key_text(key)}: {err.details()}"], []
        except ValueError as err:  # the settings (SettingsError) or the credential files
            return [f"shepherd: cannot read logs: {err}"], []
        finally:
            if client is not None and client is not self.client:
                client.close()
        return [f"shepherd: log of {translate.key_text(key)} via GetTaskLogs"], [text]


def _latest_run(client: ShepherdClient, key: task_pb2.TaskKey) -> task_pb2.Task | None:
    """The latest resumption Shepherd has of `key`'s try, found from its first run; None when
    Shepherd does not have the first run."""

    def lookup(resumption: int) -> task_pb2.Task | None:
        probe = task_pb2.TaskKey()
        probe.CopyFrom(key)
        probe.resumption = resumption
        return client.get(probe)

    first = lookup(0)
    return None if first is None else translate.latest_resumption(lookup, first)


def _reset_for_another_try(key: TaskInstanceKey, info: str) -> bool:
    """In Airflow's database: the instance back to no state with one more try allowed, if it is
    still QUEUED under `key`'s try. True when done."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        ti = session.scalar(
            select(TaskInstance).where(
                TaskInstance.dag_id == key.dag_id,
                TaskInstance.task_id == key.task_id,
                TaskInstance.run_id == key.run_id,
                TaskInstance.map_index == key.map_index,
            )
        )
        if ti is None or ti.try_number != key.try_number or ti.state != TaskInstanceState.QUEUED:
            return False
        ti.max_tries = (ti.max_tries or 0) + 1
        ti.state = None
        ti.external_executor_id = None
        log.info("shepherd: %s: %s", translate.key_text(key), info)
    return True
