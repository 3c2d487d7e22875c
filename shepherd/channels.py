"""The one way a service opens a gRPC channel to another service, so every client connection
behaves the same: keepalive pings find a vanished peer (a killed pod, a NAT that forgot us)
within a minute instead of at the next call's deadline, and messages as large as the servers
allow are accepted."""

from __future__ import annotations

import grpc

# Pings every 30 s, also without calls in flight: the servers (shepherd.grpcserver) permit one
# every 10 s, so these are never answered with GOAWAY "too many pings".
_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
]


def insecure_channel(address: str) -> grpc.aio.Channel:
    """A channel to `address` (host:port). It connects lazily and reconnects by itself, so it can
    be made before the peer is up and kept across the peer's restarts."""
    return grpc.aio.insecure_channel(address, options=_OPTIONS)
