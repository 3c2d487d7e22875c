"""The shared gRPC server's guard, in process with a stand-in servicer (no Kubernetes needed):
the bound on unary calls in flight, and mesh mode's identity from x-forwarded-client-cert."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.identities import GrpcAuthority
from shepherd import channels
from shepherd.grpcserver import GrpcServer
from shepherd.settings import ClientAuth, ServiceSettings
from shepherd.v1 import launcher_service_pb2 as lpb
from shepherd.v1 import launcher_service_pb2_grpc as lpb_grpc
from tests.helpers import task_key

SERVICE = lpb.DESCRIPTOR.services_by_name["LauncherService"].full_name


class HeldLauncher(lpb_grpc.LauncherServiceServicer):
    """LaunchTask waits until released, so a test can hold calls in flight; the other RPCs keep
    the generated UNIMPLEMENTED answers (the stubs declare them abstract, hence the ignores)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def LaunchTask(self, request: lpb.LaunchTaskRequest, context: Any) -> lpb.LaunchTaskResponse:  # noqa: N802
        self.entered.set()
        await self.release.wait()
        return lpb.LaunchTaskResponse(launch=lpb.Launch(key=request.key, attempt=1))

    async def GetLaunch(self, request: lpb.GetLaunchRequest, context: Any) -> lpb.GetLaunchResponse:  # noqa: N802
        return lpb.GetLaunchResponse(launch=lpb.Launch(key=request.key, attempt=1))


async def serving(settings: ServiceSettings, servicer: HeldLauncher) -> AsyncIterator[GrpcServer]:
    server = GrpcServer(settings, service_names=[SERVICE])
    lpb_grpc.add_LauncherServiceServicer_to_server(servicer, server.server)
    await server.start()
    try:
        yield server
    finally:
        servicer.release.set()
        await server.server.stop(0)


@pytest.fixture
def pki(tmp_path: Path) -> GrpcAuthority:
    return GrpcAuthority(tmp_path)


async def test_unary_calls_beyond_the_bound_are_refused_until_one_ends(pki: GrpcAuthority) -> None:
    own = pki.service("launcher")
    settings = ServiceSettings(
        host="127.0.0.1", port=0, tls_cert=own.cert, tls_key=own.key, tls_ca=own.ca, max_inflight_unary=1
    )
    servicer = HeldLauncher()  # type: ignore[abstract]
    async for server in serving(settings, servicer):
        address = f"127.0.0.1:{server.port}"
        async with channels.aio_channel(address, pki.scheduler().credentials()) as channel:
            stub = lpb_grpc.LauncherServiceStub(channel)
            held = asyncio.ensure_future(stub.LaunchTask(lpb.LaunchTaskRequest(key=task_key())))
            await asyncio.wait_for(servicer.entered.wait(), 30)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetLaunch(lpb.GetLaunchRequest(key=task_key()), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "at most 1" in (refused.value.details() or "")
            servicer.release.set()
            assert (await held).launch.attempt == 1
            assert (
                await stub.GetLaunch(lpb.GetLaunchRequest(key=task_key()), timeout=10)
            ).launch.attempt == 1


async def test_mesh_mode_takes_the_caller_from_the_sidecars_header() -> None:
    settings = ServiceSettings(host="127.0.0.1", port=0, client_auth=ClientAuth.MESH)
    servicer = HeldLauncher()  # type: ignore[abstract]
    servicer.release.set()

    def xfcc(uri: str) -> tuple[tuple[str, str], ...]:
        return (
            (
                "x-forwarded-client-cert",
                f"By=spiffe://cluster.local/ns/shepherd/sa/launcher;Hash=ab;URI={uri}",
            ),
        )

    async for server in serving(settings, servicer):
        async with channels.aio_channel(f"127.0.0.1:{server.port}", channels.PLAINTEXT) as channel:
            stub = lpb_grpc.LauncherServiceStub(channel)
            request = lpb.GetLaunchRequest(key=task_key())
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetLaunch(request, timeout=10)
            assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Istio does not strip Linkerd's header, so a client could forge it: it is not read.
            forged = (("l5d-client-id", "reconciler.shepherd.serviceaccount.identity.linkerd.cluster.local"),)
            with pytest.raises(grpc.aio.AioRpcError) as ignored:
                await stub.GetLaunch(request, metadata=forged, timeout=10)
            assert ignored.value.code() == grpc.StatusCode.UNAUTHENTICATED
            scheduler = "spiffe://cluster.local/ns/schedulers/sa/airflow"
            assert (await stub.GetLaunch(request, metadata=xfcc(scheduler), timeout=10)).launch.attempt == 1
            relaunch = lpb.RelaunchTaskRequest(key=task_key(), from_attempt=1)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.RelaunchTask(relaunch, metadata=xfcc(scheduler), timeout=10)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (
                denied.value.details()
                == f"{scheduler} may not call /shepherd.v1.LauncherService/RelaunchTask"
            )


async def test_mesh_mode_takes_a_linkerd_callers_identity_from_l5d_client_id() -> None:
    """Linkerd's inbound proxy sets l5d-client-id from the peer certificate it verified (and
    strips one a client sent); its DNS-like name maps to the same SPIFFE ID the policy uses."""
    settings = ServiceSettings(host="127.0.0.1", port=0, client_auth=ClientAuth.LINKERD)
    servicer = HeldLauncher()  # type: ignore[abstract]
    servicer.release.set()

    def l5d(account: str, namespace: str) -> tuple[tuple[str, str], ...]:
        return (("l5d-client-id", f"{account}.{namespace}.serviceaccount.identity.linkerd.cluster.local"),)

    async for server in serving(settings, servicer):
        async with channels.aio_channel(f"127.0.0.1:{server.port}", channels.PLAINTEXT) as channel:
            stub = lpb_grpc.LauncherServiceStub(channel)
            request = lpb.GetLaunchRequest(key=task_key())
            assert (
                await stub.GetLaunch(request, metadata=l5d("airflow", "schedulers"), timeout=10)
            ).launch.attempt == 1
            relaunch = lpb.RelaunchTaskRequest(key=task_key(), from_attempt=1)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.RelaunchTask(relaunch, metadata=l5d("airflow", "schedulers"), timeout=10)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (denied.value.details() or "").startswith(
                "spiffe://cluster.local/ns/schedulers/sa/airflow "
            )
            with pytest.raises(grpc.aio.AioRpcError) as odd:
                await stub.GetLaunch(request, metadata=(("l5d-client-id", "not-an-identity"),), timeout=10)
            assert odd.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Linkerd does not strip Istio's header, so a client could forge it: it is not read.
            forged = (("x-forwarded-client-cert", "URI=spiffe://cluster.local/ns/shepherd/sa/reconciler"),)
            with pytest.raises(grpc.aio.AioRpcError) as ignored:
                await stub.GetLaunch(request, metadata=forged, timeout=10)
            assert ignored.value.code() == grpc.StatusCode.UNAUTHENTICATED
