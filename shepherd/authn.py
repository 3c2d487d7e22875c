"""Who is calling: the caller's identity from its certificate, its bearer token, or the mesh.

An identity is a string the policy matches: a SPIFFE ID (`spiffe://cluster.local/ns/<ns>/sa/<name>`)
when there is one, which is what Istio certificates, Shepherd's local certificates and
ServiceAccount tokens (mapped into the trust domain) all give; else a certificate's common name,
or `user:<name>` for a token of a user that is not a ServiceAccount.

Each source remembers what it worked out, keyed by what the connection or the call carries, so
the usual call costs a dict lookup: the certificate's identities (fixed for a connection), the
mesh header's value, or the token (checked with the TokenReview API at most once a minute).
Tokens are never logged, nor put into an error.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from shepherd.authz import spiffe_id
from shepherd.kube import ApiError, KubeClient, load_connection
from shepherd.logging import get_logger

AUTHORIZATION_HEADER = "authorization"
XFCC_HEADER = "x-forwarded-client-cert"
LINKERD_HEADER = "l5d-client-id"
_MAX_CACHED = 65_536
_TOKEN_TTL_S = 60.0
_REJECTED_TTL_S = 5.0
_SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


class Unauthenticated(Exception):
    """The call carries no acceptable credentials; the message says what is missing (no secrets)."""


class Unavailable(Exception):
    """The credentials could not be checked now (the API server did not answer)."""


class Authenticator(Protocol):
    async def identify(self, context: Any) -> str: ...

    async def close(self) -> None: ...


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if len(cache) >= _MAX_CACHED:
        cache.clear()
    cache[key] = value


class CertificateAuthenticator:
    """The verified client certificate: its SPIFFE URI SAN, else its common name."""

    def __init__(self) -> None:
        self._by_peer_ids: dict[tuple[bytes, ...], str] = {}

    async def identify(self, context: Any) -> str:
        ids = context.peer_identities()
        if not ids:
            raise Unauthenticated("no verified client certificate")
        key = tuple(ids)
        identity = self._by_peer_ids.get(key)
        if identity is not None:
            return identity
        for value in ids:
            if value.startswith(b"spiffe://"):
                identity = str(value.decode())
                _remember(self._by_peer_ids, key, identity)
                return identity
        # No SPIFFE ID: the common name, which the peer identities only hold when the certificate
        # has no alternative names at all; not cached, since other names could share those.
        names = context.auth_context().get("x509_common_name") or []
        if not names:
            raise Unauthenticated("the client certificate has neither a SPIFFE URI nor a common name")
        return str(names[0].decode())

    async def close(self) -> None:
        return None


def xfcc_identity(header: str) -> str | None:
    """The client's URI from the last element of an x-forwarded-client-cert value (the one the
    nearest proxy, our own sidecar, added), or None."""
    elements = _split_quoted(header, ",")
    if not elements:
        return None
    for pair in _split_quoted(elements[-1], ";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip().lower() == "uri":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace('\\"', '"')
            return value or None
    return None


def _split_quoted(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [p for p in (part.strip() for part in parts) if p]


def linkerd_identity(client_id: str, trust_domain: str) -> str | None:
    """A Linkerd client id (`<account>.<namespace>.serviceaccount.identity.<linkerd ns>.<domain>`)
    as the SPIFFE ID of that ServiceAccount, so one policy covers Istio, Linkerd and certificates."""
    parts = client_id.split(".")
    if len(parts) < 5 or parts[2:4] != ["serviceaccount", "identity"] or not all(parts[:2]):
        return None
    return spiffe_id(trust_domain, parts[1], parts[0])


class MeshAuthenticator:
    """The caller the mesh sidecar vouches for: Istio's (Envoy's) x-forwarded-client-cert, or with
    `linkerd` Linkerd's l5d-client-id. Each proxy sets its own header from the peer certificate of
    its mutual TLS and replaces one the client sent, but neither touches the other's header, so
    only the configured mesh's header is read: the other could be forged by the client."""

    def __init__(self, linkerd: bool = False, trust_domain: str = "cluster.local") -> None:
        self._header = LINKERD_HEADER if linkerd else XFCC_HEADER
        self._trust_domain = trust_domain
        self._by_header: dict[str, str] = {}

    async def identify(self, context: Any) -> str:
        header = None
        for key, value in context.invocation_metadata() or ():
            if key == self._header:
                header = str(value)
        if not header:
            raise Unauthenticated(f"no {self._header} header: is the mesh sidecar in front of this port?")
        identity = self._by_header.get(header)
        if identity is None:
            if self._header == XFCC_HEADER:
                identity = xfcc_identity(header)
                if identity is None:
                    raise Unauthenticated(f"the {XFCC_HEADER} header names no URI")
            else:
                identity = linkerd_identity(header, self._trust_domain)
                if identity is None:
                    raise Unauthenticated(f"the {LINKERD_HEADER} header names no ServiceAccount")
            _remember(self._by_header, header, identity)
        return identity

    async def close(self) -> None:
        return None


