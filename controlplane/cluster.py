"""Bring the local control plane up (or reuse a healthy one), and take it down without a trace.

Order matters: etcd, then kube-apiserver (ready when /readyz says ok), then the objects the
services need (namespace, RBAC from deploy/, fake nodes, one token per ServiceAccount), then
kube-controller-manager, kube-scheduler and kwok, which need the API server to be there, and last
the real node (containerd + kubelet), where the machine can run one.
"""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from controlplane.identities import GrpcAuthority
from controlplane.kubeapi import AdminClient, ApiError
from controlplane.pki import Authority
from controlplane.processes import Daemon, ProcessError, Supervisor
from controlplane.realnode import (
    NodeCredentials,
    RealNode,
    RealNodeError,
    RealNodeUnavailable,
    node_ip,
    unavailable_reason,
    unmount_under,
)
from controlplane.settings import ClusterSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE_NAMESPACE = "shepherd"
# Worker pods live apart from the services and their ServiceAccounts (deploy/namespace.yaml).
WORKER_NAMESPACE = "shepherd-workers"
SERVICE_IDENTITIES = ("launcher", "watcher", "reconciler")
# Start order; stopping goes the other way so clients leave before their servers.
DAEMONS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
NODE_DAEMONS = ("containerd", "kubelet")  # the real node's, where the machine runs one
STOP_ORDER = tuple(reversed((*DAEMONS, *NODE_DAEMONS)))
# The API server authenticates to kubelets as this user, and this binding lets it read logs and exec.
_KUBELET_CLIENT = "kube-apiserver-kubelet-client"
_AUDIENCE = "https://kubernetes.default.svc.cluster.local"


class ClusterError(RuntimeError):
    """The cluster could not be brought up; the message says why and what to do."""


@dataclass(frozen=True)
class ClusterInfo:
    """How to reach a running cluster."""

    server: str
    version: str
    admin_kubeconfig: str
    kubeconfigs: dict[str, str]
    namespace: str  # where worker pods go (not the services' own namespace)
    state_dir: str
    real_node: str | None = None  # the real node's name, when it runs
    real_node_unavailable: str | None = None  # else why not, and what would fix it


