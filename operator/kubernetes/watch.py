"""List-then-watch of TightwadCluster objects, kept as a local cache.

The informer pattern: list (which gives a resourceVersion), then watch from that resourceVersion;
when a watch ends (the server closes it after `watch_timeout`), watch again from the last version seen
(bookmarks move it too); when the server says that version is gone (410 Expired: etcd compacted it),
list again and report what changed meanwhile, deletions included. Errors back off exponentially
(capped), and a success resets the backoff. The callback gets the key of every object that changed;
the cache has its latest version (None: deleted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client, watch

from tightwad.crd import GROUP, PLURAL, VERSION

log = logging.getLogger("tightwad.operator.kubernetes")

OnChange = Callable[[str], Awaitable[None]]


@dataclass
class Backoff:
    """Exponential backoff with jitter: base, 2*base, ... up to cap."""

    base: float = 0.5
    cap: float = 30.0
    failures: int = 0

    def next_delay(self) -> float:
        self.failures += 1
        delay = min(self.cap, self.base * 2 ** (self.failures - 1))
        return delay * random.uniform(0.8, 1.0)

    def reset(self) -> None:
        self.failures = 0


@dataclass
class WatchCounters:
    lists: int = 0
    watches: int = 0
    expired: int = 0  # 410s answered by a relist
    errors: int = 0


def object_key(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace', 'default')}/{meta['name']}"


class ClusterWatch:
    """Mirrors every TightwadCluster in `namespace` (None: all namespaces) into `objects`."""

    def __init__(
        self,
        api: client.ApiClient,
        on_change: OnChange,
        *,
        namespace: str | None = None,
        watch_timeout: int = 300,
        backoff: Backoff | None = None,
    ) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.on_change = on_change
        self.namespace = namespace
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()
        self.objects: dict[str, dict[str, Any]] = {}
        self.resource_version: str | None = None
        self.counters = WatchCounters()
        self.synced = asyncio.Event()

    def _list_call(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if self.namespace:
            return self.custom.list_namespaced_custom_object, (GROUP, VERSION, self.namespace, PLURAL)
        return self.custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL)

    async def relist(self) -> None:
        func, args = self._list_call()
        result = await func(*args)
        self.counters.lists += 1
        fresh = {object_key(obj): obj for obj in result.get("items", [])}
        gone = set(self.objects) - set(fresh)
        changed = [
            key
            for key, obj in fresh.items()
            if self.objects.get(key, {}).get("metadata", {}).get("resourceVersion")
            != obj["metadata"].get("resourceVersion")
        ]
        self.objects = fresh
        self.resource_version = result["metadata"]["resourceVersion"]
        self.synced.set()
        for key in [*sorted(gone), *changed]:
            await self.on_change(key)

    async def watch_once(self) -> None:
        """One watch request, from the last resourceVersion, until the server ends it."""
        func, args = self._list_call()
        stream = watch.Watch()
        self.counters.watches += 1
        try:
            async for event in stream.stream(
                func,
                *args,
                resource_version=self.resource_version,
                timeout_seconds=self.watch_timeout,
                allow_watch_bookmarks=True,
            ):
                kind, obj = event["type"], event["raw_object"]
                self.resource_version = stream.resource_version or self.resource_version
                if kind == "BOOKMARK":
                    continue
                key = object_key(obj)
                if kind == "DELETED":
                    self.objects.pop(key, None)
                else:
                    self.objects[key] = obj
                self.backoff.reset()
                await self.on_change(key)
        finally:
            await stream.close()

    async def run(self, stop: asyncio.Event) -> None:
        """List and watch until `stop` is set."""
        while not stop.is_set():
            try:
                if self.resource_version is None:
                    await self.relist()
                await self.watch_once()
                self.backoff.reset()
            except client.ApiException as exc:
                if exc.status == 410:  # our resourceVersion was compacted away: start over from a list
                    self.counters.expired += 1
                    log.info("watch expired (410); listing again")
                    self.resource_version = None
                    continue
                await self._pause(stop, f"HTTP {exc.status}: {exc.reason}")
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:  # connection refused, reset, timeouts: retry with backoff
                await self._pause(stop, f"{type(exc).__name__}: {exc}")

    async def _pause(self, stop: asyncio.Event, why: str) -> None:
        self.counters.errors += 1
        delay = self.backoff.next_delay()
        log.warning("watching TightwadClusters failed (%s); retrying in %.1fs", why, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