def token_user_identity(username: str, trust_domain: str) -> str:
    """A TokenReview user as an identity: ServiceAccounts become SPIFFE IDs in the trust domain,
    so one policy rule covers a scheduler with a certificate and one with a token."""
    if username.startswith(_SERVICE_ACCOUNT_PREFIX):
        namespace, _, account = username[len(_SERVICE_ACCOUNT_PREFIX) :].partition(":")
        if namespace and account:
            return spiffe_id(trust_domain, namespace, account)
    return f"user:{username}"


class TokenAuthenticator:
    """`authorization: Bearer <token>`, checked with the Kubernetes TokenReview API."""

    def __init__(self, kubeconfig: str | None, trust_domain: str, audiences: list[str]) -> None:
        self._kubeconfig = kubeconfig
        self._trust_domain = trust_domain
        self._audiences = audiences
        self._kube: KubeClient | None = None
        # token -> (identity or None when rejected, valid until); in memory only.
        self._cache: dict[str, tuple[str | None, float]] = {}
        self._pending: dict[str, asyncio.Future[str | None]] = {}
        self._log = get_logger(component="authn")

    async def identify(self, context: Any) -> str:
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION_HEADER:
                scheme, _, rest = str(value).partition(" ")
                if scheme.lower() == "bearer" and rest.strip():
                    token = rest.strip()
        if token is None:
            raise Unauthenticated("no bearer token (metadata `authorization: Bearer <token>`)")
        cached = self._cache.get(token)
        if cached is not None and cached[1] > time.monotonic():
            identity = cached[0]
        else:
            identity = await self._review_once(token)
        if identity is None:
            raise Unauthenticated("the bearer token was not accepted")
        return identity

    async def _review_once(self, token: str) -> str | None:
        """One TokenReview per token at a time, however many calls carry it meanwhile."""
        pending = self._pending.get(token)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        try:
            identity = await self._review(token)
            future.set_result(identity)
            ttl = _TOKEN_TTL_S if identity is not None else _REJECTED_TTL_S
            _remember(self._cache, token, (identity, time.monotonic() + ttl))
            return identity
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # retrieved here, so an unawaited future does not warn
            raise
        finally:
            del self._pending[token]

    async def _review(self, token: str) -> str | None:
        if self._kube is None:
            self._kube = KubeClient(load_connection(self._kubeconfig), max_connections=8, timeout_s=10.0)
        try:
            status = await self._kube.review_token(token, self._audiences)
        except (ApiError, OSError, TimeoutError) as err:
            # An ApiError's text is the API server's Status message, which never holds the token.
            self._log.warning("token review failed", error=type(err).__name__, message=str(err)[:300])
            raise Unavailable(
                "the bearer token cannot be checked now: the Kubernetes API did not answer"
            ) from None
        if not status.get("authenticated"):
            reason = str(status.get("error", "")).replace(token, "<token>")[:300]
            self._log.info("bearer token rejected", reason=reason)
            return None
        if self._audiences and not set(self._audiences) & set(status.get("audiences") or ()):
            self._log.info("bearer token rejected", reason="not for this audience")
            return None
        return token_user_identity(str(status.get("user", {}).get("username", "")), self._trust_domain)

    async def close(self) -> None:
        if self._kube is not None:
            await self._kube.close()
