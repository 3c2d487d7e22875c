"""The pod policy: what a worker pod may do, checked on the final pod the launcher would create.

Templates, the generated layer and per-task overrides all merge before the check, so no layer can
get around it. By default it is the Kubernetes "restricted" Pod Security Standard plus Shepherd's
own rules: the pod runs as the configured worker ServiceAccount (never one of the services' own),
without a ServiceAccount token unless allowed, in one of the configured namespaces, and, when an
allow-list of commands is set, every command it runs starts with an allowed executable.

Security fields that no layer sets get the restricted value (`secure_defaults`), so a plain
template or a sidecar without a securityContext still makes a compliant pod; a layer that sets a
forbidden value is refused, naming the field. Every rule can be relaxed in the policy file, for all
templates or for one (see README.md, "Security").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.launcher import yamldoc

SERVICE_IDENTITIES = frozenset({"launcher", "watcher", "reconciler"})
# The restricted standard's volume types (hostPath and the rest are for the baseline or worse).
RESTRICTED_VOLUME_TYPES = (
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "image",
    "persistentVolumeClaim",
    "projected",
    "secret",
)
SAFE_SYSCTLS = (
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ping_group_range",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_syncookies",
)
_SELINUX_TYPES = ("", "container_t", "container_init_t", "container_kvm_t", "container_engine_t")
_CONFINED = ("RuntimeDefault", "Localhost")
MAX_POLICY_BYTES = 256 * 1024

Path_ = tuple[str, ...]  # e.g. ("spec", "containers", "[base]", "securityContext", "privileged")


class Rules(BaseModel):
    """One set of rules; each field relaxes one check of the restricted default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow_privileged: bool = Field(default=False, description="Privileged containers.")
    allow_host_namespaces: bool = Field(
        default=False, description="hostNetwork, hostPID, hostIPC, host ports, Windows hostProcess."
    )
    allow_host_path: bool = Field(default=False, description="hostPath volumes.")
    allowed_volume_types: tuple[str, ...] = Field(
        default=RESTRICTED_VOLUME_TYPES, description="Volume sources a pod may use (besides hostPath)."
    )
    allowed_capabilities: tuple[str, ...] = Field(
        default=("NET_BIND_SERVICE",), description="Capabilities a container may add."
    )
    allow_kept_capabilities: bool = Field(
        default=False, description="Containers that do not drop ALL capabilities."
    )
    allow_root: bool = Field(default=False, description="Running as root (runAsNonRoot false, runAsUser 0).")
    allow_privilege_escalation: bool = Field(default=False, description="allowPrivilegeEscalation true.")
    allow_unconfined: bool = Field(
        default=False,
        description="seccomp or AppArmor profile Unconfined, custom SELinux options, an unmasked /proc.",
    )
    allowed_sysctls: tuple[str, ...] = Field(default=SAFE_SYSCTLS, description="Sysctls a pod may set.")
    service_accounts: tuple[str, ...] = Field(
        default=(), description="ServiceAccounts a pod may use besides the worker account."
    )
    allow_token_automount: bool = Field(
        default=False, description="automountServiceAccountToken true, or a projected token volume."
    )
    allowed_commands: tuple[str, ...] | None = Field(
        default=None, description="Executables a container may run (see README.md); null allows any."
    )
    namespaces: tuple[str, ...] | None = Field(
        default=None, description="Namespaces pods may be created in; null: every one the executor uses."
    )


