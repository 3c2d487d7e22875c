"""Async calls to the Kubernetes API that the services need, speaking raw JSON.

Watch events are split from the byte stream ourselves and parsed with orjson straight into
dicts: no model objects, no per-line size limit, and an inactivity timeout that catches a
silent or half-open stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from shepherd.kube.config import KubeConnection
from shepherd.kube.errors import BACKOFF_BASE_S, ApiError, backoff_s

_STRICT = {"fieldValidation": "Strict"}


class WatchExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): the caller must re-list."""


def _pods_path(namespace: str | None) -> str:
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/pods" if namespace else "/api/v1/pods"


class KubeClient:
    """One pooled HTTP session to one API server."""

    def __init__(
        self, connection: KubeConnection, *, max_connections: int = 128, timeout_s: float = 30.0
    ) -> None:
        self._conn = connection
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=max_connections, ssl=connection.ssl_context, keepalive_timeout=60
            ),
            json_serialize=lambda obj: orjson.dumps(obj).decode(),
        )

    async def close(self) -> None:
        await self._session.close()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
        client_timeout: aiohttp.ClientTimeout | None = None,
    ) -> bytes:
        headers = {"Accept": "application/json", "Content-Type": content_type, **self._conn.headers()}
        async with self._session.request(
            method,
            self._conn.server + path,
            params=params,
            data=body,
            headers=headers,
            timeout=client_timeout or self._timeout,
        ) as resp:
            data = await resp.read()
            if resp.status >= 400:
                raise ApiError.from_response(resp.status, data, resp.headers)
            return data

    async def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        return orjson.loads(await self._request("GET", path, params=params))

    async def review_token(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """The TokenReview API's verdict on a bearer token (its `status`). The answer echoes the
        token in its spec, so only the status is returned."""
        spec: dict[str, Any] = {"token": token}
        if audiences:
            spec["audiences"] = audiences
        review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
        data = await self._request(
            "POST", "/apis/authentication.k8s.io/v1/tokenreviews", body=orjson.dumps(review)
        )
        status: dict[str, Any] = orjson.loads(data).get("status") or {}
        return status

    async def create_pod(self, namespace: str, pod: Mapping[str, Any]) -> None:
        """Create a pod. The created object is not parsed: the watcher reports it anyway. Strict field
        validation: an unknown or duplicate field fails the create (400) instead of being dropped."""
        await self._request("POST", _pods_path(namespace), params=_STRICT, body=orjson.dumps(pod))

    async def pod_exists(self, namespace: str, name: str) -> bool:
        """Whether a pod of that name exists now. Without a resourceVersion the API server reads
        etcd (a quorum read), not its watch cache, so a pod just created or deleted is not missed."""
        try:
            await self._request("GET", f"{_pods_path(namespace)}/{quote(name, safe='')}")
        except ApiError as err:
            if err.status == 404:
                return False
            raise
        return True

    async def ready(self, *, timeout_s: float = 5.0) -> None:
        """Return if the API server says it is ready (GET /readyz, which every authenticated
        identity may read); raise ApiError or a connection error otherwise."""
        await self._request("GET", "/readyz", client_timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def list_pods(
        self,
        namespace: str | None,
        *,
        label_selector: str = "",
        field_selector: str = "",
        limit: int = 500,
        continue_token: str = "",
    ) -> dict[str, Any]:
        params = {"labelSelector": label_selector, "limit": str(limit)}
        if field_selector:
            params["fieldSelector"] = field_selector
        if continue_token:
            params["continue"] = continue_token
        page: dict[str, Any] = await self.get_json(_pods_path(namespace), params)
        return page

    async def pod_pages(
        self, namespace: str | None, *, label_selector: str = ""
    ) -> AsyncIterator[tuple[list[dict[str, Any]], str]]:
        """The matching pods a page at a time, each with the list's resourceVersion (the pages of
        one list are one consistent snapshot). A caller that handles each page and lets it go
        holds one page, not 10,000 parsed pods (hundreds of MB), whatever the list's size."""
        token = ""
        while True:
            page = await self.list_pods(namespace, label_selector=label_selector, continue_token=token)
            metadata = page.get("metadata") or {}
            yield page.get("items") or [], str(metadata.get("resourceVersion", ""))
            token = metadata.get("continue", "")
            if not token:
                return

    async def list_all_pods(
        self, namespace: str | None, *, label_selector: str = ""
    ) -> tuple[list[dict[str, Any]], str]:
        """Every matching pod, paging through the API, and the resourceVersion of the list."""
        items: list[dict[str, Any]] = []
        resource_version = ""
        async for page, page_version in self.pod_pages(namespace, label_selector=label_selector):
            items.extend(page)
            resource_version = page_version
        return items, resource_version

    async def watch_pods(
        self,
        namespace: str | None,
        *,
        label_selector: str,
        resource_version: str,
        server_timeout_s: int = 300,
        inactivity_timeout_s: float = 90.0,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield raw watch events ({"type", "object"}), bookmarks included. Raises WatchExpired on 410,
        asyncio.TimeoutError when nothing (not even a bookmark) arrives for inactivity_timeout_s."""
        params = {
            "watch": "true",
            "allowWatchBookmarks": "true",
            "labelSelector": label_selector,
            "resourceVersion": resource_version,
            "timeoutSeconds": str(server_timeout_s),
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=inactivity_timeout_s)
        headers = {"Accept": "application/json", **self._conn.headers()}
        async with self._session.get(
            self._conn.server + _pods_path(namespace), params=params, headers=headers, timeout=timeout
        ) as resp:
            if resp.status == 410:
                raise WatchExpired(resource_version)
            if resp.status >= 400:
                raise ApiError.from_response(resp.status, await resp.read(), resp.headers)
            partial = b""  # an event split across chunks
            async for chunk in resp.content.iter_any():
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()
                for line in lines:
                    if not line.strip():
                        continue
                    event: dict[str, Any] = orjson.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        if status.get("code") == 410:
                            raise WatchExpired(resource_version)
                        raise ApiError(
                            int(status.get("code") or 500),
                            str(status.get("reason", "")),
                            str(status.get("message", "watch error")),
                        )
                    yield event

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The pod as the API server has it now, or None when no pod has that name."""
        try:
            pod: dict[str, Any] = await self.get_json(f"{_pods_path(namespace)}/{quote(name, safe='')}")
        except ApiError as err:
            if err.status == 404:
                return None
            raise
        return pod

    async def patch_pod(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        data = await self._request(
            "PATCH",
            f"{_pods_path(namespace)}/{quote(name, safe='')}",
            body=orjson.dumps(patch),
            content_type="application/merge-patch+json",
        )
        patched: dict[str, Any] = orjson.loads(data)
        return patched

    async def delete_pod(
        self, namespace: str, name: str, *, uid: str | None = None, grace_period_s: int | None = None
    ) -> bool:
        """Delete a pod; False if it was already gone. With `uid`, never deletes a newer pod of that name."""
        options: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if uid:
            options["preconditions"] = {"uid": uid}
        if grace_period_s is not None:
            options["gracePeriodSeconds"] = grace_period_s
        try:
            await self._request(
                "DELETE", f"{_pods_path(namespace)}/{quote(name, safe='')}", body=orjson.dumps(options)
            )
        except ApiError as err:
            if err.status == 404 or (err.status == 409 and uid):
                return False
            raise
        return True

    async def pod_events(self, namespace: str, pod_uid: str, *, limit: int = 500) -> list[dict[str, Any]]:
        """The core/v1 Events about one pod (by UID, so never another pod's of the same name)."""
        listed = await self.get_json(
            f"/api/v1/namespaces/{quote(namespace, safe='')}/events",
            {"fieldSelector": f"involvedObject.uid={pod_uid}", "limit": str(limit)},
        )
        items: list[dict[str, Any]] = listed.get("items") or []
        return items

    async def pod_log(
        self, namespace: str, name: str, *, container: str, tail_lines: int, follow: bool
    ) -> AsyncIterator[bytes]:
        params = {
            "container": container,
            "tailLines": str(tail_lines),
            "follow": "true" if follow else "false",
        }
        timeout = aiohttp.ClientTimeout(total=None if follow else 60, sock_connect=30)
        async with self._session.get(
            f"{self._conn.server}{_pods_path(namespace)}/{quote(name, safe='')}/log",
            params=params,
            headers=self._conn.headers(),
            timeout=timeout,
        ) as resp:
            if resp.status >= 400:
                raise ApiError.from_response(resp.status, await resp.read(), resp.headers)
            async for chunk in resp.content.iter_any():
                yield chunk


async def sleep_backoff(
    attempt: int, *, base_s: float = BACKOFF_BASE_S, cap_s: float = 10.0, floor_s: float = 0.0
) -> None:
    """Capped exponential backoff with jitter (see errors.backoff_s), never shorter than floor_s."""
    await asyncio.sleep(backoff_s(attempt, base_s=base_s, cap_s=cap_s, floor_s=floor_s))
