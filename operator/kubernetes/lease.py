"""Leader election on a coordination.k8s.io/v1 Lease, so two operator replicas never both act.

client-go's algorithm: the leader renews the Lease every `retry_period`; a candidate takes it over
only when it has seen the same record, unchanged, for longer than `lease_duration` by its OWN clock
(so clocks need not agree); every write carries the resourceVersion it read, and a 409 means another
replica won the race. A leader that cannot renew within `renew_deadline` stops acting.

The seam is `LeaseStore`: `CoordinationLeases` speaks the real Lease API (in a cluster, and in the
tests against the CRD API server, which serves coordination.k8s.io/v1 leases through a stand-in CRD
of the same shape, since it has no built-in Lease API).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from kubernetes_asyncio import client

from tightwad.errors import TightwadError

log = logging.getLogger("tightwad.operator.kubernetes")


class LeaseConflict(TightwadError):
    """Another replica wrote the Lease first."""


@dataclass(frozen=True)
class LeaseRecord:
    holder: str | None
    duration: int  # seconds
    acquired: dt.datetime | None
    renewed: dt.datetime | None
    transitions: int
    resource_version: str | None = None


class LeaseStore(Protocol):
    async def get(self) -> LeaseRecord | None: ...

    async def create(self, record: LeaseRecord) -> LeaseRecord: ...

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        """Write `record` if the Lease still has its resource_version; LeaseConflict if not."""
        ...


class CoordinationLeases:
    """A LeaseStore on the coordination.k8s.io/v1 Lease `name` in `namespace`."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str) -> None:
        self.leases = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name

    def _body(self, record: LeaseRecord) -> client.V1Lease:
        return client.V1Lease(
            api_version="coordination.k8s.io/v1",
            kind="Lease",
            metadata=client.V1ObjectMeta(
                name=self.name,
                namespace=self.namespace,
                resource_version=record.resource_version,
                labels={"app.kubernetes.io/name": "tightwad", "app.kubernetes.io/component": "operator"},
            ),
            spec=client.V1LeaseSpec(
                holder_identity=record.holder,
                lease_duration_seconds=record.duration,
                acquire_time=record.acquired,
                renew_time=record.renewed,
                lease_transitions=record.transitions,
            ),
        )

    @staticmethod
    def _record(lease: client.V1Lease) -> LeaseRecord:
        spec = lease.spec or client.V1LeaseSpec()
        return LeaseRecord(
            holder=spec.holder_identity,
            duration=int(spec.lease_duration_seconds or 0),
            acquired=spec.acquire_time,
            renewed=spec.renew_time,
            transitions=int(spec.lease_transitions or 0),
            resource_version=lease.metadata.resource_version,
        )

    async def get(self) -> LeaseRecord | None:
        try:
            return self._record(await self.leases.read_namespaced_lease(self.name, self.namespace))
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, record: LeaseRecord) -> LeaseRecord:
        try:
            lease = await self.leases.create_namespaced_lease(self.namespace, self._body(record))
        except client.ApiException as exc:
            if exc.status == 409:  # AlreadyExists: someone created it first
                raise LeaseConflict(self.name) from exc
            raise
        return self._record(lease)

    async def update(self, record: LeaseRecord) -> LeaseRecord:
        try:
            lease = await self.leases.replace_namespaced_lease(self.name, self.namespace, self._body(record))
        except client.ApiException as exc:
            if exc.status == 409:
                raise LeaseConflict(self.name) from exc
            raise
        return self._record(lease)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaderElector:
    """Acquires and keeps the Lease for `identity`."""

    def __init__(
        self,
        store: LeaseStore,
        identity: str,
        *,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not lease_duration > renew_deadline > retry_period > 0:
            raise ValueError("need lease_duration > renew_deadline > retry_period > 0")
        self.store = store
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock = clock
        self.observed: LeaseRecord | None = None
        self.observed_at = 0.0  # by our clock, when `observed` last changed
        self.is_leader = False

    def _same_holding(self, a: LeaseRecord | None, b: LeaseRecord) -> bool:
        return a is not None and (a.holder, a.renewed, a.resource_version) == (
            b.holder,
            b.renewed,
            b.resource_version,
        )

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when we hold the Lease afterwards."""
        now = _now()
        current = await self.store.get()
        if current is None:
            mine = LeaseRecord(self.identity, round(self.lease_duration), now, now, 0)
            try:
                self._observe(await self.store.create(mine))
            except LeaseConflict:
                return False
            return True
        if not self._same_holding(self.observed, current):
            self._observe(current)
        held_by_other = current.holder not in (None, "", self.identity)
        if held_by_other and self.clock() - self.observed_at < self.lease_duration:
            return False  # someone else holds it and has renewed within the lease
        if current.holder == self.identity:
            mine = replace(current, renewed=now, duration=round(self.lease_duration))
        else:
            mine = replace(
                current,
                holder=self.identity,
                acquired=now,
                renewed=now,
                duration=round(self.lease_duration),
                transitions=current.transitions + 1,
            )
        try:
            self._observe(await self.store.update(mine))
        except LeaseConflict:
            return False
        return True

    def _observe(self, record: LeaseRecord) -> None:
        self.observed = record
        self.observed_at = self.clock()

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until we lead (True) or `stop` is set (False)."""
        while not stop.is_set():
            try:
                if await self.try_acquire_or_renew():
                    self.is_leader = True
                    log.info("%s leads", self.identity)
                    return True
            except client.ApiException as exc:
                log.warning("leader election: HTTP %s: %s", exc.status, exc.reason)
            await _sleep_or_stop(stop, self.retry_period)
        return False

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew until `stop` is set, or return once renewing has failed for `renew_deadline`
        (leadership lost: the caller must stop acting)."""
        last_renewed = self.clock()
        while not stop.is_set():
            await _sleep_or_stop(stop, self.retry_period)
            if stop.is_set():
                break
            try:
                ok = await self.try_acquire_or_renew()
            except client.ApiException as exc:
                log.warning("renewing the lease: HTTP %s: %s", exc.status, exc.reason)
                ok = False
            except OSError as exc:
                log.warning("renewing the lease: %s", exc)
                ok = False
            if ok:
                last_renewed = self.clock()
            elif self.clock() - last_renewed > self.renew_deadline or (
                self.observed is not None and self.observed.holder not in (None, self.identity)
            ):
                self.is_leader = False
                log.warning("%s lost the lease", self.identity)
                return
        self.is_leader = False

    async def release(self) -> None:
        """Give the Lease up at once (on shutdown), so another replica need not wait it out."""
        current = await self.store.get()
        if current is None or current.holder != self.identity:
            return
        with contextlib.suppress(LeaseConflict):
            await self.store.update(replace(current, holder="", renewed=_now(), duration=1))


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
