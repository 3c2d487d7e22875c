"""Who may call what, on the real services: mutual TLS refuses clients without a trusted
certificate, the default policy refuses a scheduler what only the reconciler may do, and bearer
tokens are checked with the real API server's TokenReview. No token or key reaches a log."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane import Cluster, ClusterInfo
from controlplane.identities import GrpcAuthority
from controlplane.pki import Authority
from controlplane.stack import ServiceStack
from shepherd import channels, podmeta
from shepherd.settings import ClientAuth
from shepherd.taskstates import TERMINAL
from shepherd.v1 import launcher_service_pb2 as lpb
from shepherd.v1 import launcher_service_pb2_grpc, reconciler_service_pb2, reconciler_service_pb2_grpc
from tests.helpers import core_api, task_key, unique_name
from tests.helpers.scheduler import SchedulerClient

pytestmark = pytest.mark.integration
SCHEDULERS = "schedulers"


def launch_request(key: Any) -> lpb.LaunchTaskRequest:
    return lpb.LaunchTaskRequest(
        key=key,
        command=["run"],
        pod_override_yaml="metadata: {annotations: {sim.shepherd.dev/run-time: 200ms}}",
    )


async def launch_as(
    stack: ServiceStack, credentials: channels.ClientCredentials, key: Any
) -> grpc.aio.AioRpcError | lpb.LaunchTaskResponse:
    async with channels.aio_channel(stack.address("launcher"), credentials) as channel:
        try:
            reply: lpb.LaunchTaskResponse = await launcher_service_pb2_grpc.LauncherServiceStub(
                channel
            ).LaunchTask(launch_request(key), timeout=10)
            return reply
        except grpc.aio.AioRpcError as err:
            return err


async def never_launched(stack: ServiceStack, key: Any) -> None:
    """The launcher has no launch for `key`, and the API server no pod for it."""
    async with stack.channel("launcher") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await launcher_service_pb2_grpc.LauncherServiceStub(channel).GetLaunch(
                lpb.GetLaunchRequest(key=key), timeout=10
            )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    pods = core_api(stack.cluster.admin_kubeconfig).list_namespaced_pod(
        stack.cluster.namespace, label_selector=f"shepherd.dev/executor-id={stack.executor_id}"
    )
    assert podmeta.pod_name(key) not in {p.metadata.name for p in pods.items}


async def test_a_client_without_a_trusted_certificate_is_refused(stack: ServiceStack, tmp_path: Path) -> None:
    await refuse_untrusted_clients(stack, tmp_path)


async def refuse_untrusted_clients(stack: ServiceStack, tmp_path: Path) -> None:
    key = task_key(task_id=unique_name("nocert"))
    ca = GrpcAuthority(Path(stack.cluster.state_dir)).ca
    # A look-alike authority: same SPIFFE ID as the real scheduler, but a CA the services never trusted.
    rogue = Authority(tmp_path / "rogue", ca_name="shepherd-grpc-ca")
    forged = rogue.issue("scheduler", common_name="scheduler", uris=[stack.identities["scheduler"].spiffe_id])
    attempts = {
        "plaintext": channels.PLAINTEXT,
        "TLS without a client certificate": channels.ClientCredentials(ca=ca),
        "a certificate from another CA": channels.ClientCredentials(ca=ca, cert=forged.cert, key=forged.key),
    }
    for what, credentials in attempts.items():
        outcome = await launch_as(stack, credentials, key)
        assert isinstance(outcome, grpc.aio.AioRpcError), f"{what} was let in"
        assert outcome.code() == grpc.StatusCode.UNAVAILABLE, what  # the handshake fails
    await never_launched(stack, key)


async def test_a_trusted_certificate_the_policy_does_not_name_is_denied(stack: ServiceStack) -> None:
    await deny_a_stranger(stack)


async def deny_a_stranger(stack: ServiceStack) -> None:
    key = task_key(task_id=unique_name("stranger"))
    stranger = stack.authority.client("other", "stranger")
    outcome = await launch_as(stack, stranger.credentials(), key)
    assert isinstance(outcome, grpc.aio.AioRpcError)
    assert outcome.code() == grpc.StatusCode.PERMISSION_DENIED
    assert outcome.details() == f"{stranger.spiffe_id} may not call /shepherd.v1.LauncherService/LaunchTask"
    await never_launched(stack, key)


async def test_only_the_reconciler_may_relaunch(stack: ServiceStack, client: SchedulerClient) -> None:
    key = task_key(task_id=unique_name("relaunch-authz"))
    await client.launch(key, annotations={"sim.shepherd.dev/run-time": "200ms"})
    task = await client.final(key)
    assert task.state in TERMINAL
    scheduler = stack.identities["scheduler"].spiffe_id
    # Let in, this would make a second pod (the launcher trusts its caller that attempt 1 was lost).
    request = lpb.RelaunchTaskRequest(key=key, from_attempt=1)
    async with stack.channel("launcher", identity="scheduler") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await launcher_service_pb2_grpc.LauncherServiceStub(channel).RelaunchTask(request, timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert scheduler in (denied.value.details() or "")
    assert "/shepherd.v1.LauncherService/RelaunchTask" in (denied.value.details() or "")
    # The reconciler is let in. It asks about an attempt that is not the current one, which the
    # launcher answers without relaunching, so the task stays as it is.
    stale = lpb.RelaunchTaskRequest(key=key, from_attempt=2)
    async with stack.channel("launcher", identity="reconciler") as channel:
        stub = launcher_service_pb2_grpc.LauncherServiceStub(channel)
        reply = await stub.RelaunchTask(stale, timeout=10)
    assert not reply.relaunched
    assert reply.launch.attempt == 1
    # The denial is in the launcher's log, naming who and what.
    denials = [
        line
        for line in stack.log_path("launcher").read_text().splitlines()
        if '"permission denied"' in line and scheduler in line and "RelaunchTask" in line
    ]
    assert denials
    # And the task is untouched: one terminal state, one pod.
    assert [s for s in client.states(key) if s in TERMINAL] == [task.state]
    creates = audit_creates(podmeta.pod_name(key))
    assert creates == 1


def audit_creates(pod: str) -> int:
    pattern = f'"/api/v1/namespaces/shepherd/pods/{pod}"'
    name_pattern = f'"name":"{pod}"'
    count = 0
    for line in Cluster().audit_log.read_text().splitlines():
        if '"verb":"create"' in line and (pattern in line or name_pattern in line) and '"code":201' in line:
            count += 1
    return count


async def test_the_launcher_may_read_a_task_but_not_cancel_it(stack: ServiceStack) -> None:
    key = task_key(task_id=unique_name("launcher-gettask"))
    async with stack.channel("reconciler", identity="launcher") as channel:
        stub = reconciler_service_pb2_grpc.ReconcilerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as read:
            await stub.GetTask(reconciler_service_pb2.GetTaskRequest(key=key), timeout=10)
        assert read.value.code() == grpc.StatusCode.NOT_FOUND  # let in; the task is unknown
        with pytest.raises(grpc.aio.AioRpcError) as cancel:
            await stub.CancelTask(reconciler_service_pb2.CancelTaskRequest(key=key), timeout=10)
        assert cancel.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ---- bearer tokens ---------------------------------------------------------------------------


def service_account_token(namespace: str, name: str) -> str:
    """A token for ServiceAccount namespace/name from the TokenRequest API (made if missing)."""
    admin = Cluster()._admin()
    admin.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    admin.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}
    )
    reply = admin.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": ["https://kubernetes.default.svc.cluster.local"],
                "expirationSeconds": 3600,
            },
        },
    )
    token: str = reply["status"]["token"]
    return token


@pytest.fixture(scope="module")
def token_stack(cluster: ClusterInfo, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The three services with bearer-token callers: they present their own ServiceAccount tokens."""
    services = ServiceStack(
        cluster,
        tmp_path_factory.mktemp("token-stack"),
        executor_id=f"token-{unique_name('x')[-6:]}",
        client_auth=ClientAuth.TOKEN,
    )
    services.token_path("scheduler").parent.mkdir(parents=True, exist_ok=True)
    services.token_path("scheduler").write_text(service_account_token(SCHEDULERS, "token-scheduler"))
    services.start()
    yield services
    services.stop_all()


