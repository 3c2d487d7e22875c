"""Command line for the local control plane: `python -m controlplane up|down|status|env`,
`python -m controlplane issue-cert <namespace>/<name>` for a client certificate of Shepherd's gRPC
ports (a scheduler: namespace `schedulers`), `build-image` for the services' image (built from the
Dockerfile and imported into the real node), and `deploy` / `undeploy` for Shepherd itself running
in the cluster from deploy/local/."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from controlplane import serviceimage
from controlplane.cluster import Cluster, ClusterError
from controlplane.deploy import SERVICE_NAMESPACE, WORKER_NAMESPACE, DeployError, Deployment
from controlplane.identities import GrpcAuthority

# The services' gRPC ports in deploy/base/.
PORTS = {"launcher": 50051, "watcher": 50052, "reconciler": 50053}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlplane", description=__doc__)
    parser.add_argument(
        "command", choices=["up", "down", "status", "env", "issue-cert", "build-image", "deploy", "undeploy"]
    )
    parser.add_argument(
        "identity", nargs="?", help="issue-cert: the ServiceAccount <namespace>/<name> to issue for"
    )
    parser.add_argument(
        "--namespace",
        default=SERVICE_NAMESPACE,
        help="deploy/undeploy: the services' namespace (worker pods go to <namespace>-workers); "
        "another than `shepherd` leaves the namespaces the cluster's own services use alone",
    )
    args = parser.parse_args(argv)
    cluster = Cluster()
    if args.command == "issue-cert":
        namespace, _, name = (args.identity or "").partition("/")
        if not namespace or not name:
            parser.error("issue-cert needs <namespace>/<name>, e.g. schedulers/airflow")
        try:
            issued = GrpcAuthority(cluster.settings.state_dir).client(namespace, name)
        except ValueError as err:
            parser.error(str(err))
        print(f"identity {issued.spiffe_id}")
        print(f"  --cacert {issued.ca} --cert {issued.cert} --key {issued.key}")
        return 0
    try:
        if args.command == "build-image":
            image = serviceimage.build(cluster.settings)
            how = "built" if image.built else "cached"
            print(f"{image.name} ({how}, {image.tar}) in {image.seconds:.1f}s")
            return 0
        if args.command in ("deploy", "undeploy"):
            workers = WORKER_NAMESPACE if args.namespace == SERVICE_NAMESPACE else f"{args.namespace}-workers"
            if args.command == "undeploy":
                Deployment(cluster, serviceimage.image_name(), args.namespace, workers).remove()
                return 0
            image = serviceimage.build(cluster.settings)
            deployment = Deployment(cluster, image.name, args.namespace, workers)
            deployment.apply()
            print(f"Shepherd runs in namespace {args.namespace} (workers: {workers}) from {image.name}")
            for name, pod in sorted(deployment.pods().items()):
                port = PORTS[name]
                print(f"  {name:<10} {pod['metadata']['name']:<32} {pod['status'].get('podIP')}:{port}")
            return 0
        if args.command == "up":
            info = cluster.up()
            print(f"kube-apiserver {info.version} is ready at {info.server}")
            print(f"  export KUBECONFIG={info.admin_kubeconfig}")
            for name, path in info.kubeconfigs.items():
                print(f"  {name:<10} ServiceAccount {info.namespace}/{name}: {path}")
        elif args.command == "down":
            cluster.down()
        elif args.command == "status":
            if not cluster.healthy():
                print("the local cluster is not running")
                return 1
            print(json.dumps(asdict(cluster.info()), indent=2))
        else:
            if not cluster.healthy():
                print("the local cluster is not running: `make cluster-up` starts it", file=sys.stderr)
                return 1
            print(f"export KUBECONFIG={cluster.info().admin_kubeconfig}")
    except (ClusterError, serviceimage.ImageBuildError, DeployError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
