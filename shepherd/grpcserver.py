"""The gRPC plumbing every service shares, so each service's server.py stays about its RPCs.

- grpc.aio server with keepalive settings that survive meshes and idle load balancers, secured
  as the settings say (shepherd.security: mutual TLS by default), and the interceptor that
  identifies each caller, applies the authorization policy and the resource bounds;
- the service's own client channels present the same identity (shepherd.channels.configure);
- the standard grpc.health.v1 service, NOT_SERVING until the service says it is ready, also on
  an optional plaintext port of its own for the kubelet's gRPC probes (which cannot do TLS);
- server reflection, so grpcurl and ghz need no .proto files;
- SIGTERM/SIGINT: health flips to NOT_SERVING, new RPCs are refused, running ones get
  `shutdown_grace_s` to finish, then the service's own shutdown runs;
- readiness (the empty health service name and the service's own) is SERVING only while every
  Readiness condition holds (started, the store can write, and the API server or the upstream
  streams where the service needs them); shepherd_serving and shepherd_health_condition_unmet say
  so, and which condition is unmet. Liveness (the name LIVENESS, which the kubelet's liveness
  probe asks for) is SERVING until a root task dies: an outage is waited out, never restarted;
- Prometheus metrics (shepherd.metrics) in plaintext on `metrics_port`, when set;
- `run` turns a failed start (a store that cannot be used, a port that cannot be bound) or a
  failed root task (see supervisor.py) into one logged line and a non-zero exit, never a bare
  traceback.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from shepherd import authz, channels, failpoints, metrics, security, tracing
from shepherd.authn import Authenticator, CertificateAuthenticator, MeshAuthenticator, TokenAuthenticator
from shepherd.interceptors import Guard, RequestContextInterceptor
from shepherd.limits import LaunchRate, StreamSlots
from shepherd.logging import get_logger
from shepherd.readiness import LIVENESS, Readiness
from shepherd.settings import ClientAuth, ServiceSettings
from shepherd.sqlite import StoreUnavailable
from shepherd.supervisor import ServiceFailed

# grpc ships no type information; servicer methods annotate their context with this alias.
Context: TypeAlias = Any

# Keepalive: ping idle connections so half-open ones (a vanished peer, a NAT that forgot us) are
# found within a minute; allow clients to ping as often as every 10 s without being cut off.
_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
]
# Answers may be larger than requests (a page of 1,000 tasks, a log tail); Shepherd's own clients
# accept as much (shepherd.channels).
_MAX_SEND_BYTES = channels.MAX_MESSAGE_BYTES


# Young-generation collections every 20,000 allocations instead of 700: each request allocates
# many short-lived containers (parsed JSON, protobufs), and every 10th young collection also walks
# the middle generation. Fewer, larger collections cost less CPU; the memory they hold back is small.
_GC_THRESHOLDS = (20_000, 10, 10)


def run(main: Coroutine[Any, Any, None], settings: ServiceSettings) -> None:
    """Run a service's main coroutine on uvloop (grpc.aio supports it; it costs less CPU per RPC),
    its client channels presenting the identity its settings give it."""
    import uvloop

    failpoints.configure()  # fault tests arm named failure points through the environment
    try:
        channels.configure(security.transport(settings).client)
    except security.TransportError as err:
        main.close()
        get_logger(component="grpc").error("refusing to start", reason=str(err))
        raise SystemExit(2) from None
    gc.set_threshold(*_GC_THRESHOLDS)
    try:
        uvloop.run(main)
    except ServiceFailed:
        sys.exit(1)  # the supervisor has logged the cause; a restart recovers
    except StoreUnavailable as err:  # at start: the store cannot be opened, or cannot write
        get_logger().error(f"cannot start: {err}", store=err.path)
        sys.exit(1)
    except PortUnavailable as err:  # at start: a port in use (another process, a second instance)
        get_logger().error(f"cannot start: {err}", setting=err.setting, address=err.address)
        sys.exit(1)
    finally:
        tracing.shutdown()  # export the spans still buffered


# The health service name the kubelet's liveness probe asks for (deploy/: `livenessProbe.grpc.
# service`). Readiness is the empty name and the service's own (`shepherd.v1.LauncherService`...),
# SERVING while every Readiness condition holds; an outage the service waits out (the API server,
# an upstream stream, a store that cannot write) or a slow start makes it NOT_SERVING, and a
# restart would cure none of them. Liveness is SERVING from start until a root task dies (the
# supervisor's crash-only stop, GrpcServer.fail) or the service drains: only a restart cures that.
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class PortUnavailable(Exception):
    """A port the settings name cannot be bound (another process has it, or it is not allowed)."""

    def __init__(self, setting: str, address: str, cause: str) -> None:
        super().__init__(f"{setting}: cannot listen on {address}: {cause}")
        self.setting = setting
        self.address = address


def _add_port(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    if credentials is None:
        return int(server.add_insecure_port(address))
    return int(server.add_secure_port(address, credentials))


def _bind(setting: str, address: str, add: Callable[[], int]) -> int:
    """grpc says only "Failed to bind" (its C core logs the errno); the cause is almost always a
    port in use, so that is what the message suggests."""
    try:
        return add()
    except RuntimeError:
        cause = f"{os.strerror(errno.EADDRINUSE).lower()}, or not allowed"
        raise PortUnavailable(setting, address, cause) from None


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


# grpcio-reflection serves only v1alpha; grpcurl, ghz and newer clients ask for v1 first. The two
# protos differ in their package alone (same messages, same field numbers), so one servicer
# answers both, and the v1 file is registered in the pool so `describe` resolves it too.
_REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _register_reflection_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(_REFLECTION_V1)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # proto2: assigning "" would mark a scalar as typed
                field.type_name = field.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    proto.name = "grpc/reflection/v1/reflection.proto"
    proto.package = "grpc.reflection.v1"
    proto.options.Clear()
    pool.Add(proto)


def _enable_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    _register_reflection_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer(
        [*service_names, _REFLECTION_V1, reflection.SERVICE_NAME], pool=_MethodAwarePool()
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


def _authenticator(settings: ServiceSettings, mode: security.Mode) -> Authenticator | None:
    if mode is security.Mode.MTLS:
        return CertificateAuthenticator()
    if mode is security.Mode.TOKEN:
        return TokenAuthenticator(
            settings.kubeconfig, settings.trust_domain, authz.split_list(settings.token_audiences)
        )
    if mode is security.Mode.MESH:
        return MeshAuthenticator(settings.client_auth is ClientAuth.LINKERD, settings.trust_domain)
    return None


def _guard(settings: ServiceSettings, mode: security.Mode) -> Guard:
    rules = (
        authz.load_policy(settings.auth_policy)
        if settings.auth_policy is not None
        else authz.default_policy(settings.trust_domain)
    )
    return Guard(
        authenticator=_authenticator(settings, mode),
        policy=authz.Policy(rules, authz.split_list(settings.open_rpcs)),
        streams=StreamSlots(settings.max_streams_per_identity, settings.max_streams),
        max_inflight_unary=settings.max_inflight_unary,
        launch_rate=LaunchRate(settings.launch_rate, settings.launch_burst),
    )


class GrpcServer:
    """One service's server: create, register servicers, start, set_serving, run_until_signal."""

    def __init__(self, settings: ServiceSettings, *, service_names: Sequence[str]) -> None:
        self.transport = security.transport(settings)
        self.guard = _guard(settings, self.transport.mode)
        options = [
            *_KEEPALIVE,
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
            ("grpc.max_send_message_length", _MAX_SEND_BYTES),
        ]
        self.server = grpc.aio.server(interceptors=[RequestContextInterceptor(self.guard)], options=options)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        self._unmet = {Readiness.STARTED}
        self._frozen = False
        _enable_reflection(self.server, [*self.service_names, health.SERVICE_NAME])
        address = f"{settings.host}:{settings.port}"
        credentials = self.transport.server_credentials
        self.port = _bind("port", address, lambda: _add_port(self.server, address, credentials))
        # The kubelet's gRPC probes cannot do TLS: health alone, in plaintext, on a port of its own.
        self.health_server: grpc.aio.Server | None = None
        self.health_port = 0
        if settings.health_port:
            health_server = self.health_server = grpc.aio.server(options=_KEEPALIVE)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, health_server)
            health_address = f"{settings.host}:{settings.health_port}"
            self.health_port = _bind(
                "health_port", health_address, lambda: health_server.add_insecure_port(health_address)
            )
        # Prometheus scrapes in plaintext, like the kubelet's probes: a port of its own.
        self.metrics = (
            metrics.MetricsServer(settings.host, settings.metrics_port) if settings.metrics_port else None
        )
        self._stop = asyncio.Event()
        self._log = get_logger(component="grpc")

    async def start(self) -> None:
        """Serve; PortUnavailable (before anything listens) when the metrics port cannot be bound."""
        if self.metrics is not None:
            try:
                await self.metrics.start()
            except OSError as err:
                cause = os.strerror(err.errno).lower() if err.errno else str(err)
                address = f"{self.metrics.host}:{self.metrics.wanted_port}"
                raise PortUnavailable("metrics_port", address, cause) from None
        await self.health.set(LIVENESS, _SERVING)
        await self.set_serving(False)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        for warning in self.transport.warnings:
            self._log.warning(warning)
        self._log.info(
            "listening",
            port=self.port,
            services=self.service_names,
            transport=self.transport.mode.value,
            health_port=self.health_port or None,
            metrics_port=self.metrics.port if self.metrics is not None else None,
            policy_rules=[rule.name for rule in self.guard.policy.rules]
            if self.transport.authenticates
            else None,
        )

    async def set_serving(self, serving: bool, *, condition: Readiness = Readiness.STARTED) -> None:
        """Report whether `condition` holds; health is SERVING while all of them do."""
        if serving:
            self._unmet.discard(condition)
        else:
            self._unmet.add(condition)
        metrics.unmet[condition].set(condition in self._unmet)
        serving = not self._unmet
        metrics.SERVING.set(serving)
        if serving and not self._frozen:
            # What start-up built (modules, descriptors, settings, the first list) lives as long as
            # the process: moved out of the collector's sight, full collections stop re-walking it.
            gc.collect()
            gc.freeze()
            self._frozen = True
        status = _SERVING if serving else _NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def fail(self) -> None:
        """A root task died (shepherd.supervisor): not ready, and no longer alive, so the kubelet
        restarts the container even if draining takes long."""
        await self.set_serving(False)
        await self.health.set(LIVENESS, _NOT_SERVING)

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
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.metrics is not None:
            await self.metrics.stop()
        if self.guard.authenticator is not None:
            await self.guard.authenticator.close()
        self._log.info("drained")