def with_token(stack: ServiceStack, token: str | None, tmp_path: Path) -> channels.ClientCredentials:
    if token is None:
        return channels.ClientCredentials(ca=stack.authority.ca)
    path = tmp_path / unique_name("token")
    path.write_text(token)
    return channels.ClientCredentials(ca=stack.authority.ca, token_file=path)


async def test_bearer_tokens_are_checked_with_token_review(token_stack: ServiceStack, tmp_path: Path) -> None:
    await run_and_refuse_with_tokens(token_stack, tmp_path)


async def run_and_refuse_with_tokens(stack: ServiceStack, tmp_path: Path) -> None:
    # A scheduler with a token runs a task end to end: the reconciler follows the launcher and the
    # watcher with its own token, so the services' tokens are accepted too.
    async with SchedulerClient.connect(stack) as scheduler:
        key = task_key(task_id=unique_name("token"))
        await scheduler.launch(key, annotations={"sim.shepherd.dev/run-time": "200ms"})
        task = await scheduler.final(key)
    assert task.state in TERMINAL
    refused = {
        "no token": (None, grpc.StatusCode.UNAUTHENTICATED),
        "a forged token": ("eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl", grpc.StatusCode.UNAUTHENTICATED),
        # A real token, but of a ServiceAccount the policy does not let launch.
        "the watcher's token": (stack.token_path("watcher").read_text(), grpc.StatusCode.PERMISSION_DENIED),
    }
    for what, (token, code) in refused.items():
        key = task_key(task_id=unique_name("token-refused"))
        outcome = await launch_as(stack, with_token(stack, token, tmp_path), key)
        assert isinstance(outcome, grpc.aio.AioRpcError), f"{what} was let in"
        assert outcome.code() == code, f"{what}: {outcome.code()} {outcome.details()}"
        if token:
            assert token not in (outcome.details() or "")
        await never_launched(stack, key)


