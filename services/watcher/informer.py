"""List, then watch, this executor's pods in each namespace, and never lose an event.

Per namespace (or once for all namespaces):
  1. list with the executor's label selector; remember the list's resourceVersion;
  2. watch from it with bookmarks, advancing the resourceVersion on every event and bookmark;
  3. when the watch ends (server timeout), resume from the last resourceVersion;
  4. when nothing arrives for `inactivity_timeout_s` (a silent or half-open stream), resume too;
  5. on 410 Gone, re-list and diff against the cache: pods that changed during the gap get a
     synthetic MODIFIED, new ones a synthetic ADDED, vanished ones a synthetic DELETED.
The resourceVersion never goes back to "0": that would replay history and throw progress away.

Every DELETED event says how the pod went (PodEvent.gone), because "deleted" and "no longer
matches the selector" (marked done, relabelled by an adopting executor) mean different things for
its task, and a watch reports both as DELETED with the pod's last matching state. A pod whose
deletion was requested is deleted; otherwise the pod is read by name: missing, or replaced by a
pod with another UID, it was deleted; still there, it left the selector. A synthetic DELETED (a
pod that vanished in a gap) is a copy of the last state seen, so it is always asked about: all of
a gap's at once, with one paged list of the worker pods.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from services.watcher import encoded, metrics
from services.watcher.metrics import Restart
from shepherd import podmeta, timestamps, tracing
from shepherd.eventlog import MemoryLog
from shepherd.kube import ApiError, KubeClient, WatchExpired, is_transient
from shepherd.kube.client import sleep_backoff
from shepherd.kube.errors import Retries
from shepherd.logging import get_logger
from shepherd.podevents import pod_event
from shepherd.v1 import watcher_service_pb2

PodEvent = watcher_service_pb2.PodEvent
W = watcher_service_pb2


def _trace(event: PodEvent) -> None:
    """A span in the trace of the pod's launch for each event of a traced pod."""
    tracing.point(
        tracing.SpanName.POD_EVENT,
        event.traceparent,
        {
            tracing.Attr.EVENT_TYPE: W.PodEventType.Name(event.type),
            tracing.Attr.PHASE: event.phase,
            tracing.Attr.SYNTHETIC: event.synthetic,
            tracing.Attr.CURSOR: event.cursor,
            tracing.Attr.NAMESPACE: event.namespace,
            tracing.Attr.POD: event.pod_name,
            tracing.Attr.POD_UID: event.pod_uid,
        },
    )


@dataclass
class _Known:
    """A live pod's last event, kept encoded (a message object costs ~7x more: see encoded.py)."""

    resource_version: str
    namespace: str
    event: bytes

    def decoded(self) -> PodEvent:
        return PodEvent.FromString(self.event)


@dataclass
class InformerStats:
    """Counters for logs, health and tests."""

    lists: int = 0
    relists_after_gone: int = 0
    silent_restarts: int = 0
    events: int = 0
    synthetic_events: int = 0
    gone_reads: int = 0  # pods read by name to tell a deletion from leaving the selector
    gone_lists: int = 0  # lists of the worker pods to tell the same for the pods vanished in a gap


