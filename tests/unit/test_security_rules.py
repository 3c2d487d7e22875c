"""The pure rules of transport security: which settings are refused, what the default policy
allows, how identities are read from a mesh header or a token's user, and the bounds' arithmetic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from controlplane.identities import GrpcAuthority
from shepherd import authz, security
from shepherd.authn import token_user_identity, xfcc_identity
from shepherd.limits import LaunchRate, StreamSlots
from shepherd.settings import DEFAULT_OPEN_RPCS, ClientAuth, ServiceSettings

TD = "cluster.local"
SCHEDULER = f"spiffe://{TD}/ns/schedulers/sa/airflow"
RECONCILER = f"spiffe://{TD}/ns/shepherd/sa/reconciler"
LAUNCHER = f"spiffe://{TD}/ns/shepherd/sa/launcher"
L = "/shepherd.v1.LauncherService"
R = "/shepherd.v1.ReconcilerService"
W = "/shepherd.v1.WatcherService"


def default() -> authz.Policy:
    return authz.Policy(authz.default_policy(TD), authz.split_list(DEFAULT_OPEN_RPCS))


@pytest.mark.parametrize(
    ("identity", "method", "allowed"),
    [
        (SCHEDULER, f"{L}/LaunchTask", True),
        (SCHEDULER, f"{L}/BatchLaunchTasks", True),
        (SCHEDULER, f"{R}/WatchTaskStates", True),
        (SCHEDULER, f"{R}/CancelTask", True),
        (SCHEDULER, f"{L}/RelaunchTask", False),
        (SCHEDULER, f"{L}/CancelLaunch", False),
        (SCHEDULER, f"{W}/WatchPodEvents", False),
        (RECONCILER, f"{L}/RelaunchTask", True),
        (RECONCILER, f"{L}/CancelLaunch", True),
        (RECONCILER, f"{W}/WatchPodEvents", True),
        (RECONCILER, f"{L}/LaunchTask", False),
        (LAUNCHER, f"{R}/GetTask", True),
        (LAUNCHER, f"{R}/CancelTask", False),
        (f"spiffe://{TD}/ns/other/sa/airflow", f"{L}/LaunchTask", False),
        ("spiffe://elsewhere.example/ns/schedulers/sa/airflow", f"{L}/LaunchTask", False),
        ("anonymous", f"{L}/GetLaunch", False),
    ],
)
def test_the_default_policy(identity: str, method: str, allowed: bool) -> None:
    policy = default()
    assert policy.allows(identity, method) is allowed
    assert policy.allows(identity, method) is allowed  # the cached decision is the same


def test_health_and_reflection_are_open_and_nothing_else() -> None:
    policy = default()
    assert policy.is_open("/grpc.health.v1.Health/Check")
    assert policy.is_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not policy.is_open(f"{L}/LaunchTask")
    assert not authz.Policy([], []).is_open("/grpc.health.v1.Health/Check")


def test_a_policy_file_replaces_the_default(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "rules:\n- name: ops\n  identities: ['spiffe://cluster.local/ns/ops/*']\n"
        "  rpcs: ['shepherd.v1.ReconcilerService/*']\n"
    )
    policy = authz.Policy(authz.load_policy(path), [])
    assert policy.allows("spiffe://cluster.local/ns/ops/sa/x", f"{R}/ListTasks")
    assert not policy.allows("spiffe://cluster.local/ns/ops/sa/x", f"{L}/LaunchTask")
    assert not policy.allows(SCHEDULER, f"{L}/LaunchTask")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("rules: {}", "list `rules`"),
        ("rules:\n- identities: [a]\n", "rules[0].rpcs"),
        ("rules:\n- identities: [a]\n  rpcs: [LaunchTask]\n", "package.Service/Method"),
        ("rules:\n- identities: [a]\n  rpcs: [a/b]\n  methods: [x]\n", "unknown keys"),
    ],
)
def test_a_bad_policy_file_is_refused_naming_the_place(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(authz.PolicyError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        authz.load_policy(path)


def test_the_mesh_header_names_the_client_of_the_nearest_hop() -> None:
    istio = (
        'By=spiffe://cluster.local/ns/shepherd/sa/launcher;Hash=abc;Subject="";'
        "URI=spiffe://cluster.local/ns/shepherd/sa/reconciler"
    )
    assert xfcc_identity(istio) == RECONCILER
    forwarded = 'By=x;URI=spiffe://a/ns/b/sa/c,By=y;Subject="CN=z, O=q";URI="spiffe://d/ns/e/sa/f"'
    assert xfcc_identity(forwarded) == "spiffe://d/ns/e/sa/f"
    assert xfcc_identity("By=x;Hash=abc") is None
    assert xfcc_identity("") is None


def test_a_token_user_becomes_an_identity() -> None:
    assert token_user_identity("system:serviceaccount:schedulers:airflow", TD) == SCHEDULER
    # A user that is not a ServiceAccount can never pose as a SPIFFE ID.
    assert token_user_identity("spiffe://cluster.local/ns/schedulers/sa/x", TD).startswith("user:")
    assert token_user_identity("system:serviceaccount:broken", TD) == "user:system:serviceaccount:broken"


def test_stream_slots_count_per_identity_and_in_total() -> None:
    slots = StreamSlots(per_identity=2, total=3)
    assert slots.acquire("a") is None
    assert slots.acquire("a") is None
    refused = slots.acquire("a")
    assert refused is not None
    assert "a already holds 2" in refused
    assert slots.acquire("b") is None
    refused = slots.acquire("c")
    assert refused is not None
    assert "at most 3" in refused
    slots.release("a")
    assert slots.acquire("c") is None
    assert slots.held("a") == 1


def test_the_launch_rate_lets_a_burst_through_then_asks_to_wait() -> None:
    now = [100.0]
    rate = LaunchRate(rate=10.0, burst=5, clock=lambda: now[0])
    assert [rate.take("a", 1) for _ in range(5)] == [0.0] * 5
    assert rate.take("a", 1) == pytest.approx(0.1)
    assert rate.take("b", 1) == 0.0  # per identity
    now[0] += 0.15
    assert rate.take("a", 1) == 0.0
    # A batch may drive the bucket into debt, which the next call waits out.
    now[0] += 10
    assert rate.take("a", 25) == 0.0
    assert rate.take("a", 1) == pytest.approx(2.1)
    assert LaunchRate(rate=0, burst=1).take("a", 10**6) == 0.0  # 0: no limit


def test_without_certificates_plaintext_is_allowed_on_loopback_only() -> None:
    loopback = ServiceSettings(host="127.0.0.1")
    chosen = security.transport(loopback)
    assert chosen.mode is security.Mode.PLAINTEXT
    assert chosen.warnings
    with pytest.raises(security.TransportError, match="loopback"):
        security.transport(ServiceSettings(host="0.0.0.0"))
    insecure = security.transport(ServiceSettings(host="0.0.0.0", insecure=True))
    assert insecure.mode is security.Mode.PLAINTEXT
    assert "reachable from the network" in insecure.warnings[0]
    mesh = security.transport(ServiceSettings(host="0.0.0.0", client_auth=ClientAuth.MESH))
    assert mesh.mode is security.Mode.MESH
    assert mesh.warnings


def test_incoherent_transport_settings_are_refused(tmp_path: Path) -> None:
    issued = GrpcAuthority(tmp_path).service("launcher")
    files: dict[str, Any] = {"tls_cert": issued.cert, "tls_key": issued.key, "tls_ca": issued.ca}
    with pytest.raises(ValidationError, match="go together"):
        ServiceSettings(tls_cert=issued.cert)
    with pytest.raises(ValidationError, match="no certificate files"):
        ServiceSettings(insecure=True, **files)
    with pytest.raises(ValidationError, match="bearer tokens need TLS"):
        ServiceSettings(host="127.0.0.1", client_auth=ClientAuth.TOKEN)
    mtls = security.transport(ServiceSettings(**files))
    assert mtls.mode is security.Mode.MTLS
    assert not mtls.warnings
    assert mtls.client.cert == issued.cert
    assert mtls.client.ca == issued.ca
    token = security.transport(ServiceSettings(client_auth=ClientAuth.TOKEN, **files))
    assert token.mode is security.Mode.TOKEN
    assert token.client.cert is None
    assert token.client.token_file == security.IN_CLUSTER_TOKEN
