"""The Launcher's settings (on top of the shared ones)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from shepherd.settings import StoreSettings, state_dir

_REPO_TEMPLATES = Path(__file__).resolve().parents[2] / "deploy" / "pod-templates"


class LauncherSettings(StoreSettings):
    """Settings of the Launcher."""

    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")

    store_path: Path = Field(
        default_factory=lambda: state_dir() / "launcher.db",
        description="SQLite file holding accepted launches; put it on a persistent volume.",
    )
    templates_dir: Path = Field(
        default=_REPO_TEMPLATES, description="Directory of named pod templates (<name>.yaml)."
    )
    default_template: str = Field(default="default", description="Template used when a launch names none.")
    create_concurrency: int = Field(default=64, ge=1, le=1024, description="Pod creates in flight at most.")
    queue_limit: int = Field(
        default=10_000,
        ge=1,
        description="Accepted-but-not-created launches at most; beyond it RESOURCE_EXHAUSTED.",
    )
    task_queued_timeout_s: float = Field(
        default=600.0,
        gt=0,
        le=7 * 24 * 3600,
        description="How long an accepted task may wait for its pod to be created (Airflow's "
        "task_queued_timeout), counted from its acceptance, across restarts. Transient API errors "
        "(an unreachable API server included) are retried until then; after it the launch fails "
        "with reason QueuedTimeout.",
    )
    create_backoff_cap_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest wait between two create retries (a retry waits at least half of its "
        "backoff step, never a few milliseconds; a recovered API server cuts the wait short).",
    )
    api_probe_interval_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="How often the API server's /readyz is probed. While it does not answer (nor "
        "do creates), health is NOT_SERVING; it is SERVING again as soon as the API server answers.",
    )
    reconciler_address: str = Field(
        default="127.0.0.1:50053",
        description="host:port of the Reconciler. On start, the launcher asks it about each launch "
        "replayed from before the restart whose pod is not there, so a pod that already ran, or a "
        "task cancelled meanwhile, is never created again; such launches wait while it is down.",
    )
    allowed_commands: str = Field(
        default="",
        description="Comma-separated executables worker pods may run; empty allows any. Checked on the "
        "final pod: every container's and init container's command[0] (args[0] when it sets no command; "
        "one that sets neither is refused), and every exec probe's and lifecycle hook's command[0].",
    )
    worker_service_account: str = Field(
        default="shepherd-worker",
        description="The ServiceAccount worker pods run as (never one of the services' own).",
    )
    pod_policy: Path | None = Field(
        default=None,
        description="YAML file relaxing the pod policy, for all templates or per template; unset: the "
        "restricted Pod Security Standard (see README.md, Security).",
    )

    @property
    def allowed_executables(self) -> frozenset[str]:
        return frozenset(c.strip() for c in self.allowed_commands.split(",") if c.strip())
