"""WatcherService over gRPC: a thin layer over the informer's event log."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc

from services.watcher import encoded
from services.watcher import metrics as watcher_metrics
from services.watcher.informer import Informer
from services.watcher.settings import WatcherSettings
from shepherd import logstream, metrics, podmeta, tracing
from shepherd.errors import abort_invalid
from shepherd.eventlog import MemoryLog
from shepherd.grpcserver import GrpcServer, run
from shepherd.kube import KubeClient, load_connection
from shepherd.logging import configure, get_logger
from shepherd.supervisor import Supervisor
from shepherd.v1 import watcher_service_pb2, watcher_service_pb2_grpc
from shepherd.validation import InvalidField

PodEvent = watcher_service_pb2.PodEvent
SERVICE_NAME = watcher_service_pb2.DESCRIPTOR.services_by_name["WatcherService"].full_name
SNAPSHOT_CHUNK = 256  # events per message: well under gRPC's 4 MiB default message limit


class WatcherServicer(watcher_service_pb2_grpc.WatcherServiceServicer):
    def __init__(self, informer: Informer, log: MemoryLog[bytes], *, interval_s: float) -> None:
        self._informer = informer
        self._log = log
        self._interval_s = interval_s

    async def WatchPodEvents(
        self,
        request: watcher_service_pb2.WatchPodEventsRequest,
        context: grpc.aio.ServicerContext[
            watcher_service_pb2.WatchPodEventsRequest, watcher_service_pb2.WatchPodEventsResponse
        ],
    ) -> AsyncIterator[watcher_service_pb2.WatchPodEventsResponse]:
        if not self._informer.ready.is_set():
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the watcher has not finished its first list yet"
            )
        if request.snapshot and request.start_at_head:
            await abort_invalid(context, InvalidField("start_at_head", "cannot be combined with snapshot"))
        after = await logstream.start_cursor(self._log, request, context)
        with metrics.subscribers[metrics.Stream.POD_EVENTS].track_inprogress():
            if request.snapshot:
                after, pods = self._informer.snapshot()
                events = []
                for event in pods:
                    event.type, event.cursor = watcher_service_pb2.POD_EVENT_TYPE_SNAPSHOT, after
                    events.append(event)
                events.append(
                    PodEvent(type=watcher_service_pb2.POD_EVENT_TYPE_SNAPSHOT_COMPLETE, cursor=after)
                )
                for start in range(0, len(events), SNAPSHOT_CHUNK):
                    yield watcher_service_pb2.WatchPodEventsResponse(
                        events=events[start : start + SNAPSHOT_CHUNK]
                    )
            # A snapshot always has a message (its end marker), which has carried the headers.
            async for entries in logstream.serve_log(
                self._log, after, context, interval_s=self._interval_s, headers_sent=request.snapshot
            ):
                yield encoded.response(entries)


async def serve(settings: WatcherSettings) -> None:
    log = get_logger(service="watcher")
    kube = KubeClient(load_connection(settings.kubeconfig))
    events: MemoryLog[bytes] = MemoryLog(settings.event_retention)
    informer = Informer(
        kube=kube,
        log=events,
        label_selector=podmeta.executor_selector(settings.executor_id),
        namespaces=settings.namespaces,
        watch_timeout_s=settings.watch_timeout_s,
        inactivity_timeout_s=settings.inactivity_timeout_s,
    )
    watcher_metrics.observe_informer(lambda: informer.last_heard, lambda: events.head)
    server = GrpcServer(settings, service_names=[SERVICE_NAME])
    watcher_service_pb2_grpc.add_WatcherServiceServicer_to_server(
        WatcherServicer(informer, events, interval_s=settings.stream_interval_s), server.server
    )
    await server.start()
    supervisor = Supervisor(server)
    supervisor.spawn(informer.run(), name="informer")

    async def mark_ready() -> None:
        await informer.ready.wait()
        await server.set_serving(True)
        log.info(
            "ready: first list done", namespaces=settings.namespaces or "*", pods=len(informer.snapshot()[1])
        )

    supervisor.spawn(mark_ready(), name="readiness", finishes=True)
    await supervisor.run_until_stopped(settings.shutdown_grace_s)
    await kube.close()
    supervisor.raise_if_failed()


def main(argv: Sequence[str] | None = None) -> None:
    settings = WatcherSettings.load(argv)
    configure("watcher", settings.log_level, json=settings.log_json)
    tracing.configure(settings, "watcher")
    run(serve(settings), settings)
