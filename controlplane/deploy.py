"""Shepherd deployed from deploy/ into the local cluster, as `kubectl apply -k deploy/local/` would,
without kubectl: the services run as pods on the real node, from the image built on the machine.

- `render` reads a kustomization the way kustomize does, for the features deploy/ uses (resources,
  configMapGenerator, images, strategic-merge patches with an optional target, `$patch: delete`);
  anything else is refused by name rather than silently ignored.
- `relocate` moves the rendered objects to another namespace pair, so a test can deploy beside the
  `shepherd` / `shepherd-workers` namespaces that the cluster's own bootstrap (and other tests) use.
  The services still call one another by `<service>.shepherd.svc` (their certificates' names); the
  service proxy routes those to the namespace deployed.
- `Deployment.apply` adds what is per machine (the TLS Secrets from the local gRPC PKI, the image's
  content tag), applies every object as the admin (server-side apply), starts the service proxy
  (controlplane/serviceproxy.py) and waits until the kubelet's probes make every Deployment Ready.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controlplane.cluster import Cluster
from controlplane.identities import SERVICES, GrpcAuthority
from controlplane.kubeapi import AdminClient, ApiError, object_path
from controlplane.processes import Daemon

REPO_ROOT = Path(__file__).resolve().parents[1]
OVERLAY = REPO_ROOT / "deploy" / "local"
SERVICE_NAMESPACE = "shepherd"
WORKER_NAMESPACE = "shepherd-workers"
PROXY = "service-proxy"
FIELD_MANAGER = "shepherd-deploy"
# Created first (everything else lives in them or refers to them), deleted last.
_ORDER = {"Namespace": 0, "ServiceAccount": 1, "ClusterRole": 1, "Role": 1, "ConfigMap": 2, "Secret": 2}
_KNOWN_FIELDS = {"apiVersion", "kind", "resources", "configMapGenerator", "images", "patches"}

Object = dict[str, Any]


class DeployError(RuntimeError):
    """The deployment could not be rendered, applied or made Ready; the message says what."""


def _log(msg: str) -> None:
    print(f"[deploy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- rendering (the subset of kustomize that deploy/ uses) ----------------------------------------


def render(directory: Path = OVERLAY) -> list[Object]:
    """The objects `kustomize build <directory>` makes."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _KNOWN_FIELDS
    if unknown:
        raise DeployError(f"{directory}/kustomization.yaml uses {sorted(unknown)}, which render() lacks")
    objects: list[Object] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for generator in kustomization.get("configMapGenerator", []):
        if not generator.get("options", {}).get("disableNameSuffixHash"):
            raise DeployError(f"configMap {generator['name']}: only disableNameSuffixHash generators")
        data = {Path(f).name: (directory / f).read_text() for f in generator["files"]}
        meta = {"name": generator["name"], "namespace": generator["namespace"]}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for patch in kustomization.get("patches", []):
        for doc in (d for d in yaml.safe_load_all((directory / patch["path"]).read_text()) if d):
            objects = _patch(objects, doc, patch.get("target"))
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                if container.get("image", "").rsplit(":", 1)[0] == image["name"]:
                    tag = image.get("newTag") or container["image"].rsplit(":", 1)[1]
                    container["image"] = f"{image.get('newName', image['name'])}:{tag}"
    return objects


def _containers(obj: Object) -> list[Object]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _matches(obj: Object, patch: Object, target: dict[str, str] | None) -> bool:
    if target is not None:
        unknown = set(target) - {"kind", "name", "namespace"}
        if unknown:
            raise DeployError(f"patch target fields {sorted(unknown)} are not supported")
        return all(
            (obj["kind"] if key == "kind" else obj["metadata"].get(key)) == value
            for key, value in target.items()
        )
    meta = patch["metadata"]
    return bool(
        obj["kind"] == patch["kind"]
        and obj["metadata"]["name"] == meta["name"]
        and obj["metadata"].get("namespace") == meta.get("namespace")
    )


def _patch(objects: list[Object], patch: Object, target: dict[str, str] | None) -> list[Object]:
    hits = [o for o in objects if _matches(o, patch, target)]
    if not hits:
        raise DeployError(f"patch {patch['kind']}/{patch['metadata']['name']} matches no object")
    if patch.get("$patch") == "delete":
        return [o for o in objects if not any(o is h for h in hits)]
    body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")}
    for obj in hits:
        merged = merge(obj, body)
        obj.clear()
        obj.update(merged)
    return objects


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch: maps merge key by key (a null value deletes the key), lists of maps
    that all have a `name` merge item by item on it (containers, env, volumes, ...), and any other
    list or value is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        merged = [copy.deepcopy(item) for item in base]
        for item in patch:
            index = next((i for i, old in enumerate(merged) if old["name"] == item["name"]), None)
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = merge(merged[index], item)
        return merged
    return copy.deepcopy(patch)


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


# ---- relocation to another namespace pair ---------------------------------------------------------


