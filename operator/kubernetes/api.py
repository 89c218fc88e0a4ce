"""Talking to the Kubernetes API: connecting, plain REST calls on any kind, and the two write
patterns the operator needs (server-side apply; read-modify-write answered by a retry on 409).

Everything goes through kubernetes_asyncio's ApiClient, so auth, TLS and proxies are the client's.
Objects are plain dicts (the JSON the server speaks), not the generated model classes: the
operator renders dicts and the same code path serves CRs, Deployments and Pods.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes_asyncio import client, config

from tightwad.errors import TightwadError

FIELD_MANAGER = "tightwad-operator"
MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

# kind -> (API prefix, plural) for the kinds Tightwad reads or writes.
KINDS: dict[str, tuple[str, str]] = {
    "Pod": ("/api/v1", "pods"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Event": ("/api/v1", "events"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "DaemonSet": ("/apis/apps/v1", "daemonsets"),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
    "Node": ("/api/v1", "nodes"),
    "TightwadCluster": ("/apis/tightwad.dev/v1alpha1", "tightwadclusters"),
}


class Conflict(TightwadError):
    """A write lost a race (409): the object changed since it was read."""


async def connect(kubeconfig: str | None = None, context: str | None = None) -> client.ApiClient:
    """An API client: in-cluster (the pod's service account) unless a kubeconfig is named or
    KUBERNETES_SERVICE_HOST is absent."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
        return client.ApiClient()
    configuration = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
    return client.ApiClient(configuration)


def path_for(
    kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None
) -> str:
    try:
        prefix, plural = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}; add it to tightwad.operator.kubernetes.api.KINDS") from None
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


class Rest:
    """JSON in, JSON out, on any path of the API."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        result = await self.api.call_api(
            path,
            method,
            {},
            list((query or {}).items()),
            {"Accept": "application/json", "Content-Type": content_type},
            body=body,
            response_types_map={200: "object", 201: "object", 202: "object"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
        )
        return result if isinstance(result, dict) else {}

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object at `path`, or None when there is none."""
        try:
            return await self.call("GET", path)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def list(
        self, kind: str, namespace: str | None, labels: Mapping[str, str] | None = None
    ) -> list[dict[str, Any]]:
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} if labels else None
        result = await self.call("GET", path_for(kind, namespace), query=query)
        return list(result.get("items", []))

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply `obj` as the operator's field manager (taking over conflicting fields:
        the operator owns what it renders)."""
        meta = obj["metadata"]
        path = path_for(obj["kind"], meta.get("namespace"), meta["name"])
        query = {"fieldManager": FIELD_MANAGER, "force": "true"}
        return await self.call("PATCH", path, body=dict(obj), query=query, content_type=APPLY_PATCH)

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch; with metadata.resourceVersion in it, a 409 (Conflict) when stale."""
        try:
            return await self.call("PATCH", path, body=dict(patch), content_type=MERGE_PATCH)
        except client.ApiException as exc:
            if exc.status == 409:
                raise Conflict(path) from exc
            raise

    async def replace(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """PUT `obj` (its resourceVersion is the precondition)."""
        try:
            return await self.call("PUT", path, body=dict(obj))
        except client.ApiException as exc:
            if exc.status == 409:
                raise Conflict(path) from exc
            raise

    async def delete(self, path: str, *, propagation: str = "Background") -> bool:
        """Delete; False when it was already gone."""
        try:
            await self.call("DELETE", path, body={"propagationPolicy": propagation})
        except client.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True


def merge_patch_between(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: changed fields, and null for
    the fields `new` no longer has (a patch that only carries `new` would leave those behind)."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_patch_between(before, value)
            if nested:
                patch[key] = nested
        elif value != before:
            patch[key] = value
    return patch


async def update_with_retry(
    rest: Rest,
    path: str,
    change: Callable[[dict[str, Any]], bool],
    *,
    attempts: int = 5,
    on_conflict: Callable[[], None] | None = None,
) -> dict[str, Any] | None:
    """Read the object, let `change` edit it in place (returning False when nothing needs to
    change), write it back with its resourceVersion; on 409 read it again and redo the change.
    None when the object is gone."""
    for _ in range(attempts):
        obj = await rest.get(path)
        if obj is None:
            return None
        if not change(obj):
            return obj
        try:
            return await rest.replace(path, obj)
        except Conflict:
            if on_conflict:
                on_conflict()
    raise Conflict(f"{path}: still changing after {attempts} attempts")
