"""The Reconciler's settings (on top of the shared ones)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.reconciler.statemachine import DEFAULT_FATAL_REASONS
from shepherd.settings import StoreSettings, state_dir


class ReconcilerSettings(StoreSettings):
    """Settings of the Reconciler."""

    port: int = Field(default=50053, ge=0, le=65535, description="gRPC port; 0 picks a free one.")

    launcher_address: str = Field(default="127.0.0.1:50051", description="host:port of the Launcher.")
    watcher_address: str = Field(default="127.0.0.1:50052", description="host:port of the Watcher.")
    upstream_loss_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=24 * 3600,
        description="Health is NOT_SERVING while the event stream from the launcher or the watcher has been "
        "lost for longer than this (states would stop moving), and SERVING again by itself once both are "
        'back; shepherd_health_condition_unmet{condition="upstream"} and '
        "shepherd_reconciler_upstream_connected say so.",
    )
    store_path: Path = Field(
        default_factory=lambda: state_dir() / "reconciler.db",
        description="SQLite file holding tasks and transitions; put it on a persistent volume.",
    )
    delete_worker_pods: bool = Field(
        default=True, description="Delete a worker pod once its task finished (else only mark it done)."
    )
    delete_worker_pods_on_failure: bool = Field(
        default=False,
        description="Also delete pods of failed tasks (else keep them, marked done, for debugging).",
    )
    fatal_container_reasons: str = Field(
        default=",".join(sorted(DEFAULT_FATAL_REASONS)),
        description="Comma-separated waiting reasons that fail a Pending pod's task at once.",
    )
    pending_timeout_s: float = Field(
        default=300.0,
        ge=1,
        le=7 * 24 * 3600,
        description="A worker pod still Pending this long after creation is deleted and its task FAILED.",
    )
    pending_check_interval_s: float = Field(
        default=120.0,
        gt=0,
        le=24 * 3600,
        description="How often the safety sweeps list a page of Pending pods (a timeout the watch missed) "
        "and one of finished pods (a clean-up missed or dropped).",
    )
    pending_check_batch_size: int = Field(
        default=100, ge=1, le=5000, description="Pods each safety sweep lists per tick (one page)."
    )
    launch_failure_retries: int = Field(
        default=1,
        ge=0,
        le=100,
        description="Relaunches of a task whose pod was lost before it ever ran (deleted or evicted while "
        "Pending), before the task is reported UP_FOR_RESCHEDULE. They do not use a task retry.",
    )
    adopt_executor_ids: str = Field(
        default="",
        description="Comma-separated ids of executors known to be dead, whose pods are adopted at start "
        "(the AdoptTasks RPC does the same at any time). Never list a live executor.",
    )
    batch_size: int = Field(
        default=1000, ge=1, le=100_000, description="Events applied per transaction at most."
    )
    action_concurrency: int = Field(
        default=256,
        ge=1,
        le=1024,
        description="Pod deletes/patches in flight at most. Timed-out pods expire in bursts (creation "
        "times have whole seconds); the API server queues the excess fairly per client.",
    )
    action_retry_cap_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Longest wait between two tries of a failing pod delete or mark-done. They are "
        "retried until they go through (never dropped, so no pod leaks); a refusal that needs an "
        "operator (e.g. RBAC) is asked again at this interval.",
    )

    kept_log_lines: int = Field(
        default=100,
        ge=0,
        le=10_000,
        description="Lines of a finished task's `base` log kept before its pod is cleaned up, so "
        "GetTaskLogs answers once the pod is gone; 0 keeps none. Only pods whose container ran in a "
        "real runtime are read (never kwok's).",
    )
    kept_log_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="Bytes of a kept log tail at most (whole lines, the newest).",
    )
    kept_logs_max: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Kept log tails at most, in all; the oldest are dropped beyond it.",
    )
    failure_events_max: int = Field(
        default=10,
        ge=0,
        le=100,
        description="Most recent Kubernetes Events of a failed task's pod put in its failure "
        "details; 0 reads none.",
    )
    post_mortem_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="Longest a log-tail or Events read of a finished pod may take (waiting for a "
        "slot included); a pod's clean-up waits for its log read at most this long.",
    )
    post_mortem_concurrency: int = Field(
        default=8, ge=1, le=256, description="Log-tail and Events reads of finished pods in flight at most."
    )

    @property
    def dead_executors(self) -> list[str]:
        return [e.strip() for e in self.adopt_executor_ids.split(",") if e.strip()]

    @property
    def fatal_reasons(self) -> frozenset[str]:
        return frozenset(r.strip() for r in self.fatal_container_reasons.split(",") if r.strip())