class PolicyFile(BaseModel):
    """The policy file: rules for every template, and changes to them for named templates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: dict[str, Any] = Field(default_factory=dict)
    templates: dict[str, dict[str, Any]] = Field(default_factory=dict)


@dataclass(frozen=True)
class Violation:
    """One way the final pod breaks the policy: where, and why."""

    path: Path_
    problem: str

    @property
    def where(self) -> str:
        return render_path(self.path)


def render_path(path: Sequence[str]) -> str:
    """("spec", "containers", "[base]", "image") -> "spec.containers[base].image"."""
    out = ""
    for part in path:
        out += part if part.startswith("[") or not out else f".{part}"
    return out


@dataclass(frozen=True)
class PodPolicy:
    """The rules for inline templates and unnamed ones (`default`), and per named template."""

    worker_service_account: str
    default: Rules
    per_template: Mapping[str, Rules]
    namespaces: tuple[str, ...] | None  # what the executor watches; None: every namespace

    @classmethod
    def load(
        cls,
        path: Path | None,
        *,
        worker_service_account: str,
        allowed_commands: Sequence[str] = (),
        namespaces: Sequence[str] | None,
        template_names: Sequence[str],
    ) -> PodPolicy:
        """The policy from a file (or the restricted default); ValueError naming what is wrong."""
        raw = PolicyFile()
        if path is not None:
            try:
                doc = yamldoc.load(path.read_text(), str(path), max_bytes=MAX_POLICY_BYTES)
                raw = PolicyFile.model_validate(doc or {})
            except (OSError, ValidationError, ValueError) as err:
                raise ValueError(f"pod policy {path} is invalid: {err}") from err
        base = dict(raw.default)
        if allowed_commands:
            if base.get("allowed_commands") is not None:
                raise ValueError("allowed_commands is set both by --allowed-commands and the pod policy file")
            base["allowed_commands"] = tuple(allowed_commands)
        try:
            default = Rules.model_validate(base)
            per_template = {
                name: Rules.model_validate({**base, **changes}) for name, changes in raw.templates.items()
            }
        except ValidationError as err:
            raise ValueError(f"pod policy {path} is invalid: {err}") from err
        if unknown := sorted(set(per_template) - set(template_names)):
            raise ValueError(f"the pod policy names templates that do not exist: {unknown}")
        policy = cls(worker_service_account, default, per_template, tuple(namespaces) if namespaces else None)
        policy._validate()
        return policy

    def _validate(self) -> None:
        for name, rules in {"default": self.default, **self.per_template}.items():
            accounts = {self.worker_service_account, *rules.service_accounts}
            if own := sorted(accounts & SERVICE_IDENTITIES):
                raise ValueError(
                    f"pod policy ({name}): worker pods may not run as the services' own ServiceAccounts {own}"
                )
            watched = set(rules.namespaces or ()) if self.namespaces is None else set(self.namespaces)
            if outside := sorted(set(rules.namespaces or ()) - watched):
                raise ValueError(f"pod policy ({name}): namespaces {outside} are not watched")

    def rules(self, template: str) -> Rules:
        """The rules for a named template; an inline template (empty name) gets the default."""
        return self.per_template.get(template, self.default)

    def secure_defaults(self, pod: dict[str, Any], rules: Rules) -> None:
        """Fill the security fields no layer set with the restricted values, in place."""
        spec = pod["spec"]
        _default(spec, "serviceAccountName", self.worker_service_account)
        if not rules.allow_token_automount:
            _default(spec, "automountServiceAccountToken", False)
        security = _mapping(spec, "securityContext")
        if not rules.allow_root:
            _default(security, "runAsNonRoot", True)
        if not rules.allow_unconfined:
            _default(security, "seccompProfile", {"type": "RuntimeDefault"})
        for _, container in _containers(spec):
            context = _mapping(container, "securityContext")
            if not rules.allow_privilege_escalation:
                _default(context, "allowPrivilegeEscalation", False)
            if not rules.allow_kept_capabilities:
                _default(_mapping(context, "capabilities"), "drop", ["ALL"])

    def check(self, pod: dict[str, Any], rules: Rules) -> list[Violation]:
        """Every way the pod breaks `rules`, in document order; empty when it may be created."""
        return list(_Checker(self, rules).pod(pod))


def _default(parent: dict[str, Any], name: str, value: Any) -> None:
    """Set parent[name] unless a layer set it (null counts as unset, as in Kubernetes)."""
    if parent.get(name) is None:
        parent[name] = value


def _mapping(parent: dict[str, Any], name: str) -> dict[str, Any]:
    """parent[name] as a mapping, created when absent (or null)."""
    value = parent.get(name)
    if not isinstance(value, dict):
        value = parent[name] = {}
    return value


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[Path_, dict[str, Any]]]:
    for kind in ("initContainers", "containers"):
        for container in spec.get(kind) or []:
            yield ("spec", kind, f"[{container.get('name')}]"), container


class _Checker:
    def __init__(self, policy: PodPolicy, rules: Rules) -> None:
        self.policy = policy
        self.rules = rules

    def pod(self, pod: dict[str, Any]) -> Iterator[Violation]:
        rules = self.rules
        namespace = pod["metadata"].get("namespace")
        allowed = rules.namespaces or self.policy.namespaces
        if allowed is not None and namespace not in allowed:
            yield Violation(
                ("metadata", "namespace"),
                f"{str(namespace)[:64]!r} is not one of the allowed namespaces {list(allowed)}",
            )
        spec = pod["spec"]
        yield from self._identity(spec)
        if not rules.allow_host_namespaces:
            for name in ("hostNetwork", "hostPID", "hostIPC"):
                if spec.get(name):
                    yield Violation(("spec", name), "host namespaces are not allowed by the pod policy")
        security = spec.get("securityContext") or {}
        yield from self._context(("spec", "securityContext"), security)
        if not rules.allow_unconfined:
            for i, sysctl in enumerate(security.get("sysctls") or []):
                if sysctl.get("name") not in rules.allowed_sysctls:
                    yield Violation(
                        ("spec", "securityContext", "sysctls", f"[{i}]", "name"),
                        f"{sysctl.get('name')!r} is not an allowed sysctl",
                    )
        for volume in spec.get("volumes") or []:
            yield from self._volume(("spec", "volumes", f"[{volume.get('name')}]"), volume)
        for path, container in _containers(spec):
            yield from self._container(path, container, security)

    def _identity(self, spec: dict[str, Any]) -> Iterator[Violation]:
        accounts = (self.policy.worker_service_account, *self.rules.service_accounts)
        others = f" or one of {list(self.rules.service_accounts)}" if self.rules.service_accounts else ""
        for name in ("serviceAccountName", "serviceAccount"):  # the second is the deprecated alias
            account = spec.get(name)
            if account is not None and account not in accounts:
                yield Violation(
                    ("spec", name),
                    f"{str(account)[:64]!r} is not the worker ServiceAccount "
                    f"{self.policy.worker_service_account!r}{others}",
                )
        if not self.rules.allow_token_automount and spec.get("automountServiceAccountToken") is not False:
            yield Violation(
                ("spec", "automountServiceAccountToken"),
                "must be false: worker pods get no ServiceAccount token unless the pod policy allows it",
            )

    def _volume(self, path: Path_, volume: dict[str, Any]) -> Iterator[Violation]:
        for source, value in volume.items():
            if source == "name" or value is None:  # null: unset, as in Kubernetes
                continue
            if source == "hostPath":
                if not self.rules.allow_host_path:
                    yield Violation((*path, source), "hostPath volumes are not allowed by the pod policy")
            elif source not in self.rules.allowed_volume_types:
                yield Violation((*path, source), f"{source} volumes are not allowed by the pod policy")
            elif source == "projected" and not self.rules.allow_token_automount:
                for i, projection in enumerate(value.get("sources") or []):
                    if projection.get("serviceAccountToken") is not None:
                        yield Violation(
                            (*path, source, "sources", f"[{i}]", "serviceAccountToken"),
                            "ServiceAccount tokens are not allowed by the pod policy",
                        )

    def _context(self, path: Path_, context: Mapping[str, Any]) -> Iterator[Violation]:
        """The rules a pod's and a container's securityContext share."""
        rules = self.rules
        if not rules.allow_root and context.get("runAsUser") == 0:
            yield Violation((*path, "runAsUser"), "running as root (user 0) is not allowed by the pod policy")
        if not rules.allow_host_namespaces and (context.get("windowsOptions") or {}).get("hostProcess"):
            yield Violation(
                (*path, "windowsOptions", "hostProcess"), "host processes are not allowed by the pod policy"
            )
        if rules.allow_unconfined:
            return
        for profile in ("seccompProfile", "appArmorProfile"):
            kind = (context.get(profile) or {}).get("type")
            if kind is not None and kind not in _CONFINED:
                yield Violation((*path, profile, "type"), f"must be one of {list(_CONFINED)} (got {kind!r})")
        selinux = context.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in _SELINUX_TYPES:
            yield Violation((*path, "seLinuxOptions", "type"), f"must be one of {list(_SELINUX_TYPES[1:])}")
        for name in ("user", "role"):
            if selinux.get(name):
                yield Violation(
                    (*path, "seLinuxOptions", name), "custom SELinux users and roles are not allowed"
                )

    def _container(
        self, path: Path_, container: dict[str, Any], pod_security: Mapping[str, Any]
    ) -> Iterator[Violation]:
        rules = self.rules
        context = container.get("securityContext") or {}
        here = (*path, "securityContext")
        if not rules.allow_privileged and context.get("privileged"):
            yield Violation((*here, "privileged"), "privileged containers are not allowed by the pod policy")
        if not rules.allow_privilege_escalation and context.get("allowPrivilegeEscalation") is not False:
            yield Violation((*here, "allowPrivilegeEscalation"), "must be false")
        capabilities = context.get("capabilities") or {}
        for capability in capabilities.get("add") or []:
            if capability not in rules.allowed_capabilities:
                yield Violation(
                    (*here, "capabilities", "add"),
                    f"adding {capability!r} is not allowed (allowed: {list(rules.allowed_capabilities)})",
                )
        if not rules.allow_kept_capabilities and "ALL" not in (capabilities.get("drop") or []):
            yield Violation((*here, "capabilities", "drop"), "must drop ALL capabilities")
        if not rules.allow_root:
            if context.get("runAsNonRoot") is False:
                yield Violation((*here, "runAsNonRoot"), "must be true: running as root is not allowed")
            elif context.get("runAsNonRoot") is None and pod_security.get("runAsNonRoot") is not True:
                yield Violation(("spec", "securityContext", "runAsNonRoot"), "must be true")
        if not rules.allow_unconfined:
            own = (context.get("seccompProfile") or {}).get("type")
            inherited = (pod_security.get("seccompProfile") or {}).get("type")
            if own is None and inherited is None:
                yield Violation(("spec", "securityContext", "seccompProfile"), "must be set (RuntimeDefault)")
            if context.get("procMount") not in (None, "Default"):
                yield Violation((*here, "procMount"), "must be Default")
        if not rules.allow_host_namespaces:
            for i, port in enumerate(container.get("ports") or []):
                if port.get("hostPort"):
                    yield Violation(
                        (*path, "ports", f"[{i}]", "hostPort"), "host ports are not allowed by the pod policy"
                    )
        yield from self._context(here, context)
        if rules.allowed_commands is not None:
            yield from self._commands(path, container)

    def _commands(self, path: Path_, container: dict[str, Any]) -> Iterator[Violation]:
        """The executable of a container is command[0], or args[0] when it sets no command (the
        worker image's entrypoint runs its arguments); exec probes and hooks run command[0]."""
        allowed = self.rules.allowed_commands or ()
        command, args = container.get("command") or [], container.get("args") or []
        if command:
            runs: list[tuple[Path_, str]] = [((*path, "command", "[0]"), command[0])]
        elif args:
            runs = [((*path, "args", "[0]"), args[0])]
        else:
            yield Violation(
                (*path, "command"),
                "must be set: with an allow-list of commands, a container may not run its image's default",
            )
            runs = []
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            exec_ = (container.get(probe) or {}).get("exec") or {}
            if exec_:
                runs.append(((*path, probe, "exec", "command", "[0]"), (exec_.get("command") or [""])[0]))
        for hook in ("postStart", "preStop"):
            exec_ = ((container.get("lifecycle") or {}).get(hook) or {}).get("exec") or {}
            if exec_:
                runs.append(
                    ((*path, "lifecycle", hook, "exec", "command", "[0]"), (exec_.get("command") or [""])[0])
                )
        for where, executable in runs:
            if executable not in allowed:
                yield Violation(
                    where, f"{executable!r} is not an allowed command (allowed: {sorted(allowed)})"
                )
