"""The safety sweep behind the pending timeout.

Deadlines are armed from watch events, so normally nothing here finds work. But an event can be
missed (a watcher bug, a pod created while everything was down): every `interval` this lists one
page (`batch` pods) of this executor's Pending pods, continuing where the last page ended, and
hands any pod past its deadline to the engine as if the watcher had just reported it. The cost
per tick is one bounded list call, never all pods.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from services.reconciler.engine import Engine, PodItem
from shepherd import podmeta, timestamps
from shepherd.kube import KubeClient
from shepherd.logging import get_logger
from shepherd.podevents import pod_event


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
    selector = podmeta.executor_selector(executor_id)
    tokens: dict[str | None, str] = {}
    while True:
        await asyncio.sleep(interval_s)
        for namespace in namespaces if namespaces is not None else [None]:
            try:
                page = await kube.list_pods(
                    namespace,
                    label_selector=selector,
                    field_selector="status.phase=Pending",
                    limit=batch,
                    continue_token=tokens.get(namespace, ""),
                )
            except Exception as err:  # the sweep is a safety net: it must outlive API trouble
                log.warning("pending sweep failed; next tick tries again", error=str(err))
                tokens.pop(namespace, None)
                continue
            tokens[namespace] = (page.get("metadata") or {}).get("continue", "")
            overdue = [pod for pod in page.get("items") or [] if _age_s(pod) > timeout_s]
            for pod in overdue:
                await engine.submit(PodItem(pod_event("MODIFIED", pod)))
            if overdue:
                log.info("found pods past the pending timeout", pods=len(overdue), namespace=namespace or "*")
