"""A real Airflow 3 deployment on the local cluster: what the real-Airflow tests, the executor
benchmark and the Airflow demo run.

Airflow's own components run as host processes from the cached Airflow virtualenv
(controlplane/airflowvenv.py), the way the tests run the Shepherd services: a PostgreSQL server
(Debian's package, a throw-away cluster on loopback), `airflow db migrate`, then the API server,
the DAG processor and the scheduler with the chosen executor (Shepherd's, or the cncf.kubernetes
provider's KubernetesExecutor for comparison). The task instances run in worker pods on the real
node, from the worker image built on the machine (integrations/airflow/worker/Dockerfile, with
the DAGs of integrations/airflow/dags baked in at the dags_folder the pods use).

What connects the pods to the host:
- the Task SDK in each pod calls the API server's execution API. The API server listens on
  loopback; a forwarder (controlplane/serviceproxy.py) listens on the real node's bridge gateway,
  the host's address on the pod network, and the pods' `[core] execution_api_server_url` names it;
- task logs: a hostPath PersistentVolume (one directory of this deployment's) and its claim in the
  workers' namespace, mounted at the pods' log folder, is the API server's `base_log_folder` too,
  so a task's log stays readable through Airflow after its pod is gone, with either executor.
Both are in the pod template this module writes (`pod_template_file` of either executor).

`stop()` leaves nothing behind: the processes it started (each in a session of its own, stopped by
process group), the claim and the volume, PostgreSQL and its data directory.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml

from controlplane import airflowvenv, realnode, serviceimage
from controlplane.cluster import Cluster, ClusterInfo
from controlplane.deploy import gateway
from controlplane.kubeapi import AdminClient, ApiError
from controlplane.settings import ClusterSettings
from controlplane.stack import ServiceStack, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGS = REPO_ROOT / "integrations" / "airflow" / "dags"
# Where the worker image has the DAGs and Airflow's task logs (worker/Dockerfile).
POD_DAGS = "/opt/airflow/dags"
POD_LOGS = "/opt/airflow/logs"
WORKER_UID = 1000
# On the worker pods, the claim and the volume: which deployment they belong to.
LABEL = "shepherd.dev/airflow"
_T = TypeVar("_T")


class AirflowError(RuntimeError):
    """A component did not start, or Airflow answered with an error; the message says which."""


class ExecutorKind(enum.Enum):
    SHEPHERD = "shepherd_airflow.ShepherdExecutor"
    KUBERNETES = "KubernetesExecutor"


class TaskState(enum.StrEnum):
    """Airflow's task instance states the tests and the benchmark look for."""

    SUCCESS = "success"
    FAILED = "failed"
    UPSTREAM_FAILED = "upstream_failed"
    SKIPPED = "skipped"
    RUNNING = "running"
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    UP_FOR_RETRY = "up_for_retry"
    RESTARTING = "restarting"


TERMINAL_TASK_STATES = frozenset(
    {TaskState.SUCCESS, TaskState.FAILED, TaskState.UPSTREAM_FAILED, TaskState.SKIPPED}
)
TERMINAL_RUN_STATES = frozenset({"success", "failed"})


@dataclass(frozen=True)
class ShepherdConnection:
    """How the scheduler's ShepherdExecutor reaches the services: `[shepherd_executor]`."""

    launcher_address: str
    reconciler_address: str
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of_stack(cls, stack: ServiceStack, scheduler: str = "airflow") -> ShepherdConnection:
        """The stack's addresses and a client certificate of the identity schedulers/<scheduler>."""
        issued = stack.authority.scheduler(scheduler)
        return cls(stack.address("launcher"), stack.address("reconciler"), issued.ca, issued.cert, issued.key)

    def config(self) -> dict[str, str]:
        """The options of `[shepherd_executor]` (integrations/airflow/README.md)."""
        return {
            "launcher_address": self.launcher_address,
            "reconciler_address": self.reconciler_address,
            "tls_ca": str(self.ca),
            "tls_cert": str(self.cert),
            "tls_key": str(self.key),
            "rpc_timeout_s": "30",
        }