def relocate(objects: list[Object], namespace: str, workers: str) -> list[Object]:
    """The same deployment in namespaces `namespace` (services) and `workers` (worker pods).
    Cluster-scoped objects other than the Namespaces get the services' namespace as a name prefix,
    so they never replace the ones a `shepherd` deployment (or the cluster's bootstrap) owns."""
    moves = {SERVICE_NAMESPACE: namespace, WORKER_NAMESPACE: workers}
    out = copy.deepcopy(objects)
    for obj in out:
        meta = obj["metadata"]
        if obj["kind"] == "Namespace":
            meta["name"] = moves[meta["name"]]
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        elif "namespace" in meta:
            meta["namespace"] = moves[meta["namespace"]]
        else:
            meta["name"] = f"{namespace}-{meta['name']}"
        if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            for subject in obj.get("subjects", []):
                if "namespace" in subject:
                    subject["namespace"] = moves[subject["namespace"]]
            if obj["kind"] == "ClusterRoleBinding":
                obj["roleRef"]["name"] = f"{namespace}-{obj['roleRef']['name']}"
        if obj["kind"] == "ValidatingAdmissionPolicyBinding":
            obj["spec"]["policyName"] = f"{namespace}-{obj['spec']['policyName']}"
        for condition in obj.get("spec", {}).get("matchConditions", []):
            # The policy names the identity it applies to; that identity moves too.
            condition["expression"] = condition["expression"].replace(
                f"system:serviceaccount:{SERVICE_NAMESPACE}:", f"system:serviceaccount:{namespace}:"
            )
        for container in _containers(obj):
            for env in container.get("env", []):
                if env["name"] == "SHEPHERD_NAMESPACE":
                    env["value"] = moves[env["value"]]
        for rule in obj.get("spec", {}).get("ingress", []) if obj["kind"] == "NetworkPolicy" else []:
            for peer in rule.get("from", []):
                labels = peer.get("namespaceSelector", {}).get("matchLabels", {})
                name = labels.get("kubernetes.io/metadata.name")
                if name in moves:
                    labels["kubernetes.io/metadata.name"] = moves[name]
    return out


# ---- applying -------------------------------------------------------------------------------------


def tls_secrets(authority: GrpcAuthority, namespace: str) -> list[Object]:
    """Secret `<service>-tls` per service (tls.crt, tls.key, ca.crt, as cert-manager writes them),
    from the local gRPC PKI: the certificates the host-run services use too."""
    secrets = []
    for name in SERVICES:
        issued = authority.service(name)
        data = {
            "tls.crt": issued.cert.read_bytes(),
            "tls.key": issued.key.read_bytes(),
            "ca.crt": issued.ca.read_bytes(),
        }
        secrets.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "kubernetes.io/tls",
                "metadata": {
                    "name": f"{name}-tls",
                    "namespace": namespace,
                    "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "shepherd"},
                },
                "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
            }
        )
    return secrets


def gateway(pod_cidr: str) -> str:
    """The bridge's address on the real node: the first host of its pod CIDR."""
    return str(next(ipaddress.ip_network(pod_cidr).hosts()))


