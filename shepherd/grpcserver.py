"""The gRPC plumbing every service shares, so each service's server.py stays about its RPCs.

- grpc.aio server with the request-context interceptor and keepalive settings that survive
  meshes and idle load balancers;
- the standard grpc.health.v1 service, NOT_SERVING until the service says it is ready;
- server reflection, so grpcurl and ghz need no .proto files;
- SIGTERM/SIGINT: health flips to NOT_SERVING, new RPCs are refused, running ones get
  `shutdown_grace_s` to finish, then the service's own shutdown runs;
- health is SERVING only while every Readiness condition holds (started, and the store can write);
- `run` turns a failed start (a store that cannot be used) or a failed root task (see
  supervisor.py) into one logged line and a non-zero exit, never a bare traceback.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shepherd import failpoints
from shepherd.interceptors import RequestContextInterceptor
from shepherd.logging import get_logger
from shepherd.sqlite import StoreUnavailable
from shepherd.supervisor import ServiceFailed

# grpc ships no type information; servicer methods annotate their context with this alias.
Context: TypeAlias = Any

# Keepalive: ping idle connections so half-open ones (a vanished peer, a NAT that forgot us) are
# found within a minute; allow clients to ping as often as every 10 s without being cut off.
_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]


# Young-generation collections every 20,000 allocations instead of 700: each request allocates
# many short-lived containers (parsed JSON, protobufs), and every 10th young collection also walks
# the middle generation. Fewer, larger collections cost less CPU; the memory they hold back is small.
_GC_THRESHOLDS = (20_000, 10, 10)


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a service's main coroutine on uvloop (grpc.aio supports it; it costs less CPU per RPC)."""
    import uvloop

    failpoints.configure()  # fault tests arm named failure points through the environment
    gc.set_threshold(*_GC_THRESHOLDS)
    try:
        uvloop.run(main)
    except ServiceFailed:
        sys.exit(1)  # the supervisor has logged the cause; a restart recovers
    except StoreUnavailable as err:  # at start: the store cannot be opened, or cannot write
        get_logger().error(f"cannot start: {err}", store=err.path)
        sys.exit(1)


class Readiness(enum.Enum):
    """What must hold for a service to report SERVING; each condition is reported on its own."""

    STARTED = enum.auto()  # start-up is done (the watcher's first list, the reconciler in sync...)
    STORE = enum.auto()  # the service's store can write


class _MethodAwarePool:
    """The default descriptor pool, but `pkg.Service.Method` also resolves to the service's file.

    ghz and `grpcurl describe` look methods up by that name; Python's pool only knows messages,
    enums and services by symbol, so without this they answer "Symbol not found"."""

    def __init__(self) -> None:
        self._pool = descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str) -> Any:  # noqa: N802 - the pool's own API
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            found = self._pool.FindServiceByName(service)
            if method not in found.methods_by_name:
                raise
            return found.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


class GrpcServer:
    """One service's server: create, register servicers, start, set_serving, run_until_signal."""

    def __init__(self, *, host: str, port: int, service_names: Sequence[str]) -> None:
        self.server = grpc.aio.server(interceptors=[RequestContextInterceptor()], options=_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        self._unmet = {Readiness.STARTED}
        self._frozen = False
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME],
            self.server,
            pool=_MethodAwarePool(),
        )
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self._stop = asyncio.Event()
        self._log = get_logger(component="grpc")

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()
        self._log.info("listening", port=self.port, services=self.service_names)

    async def set_serving(self, serving: bool, *, condition: Readiness = Readiness.STARTED) -> None:
        """Report whether `condition` holds; health is SERVING while all of them do."""
        if serving:
            self._unmet.discard(condition)
        else:
            self._unmet.add(condition)
        serving = not self._unmet
        if serving and not self._frozen:
            # What start-up built (modules, descriptors, settings, the first list) lives as long as
            # the process: moved out of the collector's sight, full collections stop re-walking it.
            gc.collect()
            gc.freeze()
            self._frozen = True
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_for_stop_signal(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()
        self._log.info("stop requested: draining")

    async def drain(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        self._log.info("drained")