@dataclass(frozen=True)
class TaskInstance:
    """One task instance as Airflow's REST API reports it."""

    task_id: str
    map_index: int
    state: str | None
    try_number: int
    queued_when: datetime | None
    start_date: datetime | None
    end_date: datetime | None

    @classmethod
    def from_api(cls, doc: Mapping[str, Any]) -> TaskInstance:
        def when(name: str) -> datetime | None:
            value = doc.get(name)
            return datetime.fromisoformat(value) if value else None

        return cls(
            doc["task_id"],
            int(doc["map_index"]),
            doc.get("state"),
            int(doc["try_number"]),
            when("queued_when"),
            when("start_date"),
            when("end_date"),
        )


def _log(msg: str) -> None:
    print(f"[airflow {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def poll(what: str, check: Callable[[], _T | None], *, timeout: float, interval: float = 1.0) -> _T:
    """`check()` until it returns something other than None; AirflowError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AirflowError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Postgres:
    """A throw-away PostgreSQL server from Debian's package, on loopback, owned by `postgres`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="shepherd-airflow-pg-"))
        self.port = free_port()
        self.bin = self._bin_dir()

    @staticmethod
    def _bin_dir() -> Path:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
        if not found:
            realnode.ensure_packages(
                {"postgresql": Path("/usr/lib/postgresql")},
                "or install PostgreSQL (Debian's postgresql package) by hand",
                AirflowError,
            )
            found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
        if not found:
            raise AirflowError("the postgresql package is installed but no /usr/lib/postgresql/*/bin/pg_ctl")
        return found[-1].parent

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _as_postgres(self, *argv: str) -> None:
        # The server refuses to run as root; Debian's package made the `postgres` user for it.
        done = subprocess.run(
            [str(self.bin / argv[0]), *argv[1:]],
            user="postgres",
            cwd=self.root,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if done.returncode != 0:
            raise AirflowError(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()[-1500:]}")

    def start(self) -> None:
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres("initdb", "-D", str(self.data), "-U", "airflow", "--auth=trust", "-E", "UTF8")
        # A test database: durability traded for speed; enough connections for every component.
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        self._as_postgres(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start"
        )
        self.psql("CREATE DATABASE airflow", database="postgres")

    def psql(self, query: str, *, database: str = "airflow") -> list[list[str]]:
        """The query's rows, each a list of column texts."""
        done = subprocess.run(
            [
                str(self.bin / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "airflow",
                "-d",
                database,
                "-X",
                "-A",
                "-t",
                "-F",
                "\t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                query,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            raise AirflowError(f"psql {query!r} failed: {done.stderr.strip()[-1000:]}")
        return [line.split("\t") for line in done.stdout.splitlines() if line]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://airflow@127.0.0.1:{self.port}/airflow"

    @property
    def async_url(self) -> str:
        return f"postgresql+asyncpg://airflow@127.0.0.1:{self.port}/airflow"

    def stop(self) -> None:
        if self.data.exists():
            with contextlib.suppress(AirflowError):
                self._as_postgres("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def _section_env(config: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    return {
        f"AIRFLOW__{section.upper()}__{option.upper()}": value
        for section, options in config.items()
        for option, value in options.items()
    }


# Parsing a DAG file that imports the kubernetes client takes seconds of CPU; on a busy two-core
# machine, with pods starting beside the scheduler, far more than Airflow's 30 s default bound.
_SLOW_MACHINE = {
    "core": {"dagbag_import_timeout": "300"},
    "dag_processor": {"dag_file_processor_timeout": "330"},
}
_LOG_PLUMBING = frozenset({"event", "timestamp", "level", "logger", "filename", "lineno", "loc"})


def _log_line(item: Any) -> str:
    """One structured log event as a line: its message, then its other fields (an exception's
    type and message are in `error_detail`) as JSON."""
    if not isinstance(item, Mapping):
        return str(item)
    rest = {k: v for k, v in item.items() if k not in _LOG_PLUMBING}
    return f"{item.get('event', '')} {json.dumps(rest, default=str)}" if rest else str(item.get("event", ""))


@dataclass
class AirflowDeployment:
    """Airflow 3.3.2 (PostgreSQL, API server, DAG processor, scheduler) running its tasks in worker
    pods on the local cluster's real node, through `executor`. Use as a context manager, or
    `start()` and `stop()`.

    `config` is extra Airflow configuration, {section: {option: value}}, given to every host
    component (as AIRFLOW__SECTION__OPTION); `pod_env` extra environment for the worker pods."""

    cluster: ClusterInfo
    workdir: Path
    executor: ExecutorKind = ExecutorKind.SHEPHERD
    shepherd: ShepherdConnection | None = None
    dags_folder: Path = DAGS
    namespace: str | None = None  # the workers' namespace; the cluster's by default
    parallelism: int = 32
    config: dict[str, dict[str, str]] = field(default_factory=dict)
    pod_env: dict[str, str] = field(default_factory=dict)
    settings: ClusterSettings = field(default_factory=ClusterSettings)
    name: str = field(default_factory=lambda: f"airflow-{uuid.uuid4().hex[:8]}")
    # Filled by start():
    venv: airflowvenv.AirflowVenv | None = None
    image: str = ""
    postgres: Postgres | None = None
    api_port: int = 0
    gateway_port: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _volume_made: bool = False

    # -- where things are -----------------------------------------------------------------------

    @property
    def home(self) -> Path:
        return self.workdir / "home"

    @property
    def log_folder(self) -> Path:
        """Task logs: the pods write them here (the hostPath volume), the API server reads them."""
        return self.workdir / "task-logs"

    @property
    def pod_template_file(self) -> Path:
        return self.workdir / "pod-template.yaml"

    @property
    def workers_namespace(self) -> str:
        return self.namespace or self.cluster.namespace

    @property
    def api_url(self) -> str:
        """The API server, from the host."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def execution_api_url(self) -> str:
        """The execution API, from the pods: the bridge gateway, forwarded to the API server."""
        return f"http://{gateway(self.settings.real_node_pod_cidr)}:{self.gateway_port}/execution/"

    def process_log(self, component: str) -> Path:
        return self.workdir / f"{component}.log"

    @property
    def scheduler_pid(self) -> int:
        """The running scheduler's process id (its CPU time: /proc/<pid>/stat)."""
        return self.procs["scheduler"].pid

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> AirflowDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, *, timeout: float = 300.0) -> None:
        if self.cluster.real_node is None:
            raise AirflowError(f"the cluster has no real node: {self.cluster.real_node_unavailable}")
        if self.executor is ExecutorKind.SHEPHERD and self.shepherd is None:
            raise AirflowError(
                "the Shepherd executor needs `shepherd` (the services' addresses and TLS files)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        self.log_folder.mkdir(exist_ok=True)
        # The pods run as uid 1000 and write here; the host's components too (as root).
        os.chown(self.log_folder, WORKER_UID, WORKER_UID)
        self.log_folder.chmod(0o2777)
        started = time.monotonic()
        self.venv = airflowvenv.ensure(*airflowvenv.AIRFLOW_3)
        self.image = serviceimage.build(self.settings, recipe=serviceimage.AIRFLOW_WORKER).name
        _log(f"venv {self.venv.path.name}, worker image {self.image} ({time.monotonic() - started:.0f}s)")
        self.api_port, self.gateway_port = free_port(), free_port()
        self._make_volume()
        self.pod_template_file.write_text(yaml.safe_dump(self.pod_template(), sort_keys=False))
        self.postgres = Postgres()
        self.postgres.start()
        self.airflow("db", "migrate")
        self._spawn(
            "proxy",
            [
                sys.executable,
                "-m",
                "controlplane.serviceproxy",
                "--listen",
                gateway(self.settings.real_node_pod_cidr),
                "--namespace",
                self.workers_namespace,
                "--forward",
                f"{self.gateway_port}=127.0.0.1:{self.api_port}",
            ],
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            },
        )
        self._spawn_airflow(
            "api-server",
            ["api-server", "--host", "127.0.0.1", "--port", str(self.api_port), "--workers", "1"],
        )
        self._spawn_airflow("dag-processor", ["dag-processor"])
        self.start_scheduler()
        poll("the API server", self._api_healthy, timeout=timeout)
        _log(f"Airflow is up: API {self.api_url}, pods reach {self.execution_api_url}")

    def stop(self) -> None:
        for component in ("scheduler", "dag-processor", "api-server", "proxy"):
            self._kill(component, signal.SIGTERM)
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        self._remove_volume()

    # -- processes ------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Airflow's configuration for the host components, as environment variables."""
        assert self.venv is not None
        assert self.postgres is not None
        config: dict[str, dict[str, str]] = {
            "core": {
                "executor": self.executor.value,
                "dags_folder": str(self.dags_folder),
                "parallelism": str(self.parallelism),
                "dags_are_paused_at_creation": "False",
                "execution_api_server_url": self.execution_api_url,
                # The REST API answers every caller as an admin: a local test deployment only.
                "simple_auth_manager_all_admins": "True",
                "load_examples": "False",
                **_SLOW_MACHINE["core"],
            },
            "database": {
                "sql_alchemy_conn": self.postgres.url,
                "sql_alchemy_conn_async": self.postgres.async_url,
            },
            "logging": {
                "base_log_folder": str(self.log_folder),
                # Folders either side makes (the pods as uid 1000, the host as root) stay writable to both.
                "file_task_handler_new_folder_permissions": "0o777",
                "file_task_handler_new_file_permissions": "0o666",
            },
            "scheduler": {
                # A dead scheduler's tasks are adopted within about 20 s rather than 5 minutes.
                "scheduler_health_check_threshold": "10",
                "orphaned_tasks_check_interval": "5",
                "enable_health_check": "False",
            },
            "dag_processor": {"refresh_interval": "5", **_SLOW_MACHINE["dag_processor"]},
        }
        if self.executor is ExecutorKind.SHEPHERD:
            assert self.shepherd is not None
            config["shepherd_executor"] = {
                **self.shepherd.config(),
                "pod_template_file": str(self.pod_template_file),
            }
        else:
            config["kubernetes_executor"] = {
                "namespace": self.workers_namespace,
                "pod_template_file": str(self.pod_template_file),
                "in_cluster": "False",
                "config_file": self.cluster.admin_kubeconfig,
                "delete_worker_pods": "True",
            }
        for section, options in self.config.items():
            config.setdefault(section, {}).update(options)
        return self.venv.env(self.home, {**_section_env(config), "PYTHONDONTWRITEBYTECODE": "1"})

    def airflow(self, *args: str, timeout: float = 600) -> str:
        """`airflow <args>` with this deployment's configuration; its output."""
        assert self.venv is not None
        done = subprocess.run(
            [str(self.venv.path / "bin" / "airflow"), *args],
            env=self.env(),
            cwd=self.home,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise AirflowError(f"`airflow {' '.join(args)}` failed:\n{(done.stdout + done.stderr)[-3000:]}")
        return done.stdout

    def _spawn(self, component: str, argv: list[str], env: Mapping[str, str]) -> None:
        with self.process_log(component).open("ab") as log:
            # A session of its own: stopped by process group (the API server's and the DAG
            # processor's children too), never by name.
            self.procs[component] = subprocess.Popen(
                argv,
                env=dict(env),
                cwd=self.home,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def _spawn_airflow(self, component: str, args: list[str]) -> None:
        assert self.venv is not None
        self._spawn(component, [str(self.venv.path / "bin" / "airflow"), *args], self.env())

    def _kill(self, component: str, sig: signal.Signals, *, timeout: float = 30.0) -> None:
        proc = self.procs.pop(component, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Children that outlived their leader (the group is still addressable while any lives).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def start_scheduler(self) -> None:
        self._spawn_airflow("scheduler", ["scheduler"])

    def kill_scheduler(self) -> None:
        """The scheduler dies at once (SIGKILL, its whole process group): nothing handed over."""
        self._kill("scheduler", signal.SIGKILL)

    def restart_scheduler(self) -> None:
        """Kill the scheduler and start another, as after a crash."""
        self.kill_scheduler()
        self.start_scheduler()

    def check_running(self) -> None:
        """AirflowError naming the component that exited, with the end of its log."""
        for component, proc in self.procs.items():
            if proc.poll() is not None:
                tail = self.process_log(component).read_text(errors="replace")[-3000:]
                raise AirflowError(f"{component} exited with {proc.returncode}:\n{tail}")

    # -- the pods' side ------------------------------------------------------------------------

    def pod_template(self) -> dict[str, Any]:
        """The worker pods' template (either executor's `pod_template_file`): the worker image on
        the real node, as uid 1000 (the restricted Pod Security Standard), the API server's address
        and the shared task-log volume."""
        env = {
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": self.execution_api_url,
            "AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FOLDER_PERMISSIONS": "0o777",
            "AIRFLOW__LOGGING__FILE_TASK_HANDLER_NEW_FILE_PERMISSIONS": "0o666",
            **_section_env({"core": _SLOW_MACHINE["core"]}),
            **self.pod_env,
        }
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"labels": {"app.kubernetes.io/name": "airflow-worker", LABEL: self.name}},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                # No cluster DNS on the local cluster: the node's resolver.
                "dnsPolicy": "Default",
                "nodeSelector": {realnode.NODE_LABEL: "true"},
                "tolerations": [
                    {"key": realnode.TAINT_KEY, "operator": "Equal", "value": "true", "effect": "NoSchedule"}
                ],
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": WORKER_UID,
                    "runAsGroup": WORKER_UID,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "base",
                        "image": self.image,
                        "imagePullPolicy": "IfNotPresent",
                        "env": [{"name": k, "value": v} for k, v in env.items()],
                        "resources": {
                            "requests": {"cpu": "100m", "memory": "256Mi"},
                            "limits": {"memory": "1Gi"},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "task-logs", "mountPath": POD_LOGS}],
                    }
                ],
                "volumes": [{"name": "task-logs", "persistentVolumeClaim": {"claimName": self.name}}],
            },
        }

    @property
    def _admin(self) -> AdminClient:
        return Cluster(self.settings)._admin()

    def _make_volume(self) -> None:
        """The task-log directory as a hostPath volume, bound to a claim in the workers' namespace."""
        admin = self._admin
        self._volume_made = True
        admin.request(
            "POST",
            "/api/v1/persistentvolumes",
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": self.name, "labels": {LABEL: self.name}},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "",
                    "hostPath": {"path": str(self.log_folder), "type": "Directory"},
                    "claimRef": {"namespace": self.workers_namespace, "name": self.name},
                },
            },
        )
        admin.request(
            "POST",
            f"/api/v1/namespaces/{self.workers_namespace}/persistentvolumeclaims",
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": self.name, "labels": {LABEL: self.name}},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "volumeName": self.name,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )

        def bound() -> bool | None:
            claim = admin.request(
                "GET", f"/api/v1/namespaces/{self.workers_namespace}/persistentvolumeclaims/{self.name}"
            )
            return True if claim.get("status", {}).get("phase") == "Bound" else None

        poll("the task-log volume's claim to be bound", bound, timeout=60)

    def _remove_volume(self, timeout: float = 120.0) -> None:
        if not self._volume_made:
            return
        admin = self._admin
        # Worker pods still holding the claim: those the executor kept (a failed pod is kept by
        # default, with either executor) or had no time to delete. They are this deployment's.
        with contextlib.suppress(ApiError):
            admin.request(
                "DELETE",
                f"/api/v1/namespaces/{self.workers_namespace}/pods",
                query={"labelSelector": f"{LABEL}={self.name}"},
            )
        paths = (
            f"/api/v1/namespaces/{self.workers_namespace}/persistentvolumeclaims/{self.name}",
            f"/api/v1/persistentvolumes/{self.name}",
        )
        for path in paths:
            with contextlib.suppress(ApiError):
                admin.request("DELETE", path)

            def gone(path: str = path) -> bool | None:
                try:
                    admin.request("GET", path)
                except ApiError as err:
                    if err.status == 404:
                        return True
                    raise
                return None

            try:
                # The claim waits for the last pod using it (kubernetes.io/pvc-protection).
                poll(f"{path} to be deleted", gone, timeout=timeout)
            except AirflowError as err:
                _log(f"left behind: {err}")
        self._volume_made = False

    # -- the REST API ---------------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None, *, query: Mapping[str, str] | None = None) -> Any:
        """A call to Airflow's REST API (`/api/v2/...`); its JSON answer."""
        url = self.api_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        request.add_header("Accept", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as err:
            raise AirflowError(
                f"{method} {path}: HTTP {err.code}: {err.read().decode(errors='replace')[:1000]}"
            ) from err
        return json.loads(raw) if raw else None

    def _api_healthy(self) -> bool | None:
        self.check_running()
        try:
            health = self.api("GET", "/api/v2/monitor/health")
        except (AirflowError, OSError):
            return None
        return True if health.get("metadatabase", {}).get("status") == "healthy" else None

    def wait_for_dag(self, dag_id: str, *, timeout: float = 180.0) -> None:
        """Until the DAG processor has parsed `dag_id` and the API serves it."""

        def parsed() -> bool | None:
            self.check_running()
            try:
                self.api("GET", f"/api/v2/dags/{dag_id}")
            except AirflowError:
                return None
            return True

        poll(f"the DAG {dag_id} to be parsed", parsed, timeout=timeout)

    def trigger(self, dag_id: str, run_id: str | None = None, conf: Mapping[str, Any] | None = None) -> str:
        """A manual run of `dag_id` (waits for the DAG to be parsed); its run id."""
        self.wait_for_dag(dag_id)
        run_id = run_id or f"manual_{uuid.uuid4().hex[:10]}"
        body = {"dag_run_id": run_id, "logical_date": None, "conf": dict(conf or {})}
        self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)
        return run_id

    def run_state(self, dag_id: str, run_id: str) -> str:
        return str(self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"])

    def wait_for_run(self, dag_id: str, run_id: str, *, timeout: float = 600.0) -> str:
        """Until the run is finished; its state (success or failed)."""

        def finished() -> str | None:
            self.check_running()
            state = self.run_state(dag_id, run_id)
            return state if state in TERMINAL_RUN_STATES else None

        return poll(f"the run {dag_id}/{run_id} to finish", finished, timeout=timeout, interval=2.0)

    def task_instances(self, dag_id: str, run_id: str) -> list[TaskInstance]:
        reply = self.api(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances", query={"limit": "1000"}
        )
        return sorted(
            (TaskInstance.from_api(doc) for doc in reply["task_instances"]),
            key=lambda t: (t.task_id, t.map_index),
        )

    def task_instance(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> TaskInstance:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        return TaskInstance.from_api(self.api("GET", path + (f"/{map_index}" if map_index >= 0 else "")))

    def wait_for_task(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        states: frozenset[str] | set[str],
        *,
        map_index: int = -1,
        timeout: float = 300.0,
    ) -> TaskInstance:
        """Until the task instance is in one of `states`."""

        def reached() -> TaskInstance | None:
            self.check_running()
            ti = self.task_instance(dag_id, run_id, task_id, map_index)
            return ti if ti.state in states else None

        return poll(f"{dag_id}/{run_id}/{task_id} to be {sorted(states)}", reached, timeout=timeout)

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """The try's log as Airflow's API server serves it (one event per line)."""
        reply = self.api(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            query={"full_content": "true", "map_index": str(map_index)},
        )
        content = reply.get("content", [])
        if isinstance(content, str):
            return content
        return "\n".join(_log_line(item) for item in content)

    def mark_failed(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> None:
        """As a user marking the task instance failed in the UI."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
        self.api("PATCH", path + (f"/{map_index}" if map_index >= 0 else ""), {"new_state": "failed"})

    def clear(self, dag_id: str, run_id: str, task_ids: list[str]) -> None:
        """As a user clearing the task instances in the UI (they run again)."""
        self.api(
            "POST",
            f"/api/v2/dags/{dag_id}/clearTaskInstances",
            {"dry_run": False, "dag_run_id": run_id, "task_ids": task_ids, "only_failed": False},
        )

    def set_variable(self, key: str, value: str) -> None:
        self.api("POST", "/api/v2/variables", {"key": key, "value": value})

    def sql(self, query: str) -> list[list[str]]:
        """A query on the metadata database (what the REST API does not show, e.g. which scheduler
        job adopted a task instance)."""
        assert self.postgres is not None
        return self.postgres.psql(query)

    def scheduler_job_ids(self) -> list[int]:
        """Every scheduler job so far, oldest first."""
        rows = self.sql("SELECT id FROM job WHERE job_type = 'SchedulerJob' ORDER BY id")
        return [int(row[0]) for row in rows]
