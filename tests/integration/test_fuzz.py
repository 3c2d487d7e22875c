"""Fuzzing every RPC of the three services with Hypothesis-generated requests (and raw bytes): no
answer is UNKNOWN or INTERNAL, every INVALID_ARGUMENT names its field, and every service is still
SERVING afterwards.

The services run as one stack of their own, with a launcher whose API server is unreachable: the
accepted launches fail fast instead of filling the shared cluster with pods. Requests are sent
concurrently as they are generated (at most IN_FLIGHT at a time), and checked when answered; a
failure lists the requests that broke a rule. SHEPHERD_FUZZ_EXAMPLES sets the requests per RPC
(2,000 by default; `make fuzz` sends more).
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane import ClusterInfo
from controlplane.stack import SERVICES, ServiceStack
from shepherd import channels
from shepherd.errors import field_violation
from shepherd.v1 import launcher_service_pb2, reconciler_service_pb2, watcher_service_pb2
from tests.helpers import fuzzing

pytestmark = pytest.mark.integration
EXAMPLES = int(os.environ.get("SHEPHERD_FUZZ_EXAMPLES", "2000"))
IN_FLIGHT = 32
STREAM_WAIT_S = 0.5  # a stream call is judged on its first answer, or on being still open then
BUGS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
RPCS: list[tuple[str, MethodDescriptor]] = [
    (service, method)
    for service, module in zip(
        SERVICES, (launcher_service_pb2, watcher_service_pb2, reconciler_service_pb2), strict=True
    )
    for descriptor in module.DESCRIPTOR.services_by_name.values()
    for method in descriptor.methods
]


@pytest.fixture(scope="module")
def fuzz_stack(cluster: ClusterInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    workdir = tmp_path_factory.mktemp("fuzz")
    durable = ["--store-synchronous", "OFF"]
    # Fuzzed launches must make no pods: the launcher's namespace is one it may not create pods in
    # (no such namespace, no Role there), so every create is refused for good, while the API server
    # stays reachable and the launcher truthfully SERVING.
    void = ["--namespace", f"fuzz-void-{uuid.uuid4().hex[:8]}"]
    stack = ServiceStack(
        cluster,
        workdir,
        executor_id=f"fuzz-{uuid.uuid4().hex[:8]}",
        flags={"launcher": [*durable, *void], "reconciler": durable},
    )
    stack.start()
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def sync_channels(fuzz_stack: ServiceStack) -> Iterator[dict[str, grpc.Channel]]:
    opened = {name: channels.sync_channel(fuzz_stack.address(name)) for name in SERVICES}
    yield opened
    for channel in opened.values():
        channel.close()


def _call(channel: grpc.Channel, method: MethodDescriptor, request: Message | bytes) -> Message | None:
    """One call; the reply (the first message of a stream), None for a stream still open, or the
    RpcError raised."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    raw = isinstance(request, bytes)
    serialize = None if isinstance(request, bytes) else type(request).SerializeToString
    if method.server_streaming:
        stream = channel.unary_stream(path, request_serializer=serialize)(request, timeout=STREAM_WAIT_S)
        try:
            first = next(stream, None)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # open and quiet: fine
                return None
            raise
        finally:
            stream.cancel()
        return None if first is None or raw else _decode(method, first)
    reply = channel.unary_unary(path, request_serializer=serialize)(request, timeout=30)
    return None if raw else _decode(method, reply)


def _decode(method: MethodDescriptor, data: bytes) -> Message:
    message: Message = message_factory.GetMessageClass(method.output_type)()
    message.ParseFromString(data)
    return message


def _problem(method: MethodDescriptor, request: Message | bytes, outcome: Any) -> str | None:
    """What is wrong with one answer, or None."""
    if isinstance(outcome, grpc.RpcError):
        code = outcome.code()
        if code in BUGS:
            return f"{code.name}: {outcome.details()}"
        invalid = code == grpc.StatusCode.INVALID_ARGUMENT and not isinstance(request, bytes)
        if invalid and not field_violation(outcome):
            return f"INVALID_ARGUMENT without a field: {outcome.details()}"
        return None
    if isinstance(outcome, BaseException):
        return f"the client failed: {outcome!r}"
    if isinstance(outcome, launcher_service_pb2.BatchLaunchTasksResponse):
        for i, result in enumerate(outcome.results):
            if result.HasField("error"):
                if result.error.code in (c.value[0] for c in BUGS):
                    return f"item {i}: code {result.error.code}: {result.error.message}"
                if result.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not result.error.field:
                    return f"item {i}: INVALID_ARGUMENT without a field: {result.error.message}"
    if isinstance(outcome, launcher_service_pb2.RenderPodResponse):
        try:
            json.loads(outcome.pod_json)
        except ValueError as err:
            return f"pod_json is not JSON: {err}"
        if outcome.allowed == bool(outcome.violations) or not all(v.field for v in outcome.violations):
            return f"an inconsistent verdict: {outcome}"
    return None


@pytest.mark.parametrize(("service", "method"), RPCS, ids=[m.name for _, m in RPCS])
def test_no_request_breaks_an_rpc(
    service: str, method: MethodDescriptor, sync_channels: dict[str, grpc.Channel], fuzz_stack: ServiceStack
) -> None:
    channel = sync_channels[service]
    slots = threading.BoundedSemaphore(IN_FLIGHT)
    sent: list[tuple[Message | bytes, Future[Any]]] = []

    def run(request: Message | bytes) -> Any:
        try:
            return _call(channel, method, request)
        except grpc.RpcError as err:
            return err
        except Exception as err:  # reported as a problem with the request, not lost in a thread
            return err
        finally:
            slots.release()

    strategy = st.one_of(fuzzing.requests(method.input_type), st.binary(max_size=300))
    with ThreadPoolExecutor(IN_FLIGHT) as pool:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def send(request: Message | bytes) -> None:
            slots.acquire()
            sent.append((request, pool.submit(run, request)))

        send()
    problems = [
        f"{problem}\n    request: {request!r}"[:2000]
        for request, future in sent
        if (problem := _problem(method, request, future.result())) is not None
    ]
    assert len(sent) >= min(EXAMPLES, 500)
    assert not problems, f"{len(problems)} of {len(sent)} requests broke {method.name}:\n" + "\n".join(
        problems[:10]
    )
    for name in SERVICES:
        proc = fuzz_stack.procs[name]
        assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{fuzz_stack.tail(name)}"
        health = health_pb2_grpc.HealthStub(sync_channels[name]).Check(
            health_pb2.HealthCheckRequest(), timeout=30
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING, name
