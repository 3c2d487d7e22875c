"""Which identities may call which RPCs: the policy, its default, and the per-call decision.

A policy is a list of rules; a rule names identities and RPCs, both as patterns where `*` matches
anything (`spiffe://cluster.local/ns/schedulers/sa/*`, `shepherd.v1.ReconcilerService/*`). A call
is allowed when one rule names both its caller and its RPC; everything else is denied. Matching
patterns is done once per (identity, RPC): after that a decision is one dict lookup.

A policy file is YAML of the same shape as `default_policy` returns:

    rules:
    - name: schedulers
      identities: ["spiffe://cluster.local/ns/schedulers/sa/*"]
      rpcs: ["shepherd.v1.LauncherService/LaunchTask", "shepherd.v1.ReconcilerService/*"]
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_LAUNCHER = "shepherd.v1.LauncherService"
_WATCHER = "shepherd.v1.WatcherService"
_RECONCILER = "shepherd.v1.ReconcilerService"
# Decisions remembered at most; a flood of distinct identities cannot grow memory without bound.
_MAX_CACHED = 65_536


class PolicyError(ValueError):
    """The policy file is not a valid policy; the message names the place."""


@dataclass(frozen=True)
class Rule:
    name: str
    identities: tuple[str, ...]
    rpcs: tuple[str, ...]


def spiffe_id(trust_domain: str, namespace: str, account: str) -> str:
    """The SPIFFE ID of a Kubernetes ServiceAccount, as Istio and Shepherd's local PKI spell it."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{account}"


def default_policy(trust_domain: str, namespace: str = "shepherd") -> list[Rule]:
    """Schedulers (any ServiceAccount of namespace `schedulers`) launch, cancel, get, list and
    watch; the reconciler alone relaunches, cancels launches and reads the event streams it
    consumes; the launcher may read a task from the reconciler."""
    return [
        Rule(
            "schedulers",
            (spiffe_id(trust_domain, "schedulers", "*"),),
            (
                f"{_LAUNCHER}/LaunchTask",
                f"{_LAUNCHER}/BatchLaunchTasks",
                f"{_LAUNCHER}/GetLaunch",
                f"{_LAUNCHER}/RenderPod",
                f"{_RECONCILER}/WatchTaskStates",
                f"{_RECONCILER}/GetTask",
                f"{_RECONCILER}/ListTasks",
                f"{_RECONCILER}/CancelTask",
                f"{_RECONCILER}/AdoptTasks",
                f"{_RECONCILER}/GetTaskLogs",
            ),
        ),
        Rule(
            "reconciler",
            (spiffe_id(trust_domain, namespace, "reconciler"),),
            (
                f"{_LAUNCHER}/GetLaunch",
                f"{_LAUNCHER}/CancelLaunch",
                f"{_LAUNCHER}/RelaunchTask",
                f"{_LAUNCHER}/WatchLaunchEvents",
                f"{_WATCHER}/WatchPodEvents",
            ),
        ),
        Rule("launcher", (spiffe_id(trust_domain, namespace, "launcher"),), (f"{_RECONCILER}/GetTask",)),
    ]


def load_policy(path: Path) -> list[Rule]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise PolicyError(f"{path}: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise PolicyError(f"{path}: must be a mapping with a list `rules`")
    return [_rule(item, f"{path}: rules[{i}]") for i, item in enumerate(doc["rules"])]


def _rule(item: Any, where: str) -> Rule:
    if not isinstance(item, dict):
        raise PolicyError(f"{where}: must be a mapping with `identities` and `rpcs`")
    unknown = set(item) - {"name", "identities", "rpcs"}
    if unknown:
        raise PolicyError(f"{where}: unknown keys {sorted(unknown)}")
    lists = {}
    for key in ("identities", "rpcs"):
        value = item.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise PolicyError(f"{where}.{key}: must be a non-empty list of strings")
        lists[key] = tuple(value)
    for rpc in lists["rpcs"]:
        if "/" not in rpc:
            raise PolicyError(f"{where}.rpcs: {rpc!r} is not package.Service/Method (or Service/*)")
    return Rule(str(item.get("name", where)), lists["identities"], lists["rpcs"])


def _matcher(patterns: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


class Policy:
    """The decisions of one service: `is_open(method)` and `allows(identity, method)`.

    Methods are gRPC paths as the server sees them (`/shepherd.v1.LauncherService/LaunchTask`)."""

    def __init__(self, rules: Sequence[Rule], open_rpcs: Sequence[str]) -> None:
        self.rules = list(rules)
        self._open = _matcher(open_rpcs) if open_rpcs else None
        self._rules = [(rule, _matcher(rule.identities), _matcher(rule.rpcs)) for rule in self.rules]
        self._open_cache: dict[str, bool] = {}
        self._decisions: dict[tuple[str, str], bool] = {}

    def is_open(self, method: str) -> bool:
        cached = self._open_cache.get(method)
        if cached is None:
            cached = self._open is not None and self._open.fullmatch(method.lstrip("/")) is not None
            if len(self._open_cache) < _MAX_CACHED:
                self._open_cache[method] = cached
        return cached

    def allows(self, identity: str, method: str) -> bool:
        key = (identity, method)
        decision = self._decisions.get(key)
        if decision is None:
            rpc = method.lstrip("/")
            decision = any(
                who.fullmatch(identity) is not None and what.fullmatch(rpc) is not None
                for _, who, what in self._rules
            )
            if len(self._decisions) >= _MAX_CACHED:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision
