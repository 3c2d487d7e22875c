"""What kube-proxy and cluster DNS would give Shepherd's pods on the local cluster, done in user space.

The local cluster has neither: a Service's ClusterIP routes nowhere and `reconciler.shepherd.svc`
resolves to nothing inside a pod, and the API server listens on loopback only. The overlay for the
local cluster (deploy/local/) therefore maps the names the pods dial (`<service>.shepherd.svc`,
`kubernetes.default.svc`) to the real node's bridge gateway with hostAliases, and this proxy,
listening on that gateway address only (so only the node's pods reach it, not the machine's
network), forwards each TCP connection:
- on a Service's port, to a ready endpoint of that Service in the deployment's namespace, read
  from its EndpointSlices at connect time (so a replaced pod is found at once, as with kube-proxy);
- on the API server's port, to the API server on loopback.
TLS passes through untouched: the pods check the certificates of the names they dialled.

Run by `python -m controlplane deploy` as a daemon of the cluster (stopped by `down`):
`python -m controlplane.serviceproxy --listen 10.89.0.1 --namespace shepherd
 --service 50051=launcher --forward 6443=127.0.0.1:6443`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import sys
from collections.abc import Awaitable, Callable

from controlplane.kubeapi import AdminClient, ApiError

_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
_CHUNK = 64 * 1024


class NoEndpoint(RuntimeError):
    """The Service has no ready endpoint right now; the connection is closed, as kube-proxy rejects it."""


def ready_endpoint(admin: AdminClient, namespace: str, service: str, port: int) -> tuple[str, int]:
    """A ready address of the Service and the target port its `port` maps to (from EndpointSlices)."""
    spec = admin.request("GET", f"/api/v1/namespaces/{namespace}/services/{service}")
    port_name = next((p.get("name", "") for p in spec["spec"]["ports"] if p["port"] == port), None)
    if port_name is None:
        raise NoEndpoint(f"service {namespace}/{service} has no port {port}")
    slices = admin.request(
        "GET",
        f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
        query={"labelSelector": f"kubernetes.io/service-name={service}"},
    )
    candidates: list[tuple[str, int]] = []
    for item in slices.get("items", []):
        target = next((p["port"] for p in item.get("ports") or [] if p.get("name", "") == port_name), None)
        if target is None:
            continue
        for endpoint in item.get("endpoints") or []:
            if endpoint.get("conditions", {}).get("ready", False):
                candidates += [(address, target) for address in endpoint["addresses"]]
    if not candidates:
        raise NoEndpoint(f"service {namespace}/{service} has no ready endpoint")
    return random.choice(candidates)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


async def _relay(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
) -> None:
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(*target)
    except OSError as exc:
        print(f"cannot reach {target[0]}:{target[1]}: {exc}", file=sys.stderr, flush=True)
        client_writer.close()
        return
    await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))
    for writer in (client_writer, upstream_writer):
        writer.close()


async def serve(
    listen: str, namespace: str, services: dict[int, str], forwards: dict[int, tuple[str, int]]
) -> None:
    from controlplane.cluster import Cluster

    admin = Cluster()._admin()

    def handler(port: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if port in forwards:
                target = forwards[port]
            else:
                try:
                    target = await asyncio.to_thread(ready_endpoint, admin, namespace, services[port], port)
                except (NoEndpoint, ApiError, OSError) as exc:
                    print(f"port {port}: {exc}", file=sys.stderr, flush=True)
                    writer.close()
                    return
            await _relay(reader, writer, target)

        return handle

    servers = []
    for port in [*services, *forwards]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # The bridge appears with the node's first pod; bind to its address even before that.
        sock.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
        sock.bind((listen, port))
        servers.append(await asyncio.start_server(handler(port), sock=sock))
    print(f"proxying {listen}: services {services} in {namespace}, forwards {forwards}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controlplane.serviceproxy", description=__doc__)
    parser.add_argument("--listen", required=True, help="the address to listen on (the bridge gateway)")
    parser.add_argument("--namespace", required=True, help="the namespace of the Services")
    parser.add_argument("--service", action="append", default=[], help="<port>=<service name>")
    parser.add_argument("--forward", action="append", default=[], help="<port>=<host>:<port>")
    args = parser.parse_args(argv)
    services = {int(p): name for p, _, name in (s.partition("=") for s in args.service)}
    forwards: dict[int, tuple[str, int]] = {}
    for spec in args.forward:
        port, _, target = spec.partition("=")
        host, _, target_port = target.rpartition(":")
        forwards[int(port)] = (host, int(target_port))
    asyncio.run(serve(args.listen, args.namespace, services, forwards))
    return 0


if __name__ == "__main__":
    sys.exit(main())
