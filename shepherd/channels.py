"""The one place a gRPC client channel is made, for service-to-service calls and Shepherd's own clients.

Every channel gets the same keepalive (so a vanished peer is noticed within a minute, and meshes
and idle load balancers do not cut it) and the same message-size limits as the servers. Transport
security is decided here too, so a caller never picks it call site by call site.
"""

from __future__ import annotations

import grpc

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def aio_channel(address: str) -> grpc.aio.Channel:
    """An asyncio channel to `address` (host:port)."""
    return grpc.aio.insecure_channel(address, options=OPTIONS)


def sync_channel(address: str) -> grpc.Channel:
    """A blocking channel to `address`, for tooling that is not async (health probes at start)."""
    return grpc.insecure_channel(address, options=OPTIONS)
