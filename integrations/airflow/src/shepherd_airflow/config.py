"""The executor's settings: one Airflow config section, `[shepherd_executor]`, read once at start.

Every option has a default that works against `shepherd serve` on the same machine except the
client certificate, which mutual TLS (the services' default) requires. Options are also read
from the environment the Airflow way (`AIRFLOW__SHEPHERD_EXECUTOR__LAUNCHER_ADDRESS`, ...). A bad
value stops the executor at start with the option's name, never at the first launch.

This module is pure: `Settings.from_options` takes a getter, so it is tested without Airflow;
`executor.py` hands it Airflow's `conf.get`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

SECTION = "shepherd_executor"


class SettingsError(ValueError):
    """A setting of [shepherd_executor] is missing or malformed; the message names it."""


@dataclass(frozen=True)
class Settings:
    # Where the services listen (host:port). The executor calls the launcher (launches) and the
    # reconciler (states, cancels, adoption, logs); it never calls the watcher.
    launcher_address: str = "localhost:50051"
    reconciler_address: str = "localhost:50053"
    # Mutual TLS: the CA that signed the services' certificates, and this scheduler's client
    # certificate and key (on the local control plane: `python -m controlplane issue-cert
    # schedulers/airflow`). The default authorization policy lets any identity of the
    # `schedulers` namespace launch, watch, cancel and read logs.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # The name the services' certificates carry, when it is not the address's host.
    tls_server_name: str = ""
    # Plaintext, for services explicitly started with --insecure. Off unless set.
    insecure: bool = False
    # Instead of the six options above: the JSON file `shepherd serve` writes
    # (~/.config/shepherd/connection.json), with the addresses and the credential paths.
    connection_file: str = ""
    # Bound on each unary call (launch batch, cancel, get, one log read), seconds.
    rpc_timeout_s: float = 30.0
    # Task instances per BatchLaunchTasks call (Shepherd takes 1 to 1000).
    launch_batch_size: int = 500
    # A pod template file (YAML of a v1 Pod) sent with every launch, as the KubernetesExecutor's
    # [kubernetes_executor] pod_template_file; a task's executor_config may name its own.
    pod_template_file: str = ""
    # A named template of the launcher (<name>.yaml in its --templates-dir), used when no
    # pod_template_file applies; empty means the launcher's default template.
    template_name: str = ""
    # The state stream's reconnect backoff: it starts at the first value and doubles up to the second.
    reconnect_initial_s: float = 0.2
    reconnect_max_s: float = 10.0
    # Lines of a task's log the Airflow UI gets from GetTaskLogs (1 to 10000).
    log_tail_lines: int = 100

    @classmethod
    def from_options(cls, get: Callable[[str], str | None]) -> Settings:
        """Settings from `get(option)` (None or "" for unset), checked, with the connection file
        filling in whatever the section leaves unset."""
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = get(f.name)
            if raw is None or str(raw).strip() == "":
                continue
            raw = str(raw).strip()
            try:
                if f.type == "bool":
                    values[f.name] = _boolean(raw)
                elif f.type == "float":
                    values[f.name] = float(raw)
                elif f.type == "int":
                    values[f.name] = int(raw)
                else:
                    values[f.name] = raw
            except ValueError:
                raise SettingsError(f"[{SECTION}] {f.name} = {raw!r} is not a valid {f.type}") from None
        settings = cls(**values)  # type: ignore[arg-type]
        if settings.connection_file:
            settings = settings._with_connection_file(values)
        settings.check()
        return settings

    def _with_connection_file(self, given: dict[str, object]) -> Settings:
        path = Path(self.connection_file).expanduser()
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SettingsError(f"[{SECTION}] connection_file {path}: {err}") from None
        if not isinstance(doc, dict):
            raise SettingsError(f"[{SECTION}] connection_file {path} is not a JSON object")
        from_file = {
            "launcher_address": doc.get("launcher", ""),
            "reconciler_address": doc.get("reconciler", ""),
            "tls_ca": doc.get("ca", ""),
            "tls_cert": doc.get("cert", ""),
            "tls_key": doc.get("key", ""),
        }
        merged = {k: v for k, v in from_file.items() if v and k not in given}
        if not doc.get("ca") and "insecure" not in given:
            merged["insecure"] = True  # `shepherd serve --insecure` writes no credentials
        return Settings(**{**self.__dict__, **merged})

    def check(self) -> None:
        for name in ("launcher_address", "reconciler_address"):
            if ":" not in getattr(self, name):
                raise SettingsError(f"[{SECTION}] {name} must be host:port, got {getattr(self, name)!r}")
        if not self.insecure:
            missing = [n for n in ("tls_ca", "tls_cert", "tls_key") if not getattr(self, n)]
            if missing:
                raise SettingsError(
                    f"[{SECTION}] {', '.join(missing)} unset: the services speak mutual TLS; give the CA, "
                    "this scheduler's certificate and key (or connection_file), or insecure = True "
                    "for services started with --insecure"
                )
            for name in ("tls_ca", "tls_cert", "tls_key"):
                if not Path(getattr(self, name)).expanduser().is_file():
                    raise SettingsError(f"[{SECTION}] {name}: no file at {getattr(self, name)}")
        if not 1 <= self.launch_batch_size <= 1000:
            raise SettingsError(
                f"[{SECTION}] launch_batch_size must be 1 to 1000, got {self.launch_batch_size}"
            )
        if not 1 <= self.log_tail_lines <= 10000:
            raise SettingsError(f"[{SECTION}] log_tail_lines must be 1 to 10000, got {self.log_tail_lines}")
        for name in ("rpc_timeout_s", "reconnect_initial_s", "reconnect_max_s"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"[{SECTION}] {name} must be positive, got {getattr(self, name)}")
        if self.pod_template_file and not Path(self.pod_template_file).expanduser().is_file():
            raise SettingsError(f"[{SECTION}] pod_template_file: no file at {self.pod_template_file}")


def _boolean(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(raw)