@dataclass
class Deployment:
    """One deployment of Shepherd into a running local cluster with a real node."""

    cluster: Cluster
    image: str
    namespace: str = SERVICE_NAMESPACE
    workers: str = WORKER_NAMESPACE
    timeout_s: float = 300.0
    objects: list[Object] = field(default_factory=list)

    def __post_init__(self) -> None:
        objects = render()
        if (self.namespace, self.workers) != (SERVICE_NAMESPACE, WORKER_NAMESPACE):
            objects = relocate(objects, self.namespace, self.workers)
        for obj in objects:
            for container in _containers(obj):
                if container["image"].startswith("shepherd.local/shepherd:"):
                    container["image"] = self.image
        authority = GrpcAuthority(self.cluster.settings.state_dir)
        self.objects = sorted(
            [*objects, *tls_secrets(authority, self.namespace)], key=lambda o: _ORDER.get(o["kind"], 3)
        )
        self._check_gateway()

    @property
    def admin(self) -> AdminClient:
        return self.cluster._admin()

    def _check_gateway(self) -> None:
        address = gateway(self.cluster.settings.real_node_pod_cidr)
        for obj in self.objects:
            for alias in obj.get("spec", {}).get("template", {}).get("spec", {}).get("hostAliases", []):
                if alias["ip"] != address:
                    raise DeployError(
                        f"deploy/local maps the service names to {alias['ip']}, but the real node's "
                        f"bridge gateway is {address}: change hostAliases in deploy/local/real-node.yaml"
                    )

    def of_kind(self, kind: str) -> list[Object]:
        return [o for o in self.objects if o["kind"] == kind]

    def apply(self) -> None:
        if self.cluster.info().real_node is None:
            raise DeployError(
                f"the cluster has no real node ({self.cluster.info().real_node_unavailable}); "
                "the services' pods need one"
            )
        self.start_proxy()
        admin = self.admin
        _log(f"applying {len(self.objects)} objects ({self.namespace}, {self.workers}), image {self.image}")
        for obj in self.objects:
            admin.apply(obj, field_manager=FIELD_MANAGER)
        self.wait_ready()

    def start_proxy(self) -> None:
        """The service proxy for this deployment's namespace (one per cluster: it holds the
        Services' ports on the bridge gateway)."""
        supervisor = self.cluster.supervisor
        argv = self._proxy_argv()
        holder = self._proxy_holder()
        if holder is not None:
            if json.loads((supervisor.run_dir / f"{PROXY}.json").read_text())["argv"] == argv:
                return
            if holder != self.namespace:
                raise DeployError(
                    f"the deployment in namespace {holder} holds the service proxy (one per cluster: "
                    f"it owns the Services' ports on the bridge gateway); undeploy it first"
                )
            supervisor.stop(PROXY)
        supervisor.start(Daemon(PROXY, argv, None))

    def _proxy_holder(self) -> str | None:
        """The namespace the running service proxy serves, if one runs."""
        supervisor = self.cluster.supervisor
        if supervisor.pid(PROXY) is None:
            return None
        argv: list[str] = json.loads((supervisor.run_dir / f"{PROXY}.json").read_text())["argv"]
        return argv[argv.index("--namespace") + 1]

    def _proxy_argv(self) -> list[str]:
        s = self.cluster.settings
        argv = [
            sys.executable,
            "-m",
            "controlplane.serviceproxy",
            "--listen",
            gateway(s.real_node_pod_cidr),
            "--namespace",
            self.namespace,
            "--forward",
            f"{s.apiserver_port}=127.0.0.1:{s.apiserver_port}",
        ]
        for service in self.of_kind("Service"):
            for port in service["spec"]["ports"]:
                argv += ["--service", f"{port['port']}={service['metadata']['name']}"]
        return argv

    def ready(self) -> dict[str, bool]:
        """Each Deployment: is its one replica of the current template Ready (by the kubelet's
        readiness probe)?"""
        states = {}
        for deployment in self.of_kind("Deployment"):
            live = self.admin.request("GET", object_path(deployment))
            status = live.get("status", {})
            states[deployment["metadata"]["name"]] = (
                status.get("observedGeneration") == live["metadata"]["generation"]
                and status.get("updatedReplicas") == 1
                and status.get("readyReplicas") == 1
                and status.get("replicas") == 1
            )
        return states

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        states: dict[str, bool] = {}
        while time.monotonic() < deadline:
            states = self.ready()
            if all(states.values()):
                _log(f"ready: {', '.join(states)}")
                return
            time.sleep(1)
        waiting = [n for n, ok in states.items() if not ok]
        raise DeployError(
            f"{', '.join(waiting)} not Ready within {self.timeout_s:.0f}s; see the pods' events "
            f"(namespace {self.namespace}) and the service proxy's log "
            f"({self.cluster.supervisor.log_dir / (PROXY + '.log')})"
        )

    def pods(self) -> dict[str, Object]:
        """The running pod of each service, by service name."""
        listed = self.admin.request(
            "GET",
            f"/api/v1/namespaces/{self.namespace}/pods",
            query={"labelSelector": "app.kubernetes.io/part-of=shepherd"},
        )
        pods: dict[str, Object] = {}
        for pod in listed["items"]:
            if pod["metadata"].get("deletionTimestamp") or pod["status"].get("phase") != "Running":
                continue
            pods[pod["metadata"]["labels"]["app.kubernetes.io/name"]] = pod
        return pods

    def remove(self) -> None:
        """Delete what `apply` made (namespaces last, waiting until they are gone) and stop the
        proxy. Objects that were not there are skipped; in `shepherd`, what the cluster's bootstrap
        applied stays."""
        try:
            self._delete_objects()
        finally:
            if self._proxy_holder() == self.namespace:
                self.cluster.supervisor.stop(PROXY)
        _log(f"removed the deployment in {self.namespace}, {self.workers}")

    def _delete_objects(self) -> None:
        admin = self.admin
        keep = _bootstrapped() if self.namespace == SERVICE_NAMESPACE else set()
        for obj in reversed(self.objects):
            if _identity(obj) in keep:
                continue
            try:
                admin.request("DELETE", object_path(obj))
            except ApiError as exc:
                if exc.status != 404:
                    raise
        deadline = time.monotonic() + self.timeout_s
        for namespace in self.of_kind("Namespace") if self.namespace != SERVICE_NAMESPACE else []:
            while time.monotonic() < deadline:
                try:
                    admin.request("GET", object_path(namespace))
                except ApiError as exc:
                    if exc.status == 404:
                        break
                    raise
                time.sleep(1)


def _identity(obj: Object) -> tuple[str, str | None, str]:
    return obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


def _bootstrapped() -> set[tuple[str, str | None, str]]:
    """What the cluster's own bootstrap applies for the host-run services (the same files as
    Cluster._apply_manifests: deploy/namespace.yaml and deploy/rbac/): a deployment in `shepherd`
    shares these objects, and removing it leaves them."""
    files = [REPO_ROOT / "deploy" / "namespace.yaml", *sorted((REPO_ROOT / "deploy" / "rbac").glob("*.yaml"))]
    return {_identity(d) for f in files for d in yaml.safe_load_all(f.read_text()) if d}