@dataclass
class Informer:
    """Feeds one MemoryLog (of encoded events: see encoded.py) from one or more namespaces'
    list+watch loops."""

    kube: KubeClient
    log: MemoryLog[bytes]
    label_selector: str
    namespaces: list[str] | None  # None: every namespace
    watch_timeout_s: int = 300
    inactivity_timeout_s: float = 90.0
    gone_read_retries: int = 8
    stats: InformerStats = field(default_factory=InformerStats)
    _cache: dict[str, _Known] = field(default_factory=dict)  # pod uid -> last known state
    _listed: set[str] = field(default_factory=set)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    last_heard: float | None = None  # monotonic time any watch last received an event or bookmark

    @property
    def ready(self) -> asyncio.Event:
        """Set once every namespace's first list has been emitted."""
        return self._ready

    def snapshot(self) -> tuple[int, list[PodEvent]]:
        """The current pods (new objects, the caller's to change) and the cursor they are consistent
        with (taken without awaiting)."""
        return self.log.head, [known.decoded() for known in self._cache.values()]

    async def run(self) -> None:
        scopes: list[str | None] = list(self.namespaces) if self.namespaces is not None else [None]
        async with asyncio.TaskGroup() as group:
            for namespace in scopes:
                group.create_task(self._run_scope(namespace), name=f"informer:{namespace or '*'}")

    def _emit(self, event_type: str, pod: dict[str, Any], *, synthetic: bool) -> None:
        event = pod_event(event_type, pod, synthetic=synthetic)
        timestamps.stamp_now(event.observe_time)
        self._record(event)

    async def _emit_deleted(self, pod: dict[str, Any]) -> None:
        event = pod_event("DELETED", pod)
        timestamps.stamp_now(event.observe_time)
        event.gone = await self._how_gone(event)
        self._record(event)

    async def _how_gone(self, event: PodEvent) -> W.PodGone.ValueType:
        """Deleted, or only out of the selector? From the API server, never from a missing field."""
        if event.HasField("deletion_time"):
            return W.POD_GONE_DELETED  # a requested deletion is never taken back
        retries = Retries(self.gone_read_retries)
        while True:
            try:
                self.stats.gone_reads += 1
                pod = await self.kube.get_pod(event.namespace, event.pod_name)
                break
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as err:
                if retries.another(err):
                    await sleep_backoff(retries.attempt, cap_s=5.0)
                    continue
                get_logger(component="informer", pod=event.pod_name, namespace=event.namespace).warning(
                    "could not read a pod that went out of view; the consumer decides how it went",
                    error=str(err),
                )
                return W.POD_GONE_UNSPECIFIED
        meta = (pod or {}).get("metadata") or {}
        if pod is None or meta.get("uid") != event.pod_uid or meta.get("deletionTimestamp"):
            return W.POD_GONE_DELETED
        return W.POD_GONE_LEFT_SELECTOR

    async def _how_vanished_went(
        self, namespace: str | None, uids: set[str]
    ) -> dict[str, W.PodGone.ValueType]:
        """How each pod that vanished in a gap went, by uid: one paged list of the scope's worker
        pods (any executor, done or not), not a read per pod. After a long gap under load that
        can be thousands of pods, and reading them one by one kept a 10,000-pod scale run's
        watcher from emitting anything for over ten minutes while the API server struggled. A
        vanished pod still listed under its uid, not being deleted, left the selector; any other
        was deleted. If the list keeps failing the consumer decides (POD_GONE_UNSPECIFIED)."""
        if not uids:
            return {}
        retries = Retries(self.gone_read_retries)
        while True:
            try:
                self.stats.gone_lists += 1
                staying: set[str] = set()
                async for pods, _ in self.kube.pod_pages(
                    namespace, label_selector=f"{podmeta.LABEL_WORKER}=true"
                ):
                    for pod in pods:
                        meta = pod.get("metadata") or {}
                        if meta.get("uid") in uids and not meta.get("deletionTimestamp"):
                            staying.add(meta["uid"])
                return {
                    uid: W.POD_GONE_LEFT_SELECTOR if uid in staying else W.POD_GONE_DELETED for uid in uids
                }
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as err:
                if retries.another(err):
                    await sleep_backoff(retries.attempt, cap_s=5.0)
                    continue
                get_logger(component="informer", namespace=namespace or "*").warning(
                    "could not list the pods that vanished in a gap; the consumer decides how they went",
                    error=str(err),
                    pods=len(uids),
                )
                return dict.fromkeys(uids, W.POD_GONE_UNSPECIFIED)

    def _record(self, event: PodEvent) -> None:
        """Append to the log under the next cursor, count it, and keep the cache in step."""
        event.cursor = self.log.next_cursor
        data = event.SerializeToString()
        self.log.append(encoded.frame(data))  # subscribers read it only after this call returns
        self.stats.events += 1
        self.stats.synthetic_events += event.synthetic
        metrics.events[(event.type, event.synthetic)].inc()
        if event.type == watcher_service_pb2.POD_EVENT_TYPE_DELETED:
            self._cache.pop(event.pod_uid, None)
        else:
            self._cache[event.pod_uid] = _Known(event.resource_version, event.namespace, data)
        if tracing.enabled and event.traceparent:
            _trace(event)

    async def _list(self, namespace: str | None, *, after_gap: bool) -> str:
        # Page by page: a re-list of 10,000 pods held at once cost the watcher ~500 MB in a scale
        # run. A page's changes are emitted as it comes; a list that fails half-way and is
        # started again re-emits nothing (the cache already has those resourceVersions).
        seen: set[str] = set()
        resource_version = ""
        async for pods, page_version in self.kube.pod_pages(namespace, label_selector=self.label_selector):
            resource_version = page_version  # the same for every page of one list
            for pod in pods:
                meta = pod.get("metadata") or {}
                uid = meta.get("uid", "")
                seen.add(uid)
                known = self._cache.get(uid)
                if known is None:
                    self._emit("ADDED", pod, synthetic=after_gap)
                elif known.resource_version != meta.get("resourceVersion"):
                    self._emit("MODIFIED", pod, synthetic=after_gap)
        self.stats.lists += 1
        vanished = {
            uid: known
            for uid, known in self._cache.items()
            if uid not in seen and (namespace is None or known.namespace == namespace)
        }
        # Each vanished pod is reconstructed from its last known state, which cannot say whether
        # it was deleted or relabelled: the API server is asked, once for all of them.
        gone = await self._how_vanished_went(namespace, set(vanished))
        for known in vanished.values():
            event = known.decoded()
            event.type = watcher_service_pb2.POD_EVENT_TYPE_DELETED
            event.synthetic = True
            event.gone = gone.get(event.pod_uid, W.POD_GONE_DELETED)
            timestamps.stamp_now(event.observe_time)
            self._record(event)
        return resource_version

    async def _run_scope(self, namespace: str | None) -> None:
        log = get_logger(component="informer", namespace=namespace or "*")
        scope = namespace or "*"
        resource_version: str | None = None
        failures = 0
        while True:
            try:
                if resource_version is None:
                    resource_version = await self._list(namespace, after_gap=scope in self._listed)
                    if scope not in self._listed:
                        self._listed.add(scope)
                        scopes = len(self.namespaces) if self.namespaces is not None else 1
                        if len(self._listed) == scopes:
                            self._ready.set()
                        log.info("listed", resource_version=resource_version, pods=len(self._cache))
                async for raw in self.kube.watch_pods(
                    namespace,
                    label_selector=self.label_selector,
                    resource_version=resource_version,
                    server_timeout_s=self.watch_timeout_s,
                    inactivity_timeout_s=self.inactivity_timeout_s,
                ):
                    self.last_heard = time.monotonic()
                    obj = raw.get("object") or {}
                    resource_version = (obj.get("metadata") or {}).get("resourceVersion") or resource_version
                    if raw.get("type") == "DELETED":
                        await self._emit_deleted(obj)
                    elif raw.get("type") != "BOOKMARK":
                        metrics.observe_lag(obj)
                        self._emit(str(raw.get("type")), obj, synthetic=False)
                    failures = 0
            except WatchExpired:
                self.stats.relists_after_gone += 1
                metrics.restarts[Restart.EXPIRED].inc()
                log.warning(
                    "watch expired (410 Gone): re-listing to rebuild the gap",
                    resource_version=resource_version,
                )
                resource_version = None
            except TimeoutError:
                self.stats.silent_restarts += 1
                metrics.restarts[Restart.SILENT].inc()
                log.warning(
                    "watch went silent: resuming from the last resourceVersion",
                    resource_version=resource_version,
                )
            except Exception as err:  # the loop must outlive any API or network failure
                failures += 1
                metrics.restarts[Restart.ERROR].inc()
                log.warning(
                    "watch failed; retrying", error=str(err), transient=is_transient(err), failures=failures
                )
                await sleep_backoff(failures, cap_s=30.0)
