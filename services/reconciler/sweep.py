"""The safety sweeps behind the pending timeout and the pod clean-up.

Deadlines are armed and pod actions recorded from watch events, so normally nothing here finds
work. But an event can be missed (a watcher bug, a pod that finished while everything was down),
and a pod action can have been dropped by an earlier version that gave up on it. Every `interval`
each sweep lists one page (`batch` pods) of this executor's pods not yet marked done, continuing
where its last page ended, so the cost per tick is one bounded list call, never all pods:

- Pending pods past their deadline go to the engine as if the watcher had just reported them.
- Finished pods (Succeeded or Failed, or any pod whose task is terminal) that nobody is cleaning
  up: with no action recorded, the pod goes to the engine, which records the action its policy
  wants exactly as for a watch event (once per pod UID); with an action recorded as done although
  a fresh read shows the pod still uncleaned, that action is reopened and carried out again. An
  action recorded and not yet done is in the action runner's hands already, and left alone. A
  pod that changed within the last tick is left for the next one: its event may be on the way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from services.reconciler.actions import PodActions
from services.reconciler.engine import Engine, PodItem
from services.reconciler.store import TaskStore
from shepherd import podmeta, timestamps
from shepherd.kube import KubeClient
from shepherd.logging import BoundLogger, get_logger
from shepherd.podevents import pod_event

Pod = dict[str, Any]  # a pod as the API server sends it (raw JSON)


def _age_s(pod: dict[str, Any]) -> float:
    created = (pod.get("metadata") or {}).get("creationTimestamp")
    if not created:
        return 0.0
    return time.time() - timestamps.epoch_seconds(created)


async def sweep_pending(
    kube: KubeClient,
    engine: Engine,
    *,
    executor_id: str,
    namespaces: list[str] | None,
    timeout_s: float,
    interval_s: float,
    batch: int,
) -> None:
    log = get_logger(component="pending-sweep")
    pages = _Pages(kube, namespaces, podmeta.executor_selector(executor_id), "status.phase=Pending", batch)
    while True:
        await asyncio.sleep(interval_s)
        async for namespace, pods in pages.tick(log, "pending sweep"):
            overdue = [pod for pod in pods if _age_s(pod) > timeout_s]
            for pod in overdue:
                await engine.submit(PodItem(pod_event("MODIFIED", pod)))
            if overdue:
                log.info("found pods past the pending timeout", pods=len(overdue), namespace=namespace or "*")


@dataclass
class _Pages:
    """One sweep's paged listing: a page per namespace per tick, each namespace's listing
    continuing where its last page ended, so a tick costs one bounded list call per namespace."""

    kube: KubeClient
    namespaces: list[str] | None
    label_selector: str
    field_selector: str
    batch: int
    tokens: dict[str | None, str] = field(default_factory=dict)

    async def tick(self, log: BoundLogger, what: str) -> AsyncIterator[tuple[str | None, list[Pod]]]:
        for namespace in self.namespaces if self.namespaces is not None else [None]:
            try:
                page = await self.kube.list_pods(
                    namespace,
                    label_selector=self.label_selector,
                    field_selector=self.field_selector,
                    limit=self.batch,
                    continue_token=self.tokens.get(namespace, ""),
                )
            except Exception as err:  # the sweep is a safety net: it must outlive API trouble
                log.warning(f"{what} failed; next tick tries again", error=str(err))
                self.tokens.pop(namespace, None)
                continue
            self.tokens[namespace] = (page.get("metadata") or {}).get("continue", "")
            yield namespace, page.get("items") or []


_FINISHED_PHASES = ("Succeeded", "Failed")


async def sweep_finished(
    kube: KubeClient,
    engine: Engine,
    store: TaskStore,
    actions: PodActions,
    *,
    executor_id: str,
    namespaces: list[str] | None,
    interval_s: float,
    batch: int,
) -> None:
    log = get_logger(component="cleanup-sweep")
    # Not marked done, and past Pending.
    pages = _Pages(kube, namespaces, podmeta.executor_selector(executor_id), "status.phase!=Pending", batch)
    while True:
        await asyncio.sleep(interval_s)
        async for namespace, pods in pages.tick(log, "clean-up sweep"):
            settled = [pod for pod in pods if _unchanged_for_s(pod) >= interval_s]
            try:
                found = await _clean_up(settled, kube, engine, store, actions)
            except Exception as err:  # the sweep is a safety net: it must outlive API trouble
                log.warning("clean-up sweep failed; next tick tries again", error=str(err))
                pages.tokens.pop(namespace, None)
                continue
            if found:
                log.warning(
                    "found finished pods nobody was cleaning up", pods=found, namespace=namespace or "*"
                )


def _unchanged_for_s(pod: dict[str, Any]) -> float:
    """Time since the pod's last change of state (created, a condition, a container's end): a pod
    that changed within the last tick may have its watch event still on the way, not missed."""
    status = pod.get("status") or {}
    stamps = [(pod.get("metadata") or {}).get("creationTimestamp")]
    stamps += [c.get("lastTransitionTime") for c in status.get("conditions") or []]
    stamps += [
        ((c.get("state") or {}).get("terminated") or {}).get("finishedAt")
        for c in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])
    ]
    latest = max((timestamps.epoch_seconds(s) for s in stamps if s), default=0.0)
    return time.time() - latest


async def _clean_up(
    pods: list[dict[str, Any]], kube: KubeClient, engine: Engine, store: TaskStore, actions: PodActions
) -> int:
    """Hand the page's uncleaned finished pods to whoever cleans them up; how many there were."""
    finished = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp") or not meta.get("uid"):
            continue  # being deleted already
        event = pod_event("MODIFIED", pod)
        if (pod.get("status") or {}).get("phase") in _FINISHED_PHASES or (
            event.HasField("task_key") and engine.is_finished(event.task_key)
        ):
            finished.append((meta, event))
    done = store.actions_done([meta["uid"] for meta, _ in finished])
    found = 0
    for meta, event in finished:
        uid = meta["uid"]
        if uid not in done:
            found += 1
            await engine.submit(PodItem(event))  # the engine records the action its policy wants
        elif done[uid] and await _still_uncleaned(kube, meta):
            # Recorded as carried out, yet the pod is still here: the action was dropped (an
            # earlier version gave up on failing ones). The fresh read came after the store said
            # done, so a delete or mark that did go through would show in it.
            row = await store.reopen_action(uid)
            if row is not None:
                found += 1
                actions.submit([row])
    return found


async def _still_uncleaned(kube: KubeClient, meta: dict[str, Any]) -> bool:
    """A fresh read of the pod (a list by name: the Role grants list, not get) shows it uncleaned."""
    page = await kube.list_pods(meta["namespace"], field_selector=f"metadata.name={meta['name']}", limit=1)
    return any(
        (fresh := pod.get("metadata") or {}).get("uid") == meta["uid"]
        and not fresh.get("deletionTimestamp")
        and (fresh.get("labels") or {}).get(podmeta.LABEL_DONE) != "true"
        for pod in page.get("items") or []
    )
