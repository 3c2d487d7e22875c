"""The one place a gRPC client channel is made, for service-to-service calls and Shepherd's own clients.

Every channel gets the same keepalive (so a vanished peer is noticed within a minute, and meshes
and idle load balancers do not cut it) and the same message-size limits as the servers. Transport
security is decided here too, so a caller never picks it call site by call site: a process sets
its credentials once (`configure`: a service does it at start from its settings, so its calls to
the other services present its own certificate), and a caller that acts as someone else (a test
playing the reconciler, the benchmark) passes `ClientCredentials` explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# What Shepherd's own clients accept; the servers accept less by default (max_receive_message_bytes).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class NotConfigured(RuntimeError):
    """A channel was asked for before the process said how it authenticates."""


@dataclass(frozen=True)
class ClientCredentials:
    """How a client proves who it is and checks whom it talks to.

    `ca` set: TLS, the server's certificate must chain to it. `cert` + `key`: mutual TLS with that
    certificate. `token_file`: a bearer token (e.g. a ServiceAccount token) sent with every call,
    re-read when the file changes (the kubelet rotates projected tokens). Neither `ca` nor `token`:
    plaintext, for a server that was explicitly started without TLS.
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token_file: Path | None = None
    # The name the server's certificate must carry, when it differs from the address's host.
    server_name: str | None = None

    @property
    def plaintext(self) -> bool:
        return self.ca is None

    def check(self) -> None:
        """Fail fast, naming the setting, on a combination that cannot work."""
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both the certificate and its key")
        if self.ca is None and (self.cert is not None or self.token_file is not None):
            raise ValueError("a client certificate or token needs TLS: give the CA bundle too")

    def channel_credentials(self) -> grpc.ChannelCredentials:
        assert self.ca is not None
        transport = grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )
        if self.token_file is None:
            return transport
        return grpc.composite_channel_credentials(
            transport, grpc.metadata_call_credentials(_TokenFromFile(self.token_file), name="bearer-token")
        )

    def options(self) -> list[tuple[str, int | str]]:
        if self.server_name:
            return [*OPTIONS, ("grpc.ssl_target_name_override", self.server_name)]
        return OPTIONS


class _TokenFromFile(grpc.AuthMetadataPlugin):  # type: ignore[misc]
    """Adds `authorization: Bearer <token>`; the file is read again only when it changed."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._header: tuple[tuple[str, str], ...] = ()

    def __call__(self, context: Any, callback: Any) -> None:
        try:
            stat = os.stat(self._path)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                token = self._path.read_text().strip()
                self._header = (("authorization", f"Bearer {token}"),)
                self._stamp = stamp
        except OSError as err:
            # The path only: the error must not carry the token, and a read error cannot.
            callback((), OSError(f"cannot read the bearer token file {self._path}: {err.strerror}"))
            return
        callback(self._header, None)


PLAINTEXT = ClientCredentials()

_configured: ClientCredentials | None = None


def configure(credentials: ClientCredentials) -> None:
    """Set the credentials this process's channels use unless a caller passes its own."""
    global _configured
    credentials.check()
    _configured = credentials


def _resolve(credentials: ClientCredentials | None) -> ClientCredentials:
    resolved = credentials if credentials is not None else _configured
    if resolved is None:
        raise NotConfigured(
            "no client credentials: call shepherd.channels.configure() at start, or pass credentials"
        )
    return resolved


# For a client that must notice a restarted server within a second (the fault-injection suite):
# gRPC's default reconnect backoff grows to two minutes.
FAST_RECONNECT: list[tuple[str, int | str]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def aio_channel(
    address: str,
    credentials: ClientCredentials | None = None,
    extra_options: Sequence[tuple[str, int | str]] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to `address` (host:port), with `credentials` or the process's own."""
    creds = _resolve(credentials)
    options = [*creds.options(), *extra_options]
    if creds.plaintext:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, creds.channel_credentials(), options=options)


def sync_channel(address: str, credentials: ClientCredentials | None = None) -> grpc.Channel:
    """A blocking channel to `address`, for tooling that is not async (health probes at start)."""
    creds = _resolve(credentials)
    if creds.plaintext:
        return grpc.insecure_channel(address, options=creds.options())
    return grpc.secure_channel(address, creds.channel_credentials(), options=creds.options())
