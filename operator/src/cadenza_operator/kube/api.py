"""A small async Kubernetes API client for what the operator writes itself.

kopf reads and watches the Cadenza resources and patches them after its handlers; the
rest (agent Deployments, ServiceAccounts, Services, the debounced WorkflowRun status,
mirrored and garbage-collected WorkflowRuns) goes through this client. It is async
(aiohttp, like kopf) so no call blocks the event loop the engine shares, and it speaks
plain dicts, the shape the `build_*()` functions produce.

Credentials come from the official client's loaders: in-cluster (the service account
token, re-read as the kubelet rotates it) or the kubeconfig (`$KUBECONFIG`, the same
file kopf logs in with).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf

from ..models import API_GROUP, API_VERSION

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"

Json = dict[str, Any]


class ApiError(Exception):
    """A non-2xx answer; `status` is the HTTP status (404, 409, 422, ...)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def path_of(
    api_version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """`/api/v1/...` or `/apis/GROUP/VERSION/...` for a resource (collection, object or subresource)."""
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [root]
    if namespace is not None:
        parts.append(f"namespaces/{quote(namespace, safe='')}")
    parts.append(plural)
    if name is not None:
        parts.append(quote(name, safe=""))
        if subresource:
            parts.append(subresource)
    return "/".join(parts)


def workflowrun_path(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    return path_of(f"{API_GROUP}/{API_VERSION}", "workflowruns", namespace, name, subresource)


class KubeApi:
    """Requests to the Kubernetes API with the operator's credentials."""

    def __init__(self, configuration: Any) -> None:
        self._config = configuration
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0  # served requests, for metrics and tests

    @classmethod
    def from_environment(cls) -> KubeApi:
        """In-cluster credentials when running in a pod, else the kubeconfig."""
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
        return cls(configuration)

    @classmethod
    def for_server(cls, server: str, token: str | None = None) -> KubeApi:
        """A client for one API server URL (tests: the API emulator)."""
        from kubernetes import client

        configuration = client.Configuration(host=server)
        if token:
            configuration.api_key["BearerToken"] = token
            configuration.api_key_prefix["BearerToken"] = "Bearer"
        return cls(configuration)

    def connection_info(self) -> kopf.ConnectionInfo:
        """The same server and credentials, for kopf's login: kopf and this client always
        talk to one API server as one user."""
        cfg = self._config
        header = cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
        scheme, _, token = (header or "").rpartition(" ")
        return kopf.ConnectionInfo(
            server=cfg.host,
            ca_path=cfg.ssl_ca_cert,
            insecure=not cfg.verify_ssl,
            username=cfg.username or None,
            password=cfg.password or None,
            scheme=scheme or None,
            token=token or None,
            certificate_path=cfg.cert_file,
            private_key_path=cfg.key_file,
        )

    def _ssl(self) -> ssl.SSLContext | bool:
        cfg = self._config
        if not cfg.host.startswith("https"):
            return False
        context = (
            ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if cfg.ssl_ca_cert
            else (ssl.create_default_context())
        )
        if not cfg.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, cfg.key_file)
        return context

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl(), limit=32)
            self._session = aiohttp.ClientSession(
                base_url=self._config.host.rstrip("/"),
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        # auth_settings() calls the token refresh hook: in a pod it re-reads the rotated token.
        for auth in self._config.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        if self._config.username and self._config.password:
            headers["Authorization"] = self._config.get_basic_auth_token()
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Json:
        session = await self._client()
        data = None if body is None else json.dumps(body)
        if data is not None and content_type is None:
            content_type = "application/json"
        async with session.request(
            method, path, data=data, params=params, headers=self._headers(content_type)
        ) as response:
            self.requests += 1
            text = await response.text()
            if response.status >= 400:
                try:
                    status = json.loads(text)
                    reason, message = status.get("reason", ""), status.get("message", text)
                except ValueError:
                    reason, message = response.reason or "", text
                raise ApiError(response.status, str(reason), str(message))
            result: Json = json.loads(text) if text else {}
            return result

    async def get(self, path: str) -> Json | None:
        """The object, or None if it does not exist."""
        try:
            return await self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def list(self, path: str, label_selector: str | None = None) -> list[Json]:
        params = {"labelSelector": label_selector} if label_selector else None
        items: list[Json] = (await self.request("GET", path, params=params)).get("items", [])
        return items

    async def create(self, path: str, body: Json) -> Json:
        return await self.request("POST", path, body)

    async def patch(self, path: str, patch: Any, *, content_type: str = MERGE_PATCH) -> Json:
        return await self.request("PATCH", path, patch, content_type=content_type)

    async def delete(self, path: str, *, preconditions: Json | None = None) -> bool:
        """Delete; False if it was already gone."""
        body: Json = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if preconditions:
            body["preconditions"] = preconditions
        try:
            await self.request("DELETE", path, body)
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