# ---- secrets stay out of logs ------------------------------------------------------------------


def secrets_in_use(cluster: ClusterInfo, stacks: list[ServiceStack]) -> dict[str, str]:
    """Every token and private key the services, their clients and the control plane hold."""
    found: dict[str, str] = {}
    for stack in stacks:
        for path in stack.workdir.glob("*.token"):
            found[f"token {path.name}"] = path.read_text().strip()
    state = Path(cluster.state_dir)
    for path in sorted(state.rglob("*.key")):
        body = "".join(line for line in path.read_text().splitlines() if not line.startswith("-----"))
        found[f"key {path.relative_to(state)}"] = body[8:72]  # a stretch of the key itself
    for path in sorted((state / "kubeconfigs").glob("*.kubeconfig")):
        text = path.read_text()
        for field in ("token", "client-key-data"):
            match = re.search(rf"{field}: (\S+)", text)
            if match:
                value = match.group(1)
                found[f"{field} {path.name}"] = value[:64]
                if field == "client-key-data":
                    found[f"{field} {path.name} (decoded)"] = (
                        base64.b64decode(value).decode().split("\n")[1][:48]
                    )
    return found


async def test_no_token_or_key_appears_in_any_log(
    stack: ServiceStack, token_stack: ServiceStack, tmp_path: Path
) -> None:
    # Calls that fail in every way a secret could leak through: a rejected token, an unknown
    # identity, a denied RPC, a refused handshake.
    await run_and_refuse_with_tokens(token_stack, tmp_path)
    await refuse_untrusted_clients(stack, tmp_path)
    await deny_a_stranger(stack)
    secrets = secrets_in_use(stack.cluster, [stack, token_stack])
    assert any(name.startswith("token ") for name in secrets)
    logs = [*(s.log_path(n) for s in (stack, token_stack) for n in ("launcher", "watcher", "reconciler"))]
    logs += sorted((Path(stack.cluster.state_dir) / "logs").glob("*.log"))
    for log in logs:
        if not log.exists():
            continue
        text = log.read_text(errors="replace")
        for name, secret in secrets.items():
            assert secret not in text, f"{name} appears in {log}"