def _log(msg: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Cluster:
    """One local control plane, identified by its state directory."""

    def __init__(self, settings: ClusterSettings | None = None) -> None:
        self.settings = settings or ClusterSettings()
        self.supervisor = Supervisor(self.settings.state_dir)
        self.pki_dir = self.settings.state_dir / "pki"
        self.info_file = self.settings.state_dir / "cluster.json"
        self.node = RealNode(self.settings, self.supervisor)
        self._node_unavailable: str | None = None

    # ---- public API -------------------------------------------------------------------------

    def up(self) -> ClusterInfo:
        """Start the cluster, or reuse it when it is already running and healthy."""
        s = self.settings
        if self.healthy():
            _log(f"reusing the running cluster at {s.apiserver_url}")
            self._apply_manifests(self._admin())  # idempotent: picks up edits to deploy/
            self._issue_service_kubeconfigs(self._admin(), only_if_stale=True)
            GrpcAuthority(s.state_dir).ensure()
            return self.info()
        self._ensure_binaries()
        if self.node.teardown(None):
            _log("restored the host from a real node an earlier run left behind")
        leftovers = self.supervisor.stop_all(STOP_ORDER)
        if leftovers:
            _log(f"stopped {len(leftovers)} process(es) left by an earlier run")
        self._wipe_state()
        started = time.monotonic()
        authority = Authority(self.pki_dir)
        self._write_kubeconfig_files(authority)
        kubelet_client = authority.issue(_KUBELET_CLIENT, common_name=_KUBELET_CLIENT)
        bins = s.bin_dir
        self._start(
            Daemon(
                "etcd", [str(bins / "etcd"), "--config-file", str(self._etcd_config())], s.etcd_client_port
            ),
            self._etcd_ready,
        )
        sa = authority.service_account_keys()
        serving = authority.issue(
            "apiserver",
            common_name="kube-apiserver",
            server_hosts=["127.0.0.1", "localhost", "kubernetes", "kubernetes.default.svc", "10.96.0.1"],
        )
        self._start(
            Daemon(
                "kube-apiserver",
                [
                    str(bins / "kube-apiserver"),
                    f"--etcd-servers=http://127.0.0.1:{s.etcd_client_port}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={s.apiserver_port}",
                    f"--tls-cert-file={serving.cert}",
                    f"--tls-private-key-file={serving.key}",
                    f"--client-ca-file={authority.ca.cert}",
                    f"--service-account-issuer={_AUDIENCE}",
                    f"--api-audiences={_AUDIENCE}",
                    f"--service-account-key-file={sa.cert}",
                    f"--service-account-signing-key-file={sa.key}",
                    "--service-cluster-ip-range=10.96.0.0/16",
                    "--authorization-mode=Node,RBAC",
                    # A kubelet may only change its own Node and the pods bound to it.
                    "--enable-admission-plugins=NodeRestriction",
                    # Logs and exec go to kubelets with the API server's own certificate, and
                    # their serving certificates are checked against the cluster CA.
                    f"--kubelet-client-certificate={kubelet_client.cert}",
                    f"--kubelet-client-key={kubelet_client.key}",
                    f"--kubelet-certificate-authority={authority.ca.cert}",
                    "--kubelet-preferred-address-types=InternalIP,Hostname",
                    "--allow-privileged=true",
                    # Load tests must measure Shepherd, not the API server's fairness queues.
                    "--max-requests-inflight=0",
                    "--max-mutating-requests-inflight=0",
                    "--enable-priority-and-fairness=false",
                    "--profiling=false",
                    "--event-ttl=30m",
                    f"--cert-dir={self.pki_dir}",
                    *([] if s.pods_watch_cache else ["--watch-cache-sizes=pods#0"]),
                    # Every pod create and delete is recorded: tests count delete calls per pod.
                    f"--audit-policy-file={self._audit_policy()}",
                    f"--audit-log-path={self.audit_log}",
                    "--audit-log-format=json",
                    "--audit-log-maxsize=200",
                ],
                s.apiserver_port,
            ),
            self._apiserver_ready,
        )
        admin = self._admin()
        self._bootstrap(admin)
        self._start(
            Daemon(
                "kube-controller-manager",
                [
                    str(bins / "kube-controller-manager"),
                    f"--kubeconfig={s.kubeconfig_dir / 'kube-controller-manager.kubeconfig'}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={s.controller_manager_port}",
                    f"--cert-dir={self.pki_dir / 'controller-manager'}",
                    "--leader-elect=false",
                    # Each controller acts under its own ServiceAccount, as on a real cluster.
                    "--use-service-account-credentials=true",
                    f"--service-account-private-key-file={sa.key}",
                    f"--root-ca-file={authority.ca.cert}",
                    "--kube-api-qps=200",
                    "--kube-api-burst=400",
                    # kwok renews the fake nodes' status every 20-45 s; give it room before a
                    # node counts as lost and its pods are evicted.
                    "--node-monitor-grace-period=2m",
                ],
                s.controller_manager_port,
            ),
            lambda: self._https_ok(f"https://127.0.0.1:{s.controller_manager_port}/healthz"),
        )
        # With the ServiceAccount admission plugin on, no pod can be created in a namespace
        # before the controller-manager has given it its `default` ServiceAccount.
        self._wait("default ServiceAccounts", self._service_accounts_ready)
        self._start(
            Daemon(
                "kube-scheduler",
                [
                    str(bins / "kube-scheduler"),
                    f"--config={self._scheduler_config()}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={s.scheduler_port}",
                    f"--cert-dir={self.pki_dir / 'scheduler'}",
                ],
                s.scheduler_port,
            ),
            lambda: self._https_ok(f"https://127.0.0.1:{s.scheduler_port}/healthz"),
        )
        self._start(
            Daemon(
                "kwok",
                [
                    str(bins / "kwok"),
                    f"--kubeconfig={s.kubeconfig_dir / 'kwok.kubeconfig'}",
                    f"--config={self._kwok_config()}",
                    "--manage-all-nodes=false",
                    "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                    "--cidr=10.244.0.0/16",
                    "--node-ip=10.0.0.1",
                    f"--server-address=127.0.0.1:{s.kwok_port}",
                ],
                s.kwok_port,
            ),
            lambda: self._http_ok(f"http://127.0.0.1:{s.kwok_port}/healthz"),
        )
        self._wait("fake nodes Ready", self._nodes_ready)
        GrpcAuthority(s.state_dir).ensure()  # the certificates of Shepherd's own gRPC ports
        self._start_real_node(authority, admin)
        info = self.info(refresh=True)
        _log(
            f"cluster up in {time.monotonic() - started:.1f}s: kube-apiserver {info.version} at {info.server}"
        )
        return info

    def compact_etcd(self) -> int:
        """Compact etcd up to its current revision, as the API server does every few minutes;
        returns that revision. Watches older than it then end with 410 Gone."""
        endpoint = f"--endpoints=http://127.0.0.1:{self.settings.etcd_client_port}"
        etcdctl = str(self.settings.bin_dir / "etcdctl")
        timeouts = {"capture_output": True, "text": True, "check": True, "timeout": 30}
        status = subprocess.run(
            [etcdctl, endpoint, "--command-timeout=10s", "endpoint", "status", "-w", "json"], **timeouts
        )  # type: ignore[call-overload]
        revision = int(json.loads(status.stdout)[0]["Status"]["header"]["revision"])
        subprocess.run(
            [etcdctl, endpoint, "--command-timeout=10s", "compact", str(revision), "--physical"], **timeouts
        )  # type: ignore[call-overload]
        return revision

    def restart(self, name: str) -> None:
        """Restart one daemon (e.g. "kube-apiserver") in place and wait until it is ready again."""
        self.supervisor.restart(name)
        self._wait_ready(name)

    def stop_daemon(self, name: str) -> None:
        """Stop one daemon (e.g. "kube-apiserver": an outage), leaving the others running."""
        self.supervisor.stop(name)

    def start_daemon(self, name: str) -> None:
        """Start a daemon stop_daemon stopped, and wait until it is ready again."""
        self.supervisor.start_again(name)
        self._wait_ready(name)

    def _wait_ready(self, name: str) -> None:
        ready = {"kube-apiserver": self._apiserver_ready, "etcd": self._etcd_ready}.get(name, lambda: True)
        self._wait(name, ready, daemon=name)

    def down(self) -> None:
        """Stop every process of this cluster, restore what its real node changed on the host,
        and remove its state (the build cache stays)."""
        self.node.teardown(self._admin() if self._apiserver_ready() else None)
        stopped = self.supervisor.stop_all(STOP_ORDER)
        self._wipe_state()
        _log(f"cluster down: stopped {len(stopped)} process(es), removed {self.settings.state_dir}")

    def stop_real_node(self) -> None:
        """Give up the machine's real node (its pods deleted, the host restored) while the rest of
        the cluster keeps running, so another cluster can have it."""
        self.node.teardown(self._admin())
        self._node_unavailable = "the real node was stopped (Cluster.stop_real_node)"
        self.info(refresh=True)

    def start_real_node(self) -> ClusterInfo:
        """Start the real node of a running cluster again (after stop_real_node)."""
        self._start_real_node(Authority(self.pki_dir), self._admin())
        return self.info(refresh=True)

    def healthy(self) -> bool:
        if not self.info_file.exists() or any(self.supervisor.pid(n) is None for n in DAEMONS):
            return False
        if self.info().real_node and any(self.supervisor.pid(n) is None for n in NODE_DAEMONS):
            return False
        return self._apiserver_ready()

    def info(self, refresh: bool = False) -> ClusterInfo:
        if not refresh and self.info_file.exists():
            return ClusterInfo(**json.loads(self.info_file.read_text()))
        s = self.settings
        version = self._admin().request("GET", "/version")["gitVersion"]
        info = ClusterInfo(
            server=s.apiserver_url,
            version=version,
            admin_kubeconfig=str(s.admin_kubeconfig),
            kubeconfigs={n: str(s.kubeconfig_dir / f"{n}.kubeconfig") for n in SERVICE_IDENTITIES},
            namespace=WORKER_NAMESPACE,
            state_dir=str(s.state_dir),
            real_node=None if self._node_unavailable else s.real_node_name,
            real_node_unavailable=self._node_unavailable,
        )
        self.info_file.write_text(json.dumps(asdict(info), indent=2))
        return info

    # ---- start-up steps ---------------------------------------------------------------------

    def _start_real_node(self, authority: Authority, admin: AdminClient) -> None:
        """Start the real node where the machine can run one; else say why and go on without it."""
        s = self.settings
        self._node_unavailable = unavailable_reason(s)
        ip = node_ip()
        if self._node_unavailable is None and ip is not None:
            serving = authority.issue(
                "kubelet-serving",
                common_name=s.real_node_name,
                server_hosts=[ip, s.real_node_name, "localhost", "127.0.0.1"],
            )
            credentials = NodeCredentials(
                kubeconfig=s.kubeconfig_dir / "kubelet.kubeconfig",
                ca_cert=authority.ca.cert,
                serving_cert=serving.cert,
                serving_key=serving.key,
            )
            try:
                self.node.start(ip, credentials, admin, self._wait)
            except RealNodeUnavailable as exc:
                self._node_unavailable = str(exc)
            except (RealNodeError, ProcessError, OSError, subprocess.SubprocessError) as exc:
                self._stop_everything(drain=False)
                raise ClusterError(f"the real node failed to start: {exc}") from exc
        if self._node_unavailable is not None:
            _log(f"no real node: {self._node_unavailable}")
        else:
            _log(f"real node {s.real_node_name} Ready (kubelet on {ip}:{s.kubelet_port})")

    def _stop_everything(self, *, drain: bool) -> None:
        """Stop the real node (pods first, through the API, when `drain`) and restore the host,
        then every other process of this cluster."""
        admin = self._admin() if drain and self._apiserver_ready() else None
        self.node.teardown(admin)
        self.supervisor.stop_all(STOP_ORDER)

    def _ensure_binaries(self) -> None:
        needed = (
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
            "kubelet",
            "pause",
        )
        if all((self.settings.bin_dir / n).exists() for n in needed):
            return
        _log("binaries missing: building them with controlplane/build.sh (the first time takes a while)")
        result = subprocess.run(["bash", str(REPO_ROOT / "controlplane" / "build.sh")], check=False)
        if result.returncode != 0:
            raise ClusterError("building the control-plane binaries failed; see the messages above.")

    def _wipe_state(self) -> None:
        # Never let rmtree reach into something still mounted below the state directory.
        unmount_under(self.settings.state_dir)
        for path in (self.settings.state_dir, self.settings.etcd_data_dir):
            shutil.rmtree(path, ignore_errors=True)

    def _start(self, daemon: Daemon, ready: Callable[[], bool]) -> None:
        try:
            self.supervisor.start(daemon)
        except ProcessError as exc:
            self._stop_everything(drain=False)
            raise ClusterError(str(exc)) from exc
        self._wait(daemon.name, ready, daemon=daemon.name)

    def _wait(self, what: str, ready: Callable[[], bool], daemon: str | None = None) -> None:
        deadline = time.monotonic() + self.settings.start_timeout_s
        while time.monotonic() < deadline:
            if daemon is not None and (tail := self.supervisor.exited_early(daemon)) is not None:
                self._stop_everything(drain=False)
                raise ClusterError(f"{daemon} exited during start-up. Last lines of its log:\n{tail}")
            try:
                if ready():
                    return
            except (OSError, ApiError, ssl.SSLError, ValueError):
                pass
            time.sleep(0.2)
        self._stop_everything(drain=False)
        raise ClusterError(
            f"{what} was not ready within {self.settings.start_timeout_s:.0f}s; "
            f"logs are in {self.supervisor.log_dir}"
        )

    def _etcd_config(self) -> Path:
        s = self.settings
        peer = f"http://127.0.0.1:{s.etcd_peer_port}"
        client = f"http://127.0.0.1:{s.etcd_client_port}"
        config = {
            "name": "shepherd",
            "data-dir": str(s.etcd_data_dir),
            "listen-client-urls": client,
            "advertise-client-urls": client,
            "listen-peer-urls": peer,
            "initial-advertise-peer-urls": peer,
            "initial-cluster": f"shepherd={peer}",
            "initial-cluster-state": "new",
            # Test data: speed over durability (the data dir is tmpfs as well).
            "unsafe-no-fsync": True,
            "log-level": "warn",
            "quota-backend-bytes": 4 * 1024**3,
        }
        path = s.state_dir / "etcd.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    @property
    def audit_log(self) -> Path:
        """JSON lines, one per completed pod create or delete request, per pod status write by
        kwok, and per log or Events read by the reconciler (who, which pod, what answer, when to
        the microsecond)."""
        return self.settings.state_dir / "logs" / "audit.log"

    def _audit_policy(self) -> Path:
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [
                {
                    "level": "Metadata",
                    "verbs": ["create", "delete", "deletecollection"],
                    "resources": [{"group": "", "resources": ["pods"]}],
                },
                {
                    # The simulated kubelet's pod status writes: when each pod went Running
                    # (the benchmark's end-to-end launch rate).
                    "level": "Metadata",
                    "users": ["kwok-controller"],
                    "verbs": ["patch", "update"],
                    "resources": [{"group": "", "resources": ["pods/status"]}],
                },
                {
                    # What the reconciler reads of finished pods (their log tails, a failed
                    # pod's Events): tests check that pods on the fake nodes cost no log read.
                    "level": "Metadata",
                    "users": ["system:serviceaccount:shepherd:reconciler"],
                    "verbs": ["get", "list"],
                    "resources": [{"group": "", "resources": ["pods/log", "events"]}],
                },
                {
                    # Which identity reads, lists, watches and patches pods: the in-cluster test
                    # checks that each service calls as its own ServiceAccount, from its own pod;
                    # the gap test, that the watcher asks about a gap's vanished pods in one list.
                    "level": "Metadata",
                    "userGroups": ["system:serviceaccounts"],
                    "verbs": ["get", "list", "watch", "patch"],
                    "resources": [{"group": "", "resources": ["pods"]}],
                },
                {"level": "None"},
            ],
        }
        path = self.settings.state_dir / "audit-policy.yaml"
        path.write_text(yaml.safe_dump(policy))
        return path

    def _etcd_ready(self) -> bool:
        return self._http_ok(f"http://127.0.0.1:{self.settings.etcd_client_port}/health")

    def _apiserver_ready(self) -> bool:
        try:
            return bool(self._admin().request("GET", "/readyz") == "ok")
        except (OSError, ApiError, ssl.SSLError):
            return False

    @staticmethod
    def _http_ok(url: str) -> bool:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)

    @staticmethod
    def _https_ok(url: str) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # kube-scheduler serves a self-signed health endpoint
        with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
            return bool(resp.status == 200)

    def _admin(self) -> AdminClient:
        return AdminClient(
            "127.0.0.1",
            self.settings.apiserver_port,
            str(self.pki_dir / "ca.crt"),
            str(self.pki_dir / "admin.crt"),
            str(self.pki_dir / "admin.key"),
        )

    def _scheduler_config(self) -> Path:
        config = {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {
                "kubeconfig": str(self.settings.kubeconfig_dir / "kube-scheduler.kubeconfig"),
                "qps": 2000,
                "burst": 4000,
            },
            "leaderElection": {"leaderElect": False},
        }
        path = self.settings.state_dir / "kube-scheduler.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _kwok_config(self) -> Path:
        s = self.settings
        stages = (Path(__file__).parent / "kwok-stages.yaml").read_text()
        stages = stages.replace("@POD_START_MS@", str(s.pod_start_ms)).replace(
            "@POD_RUN_MS@", str(s.pod_run_ms)
        )
        path = s.state_dir / "kwok.yaml"
        path.write_text(stages)
        return path

    def _nodes_ready(self) -> bool:
        """Every fake node Ready, and the controller-manager has lifted the not-ready taint that
        new nodes get, so pods can be scheduled onto them."""
        nodes = self._admin().request("GET", "/api/v1/nodes", query={"labelSelector": "type=kwok"})["items"]
        ready = [
            n
            for n in nodes
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in n.get("status", {}).get("conditions", [])
            )
            and not any(t["key"] == "node.kubernetes.io/not-ready" for t in n["spec"].get("taints", []))
        ]
        return len(ready) >= self.settings.nodes

    def _service_accounts_ready(self) -> bool:
        admin = self._admin()
        for namespace in ("default", SERVICE_NAMESPACE, WORKER_NAMESPACE):
            admin.request("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/default")
            admin.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/kube-root-ca.crt")
        return True

    # ---- identities and objects -------------------------------------------------------------

    def _write_kubeconfig_files(self, authority: Authority) -> None:
        """Client-certificate kubeconfigs for the admin and the two Kubernetes components."""
        self.settings.kubeconfig_dir.mkdir(parents=True, exist_ok=True)
        identities = {
            "admin": ("shepherd-admin", "system:masters"),
            "kube-scheduler": ("system:kube-scheduler", None),
            "kube-controller-manager": ("system:kube-controller-manager", None),
            # The real node's kubelet: the Node authorizer and NodeRestriction know it by this name.
            "kubelet": (f"system:node:{self.settings.real_node_name}", "system:nodes"),
            # kwok plays every kubelet, so it writes node and pod status cluster-wide.
            "kwok": ("kwok-controller", "system:masters"),
        }
        for name, (cn, org) in identities.items():
            pair = authority.issue(name, common_name=cn, organization=org)
            user = {
                "client-certificate-data": _b64(pair.cert.read_bytes()),
                "client-key-data": _b64(pair.key.read_bytes()),
            }
            self._write_kubeconfig(name, user, namespace="default")

    def _write_kubeconfig(self, name: str, user: dict[str, str], namespace: str) -> Path:
        ca = (self.pki_dir / "ca.crt").read_bytes()
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": name,
            "clusters": [
                {
                    "name": "shepherd-local",
                    "cluster": {
                        "server": self.settings.apiserver_url,
                        "certificate-authority-data": _b64(ca),
                    },
                }
            ],
            "users": [{"name": name, "user": user}],
            "contexts": [
                {"name": name, "context": {"cluster": "shepherd-local", "user": name, "namespace": namespace}}
            ],
        }
        path = self.settings.kubeconfig_dir / f"{name}.kubeconfig"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        path.chmod(0o600)
        return path

    def _bootstrap(self, admin: AdminClient) -> None:
        """Namespace, per-service RBAC (deploy/), fake nodes, and a kubeconfig per service identity."""
        self._apply_manifests(admin)
        admin.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "shepherd:kube-apiserver-kubelet-client"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "system:kubelet-api-admin",
                },
                "subjects": [
                    {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": _KUBELET_CLIENT}
                ],
            }
        )
        s = self.settings
        for i in range(s.nodes):
            resources = {"cpu": s.node_cpu, "memory": s.node_memory, "pods": str(s.node_pods)}
            admin.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": f"kwok-node-{i}",
                        "annotations": {"kwok.x-k8s.io/node": "fake"},
                        "labels": {
                            "type": "kwok",
                            "kubernetes.io/hostname": f"kwok-node-{i}",
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                        },
                    },
                    "status": {"allocatable": resources, "capacity": resources},
                }
            )
        self._issue_service_kubeconfigs(admin, only_if_stale=False)

    def _apply_manifests(self, admin: AdminClient) -> None:
        """The service namespace and per-service RBAC, from the same files a real cluster applies."""
        manifests = [
            REPO_ROOT / "deploy" / "namespace.yaml",
            *sorted((REPO_ROOT / "deploy" / "rbac").glob("*.yaml")),
        ]
        for path in manifests:
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    admin.apply(doc)

    def _issue_service_kubeconfigs(self, admin: AdminClient, *, only_if_stale: bool) -> None:
        """One kubeconfig per service, holding a token from the TokenRequest API for its ServiceAccount."""
        for name in SERVICE_IDENTITIES:
            path = self.settings.kubeconfig_dir / f"{name}.kubeconfig"
            if (
                only_if_stale
                and path.exists()
                and time.time() - path.stat().st_mtime < self.settings.token_ttl_s / 2
            ):
                continue
            resp = admin.request(
                "POST",
                f"/api/v1/namespaces/{SERVICE_NAMESPACE}/serviceaccounts/{name}/token",
                {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {"audiences": [_AUDIENCE], "expirationSeconds": self.settings.token_ttl_s},
                },
            )
            self._write_kubeconfig(name, {"token": resp["status"]["token"]}, namespace=SERVICE_NAMESPACE)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
