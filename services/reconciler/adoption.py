"""Taking over the pods of executors that a caller declares dead (Airflow's adoption, scoped).

Only pods labelled with a declared-dead executor id are looked at, so pods of live executors are
never touched (Airflow issue #66396, where schedulers thrashed each other's pods). Live pods are
relabelled to this executor with the pod's resourceVersion as a precondition, so when two
executors adopt at once exactly one wins; the watcher then brings them into view and their tasks
are reported ADOPTED before moving on. Completed pods are cleaned up by the deletion policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.reconciler.actions import PodActions
from services.reconciler.engine import Engine
from services.reconciler.statemachine import Policy
from services.reconciler.store import PodActionRow
from shepherd import podmeta
from shepherd.kube import ApiError, KubeClient
from shepherd.logging import get_logger
from shepherd.v1 import task_pb2


@dataclass(frozen=True)
class Adopted:
    keys: list[task_pb2.TaskKey]
    cleaned_pods: int


async def adopt(
    dead_executor_ids: list[str],
    *,
    kube: KubeClient,
    engine: Engine,
    actions: PodActions,
    policy: Policy,
    executor_id: str,
    namespaces: list[str] | None,
) -> Adopted:
    log = get_logger(component="adoption", executor_id=executor_id)
    keys: list[task_pb2.TaskKey] = []
    cleaned: list[PodActionRow] = []
    for dead in dead_executor_ids:
        selector = (
            f"{podmeta.LABEL_WORKER}=true,{podmeta.LABEL_EXECUTOR}={podmeta.safe_label_value(dead)},"
            f"!{podmeta.LABEL_DONE}"
        )
        for namespace in namespaces if namespaces is not None else [None]:
            pods, _ = await kube.list_all_pods(namespace, label_selector=selector)
            for pod in pods:
                meta = pod["metadata"]
                if (pod.get("status") or {}).get("phase") == "Succeeded":
                    action = "delete" if policy.delete_worker_pods else "mark-done"
                    cleaned.append(PodActionRow(meta["uid"], meta["namespace"], meta["name"], action))
                    continue
                key = podmeta.key_from_annotations(meta.get("annotations") or {})
                if key is None:
                    continue  # not a task pod we can map back: leave it alone
                engine.expect_adoption(meta["uid"])
                try:
                    await kube.patch_pod(
                        meta["namespace"],
                        meta["name"],
                        {
                            "metadata": {
                                "resourceVersion": meta["resourceVersion"],
                                "labels": {podmeta.LABEL_EXECUTOR: podmeta.safe_label_value(executor_id)},
                            }
                        },
                    )
                except ApiError as err:
                    engine.forget_adoption(meta["uid"])
                    if err.status in (404, 409):
                        log.info("pod changed or went away while adopting it; skipped", pod=meta["name"])
                        continue
                    raise
                keys.append(key)
    actions.submit(cleaned)
    log.info("adopted", dead=dead_executor_ids, tasks=len(keys), cleaned_pods=len(cleaned))
    return Adopted(keys, len(cleaned))
