"""The kubernetes driver: carries out plan actions as Kubernetes objects, and reports what runs.

`Workloads` is the seam the controller drives; `KubernetesWorkloads` is the real one: Start renders
the unit (render.py) and server-side-applies it, Stop deletes it, Route re-points the engine
router over HTTP, and `observe` reads Pods, Deployments and the swarm DaemonSet back into the plan's
UnitStates. Kubernetes restarts crashed containers itself, so an object that exists counts as
running; readiness decides health, restarts count as failures, and a container stuck crashing shows
its reason as the unit's error.

Hosts with `runtime: native` (a Mac running its own agent) are never scheduled: their units are
only looked at over the network (`probe_native`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tightwad.manifest import Manifest
from tightwad.manifest_views import Host
from tightwad.operator import health
from tightwad.operator.desired import Desired
from tightwad.operator.kubernetes.api import Rest, path_for
from tightwad.operator.kubernetes.cr import ClusterRef
from tightwad.operator.kubernetes.render import (
    ANNOTATION_UNIT,
    LABEL_CLUSTER,
    LABEL_UNIT,
    SWARM_UNITS,
    Owner,
    RenderSettings,
    object_name,
    render_config,
    render_swarm,
    render_unit,
    swarm_name,
    workload_name,
)
from tightwad.operator.observed import Health, ModelCheck, ModelKey, ModelState, Observed, UnitState
from tightwad.operator.plan import Action, Route, Start, Stop, VerifyModel
from tightwad.operator.units import ENGINE_ROUTER, Kind, Unit


@dataclass(frozen=True)
class Context:
    """What one reconcile pass knows about its cluster."""

    cluster: ClusterRef
    owner: Owner
    manifest: Manifest
    desired: Desired

    @property
    def hosts(self) -> dict[str, Host]:
        return {h.name: h for h in self.manifest.hosts}


class Workloads(Protocol):
    async def observe(self, context: Context, now: float) -> Observed: ...

    async def execute(self, context: Context, action: Action) -> str:
        """Carry out one action; a line saying what was done."""
        ...

    async def remove_all(self, cluster: ClusterRef) -> list[str]:
        """Delete every object of the cluster (the finalizer's job; owner references would too)."""
        ...


def kubernetes_hosts(manifest: Manifest) -> set[str]:
    return {h.name for h in manifest.hosts if h.runtime == "kubernetes"}


def models_verified_in_pod(units: Iterable[Unit], scope: set[str]) -> dict[ModelKey, ModelCheck]:
    """Models of in-cluster units (desired, or still running) are verified by the pod's init
    container (present in the model volume, matching the SHA-256) before the server starts; the
    plan need not wait on them."""
    verified = ModelCheck(ModelState.OK, reason="verified in the pod before it starts")
    return {(unit.host, model): verified for unit in units if unit.host in scope for model in unit.models}


# -- reading objects back -------------------------------------------------------------------------


def _time(text: str | None) -> float | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _ready_since(pod: Mapping[str, Any]) -> tuple[bool, float | None]:
    for condition in pod.get("status", {}).get("conditions", []) or []:
        if condition.get("type") == "Ready":
            return condition.get("status") == "True", _time(condition.get("lastTransitionTime"))
    return False, None


def pod_state(unit: Unit, pods: Sequence[Mapping[str, Any]], created: float | None) -> UnitState:
    """The UnitState of `unit` from its pods (the newest counts)."""
    if not pods:
        return UnitState(unit, running=True, health=Health.STARTING, started_at=created, error="no pod yet")
    pod = max(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""))
    status = pod.get("status", {})
    ready, since = _ready_since(pod)
    statuses = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    restarts = sum(int(s.get("restartCount", 0)) for s in statuses)
    error = None
    health_now = Health.OK if ready else Health.STARTING
    for s in statuses:
        waiting = (s.get("state") or {}).get("waiting")
        terminated = (s.get("lastState") or {}).get("terminated")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            error = f"{s.get('name')}: {waiting.get('reason')}: {waiting.get('message', '')}".rstrip(": ")
            if waiting.get("reason") in (
                "CrashLoopBackOff",
                "ImagePullBackOff",
                "ErrImagePull",
                "CreateContainerError",
            ):
                health_now = Health.FAILING
        elif terminated and not ready and error is None:
            error = (
                f"{s.get('name')} exited with code {terminated.get('exitCode')} ({terminated.get('reason')})"
            )
    if status.get("phase") == "Pending" and not statuses:
        reason = next(
            (
                c.get("message")
                for c in status.get("conditions", []) or []
                if c.get("reason") == "Unschedulable"
            ),
            None,
        )
        error = f"not scheduled: {reason}" if reason else None
    return UnitState(
        unit,
        running=True,
        health=health_now,
        started_at=_time(pod["metadata"].get("creationTimestamp")) or created,
        since=since,
        failures=0 if ready else restarts,  # restarts long ago do not make a serving unit a crash loop
        error=error,
        detail={"pod": pod["metadata"]["name"], "node": pod.get("spec", {}).get("nodeName")},
    )


def _unit_of(obj: Mapping[str, Any]) -> Unit | None:
    text = obj.get("metadata", {}).get("annotations", {}).get(ANNOTATION_UNIT)
    return Unit.from_json(json.loads(text)) if text else None


def states_from_objects(
    workloads: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]]
) -> dict[str, UnitState]:
    """UnitStates from a cluster's Pods, Deployments and swarm DaemonSet (pure; tests feed it dicts)."""
    by_unit: dict[str, list[Mapping[str, Any]]] = {}
    for pod in pods:
        name = pod["metadata"].get("labels", {}).get(LABEL_UNIT)
        if name:
            by_unit.setdefault(name, []).append(pod)
    states: dict[str, UnitState] = {}
    for obj in workloads:
        created = _time(obj["metadata"].get("creationTimestamp"))
        if obj["kind"] == "DaemonSet":
            units = [
                Unit.from_json(u) for u in json.loads(obj["metadata"]["annotations"].get(SWARM_UNITS, "[]"))
            ]
            swarm_pods = by_unit.get("swarm", [])
            for unit in units:
                on_node = [p for p in swarm_pods if p.get("spec", {}).get("nodeName") == unit.host]
                states[unit.name] = pod_state(unit, on_node, created)
            continue
        unit = _unit_of(obj)
        if unit is None:
            continue
        own = by_unit.get(unit.name, []) if obj["kind"] != "Pod" else [obj]
        states[unit.name] = pod_state(unit, own, created)
    return states


# -- native hosts ---------------------------------------------------------------------------------


def probe_native(unit: Unit, engine_healthy: bool) -> UnitState:
    """A unit an agent runs outside the cluster. An rpc worker is greeted (HELLO) only while no
    engine is up: with one attached, a probe's connection would wait in the worker's accept backlog
    (of one) and could lock the engine out; then the engine's own health vouches for its workers."""
    if unit.kind is Kind.WORKER:
        if engine_healthy:
            return UnitState(unit, running=True, health=Health.OK, detail={"vouched": "engine"})
        try:
            health.hello(unit.address, unit.port or 0)
        except TimeoutError:
            return UnitState(unit, running=True, health=Health.OK, detail={"busy": True})
        except OSError as exc:
            return UnitState(unit, running=False, health=Health.DOWN, error=f"not reachable: {exc}")
        return UnitState(unit, running=True, health=Health.OK)
    result = health.http_unit(unit)
    return UnitState(unit, running=True, health=result.health, error=result.error)


# -- the real driver ------------------------------------------------------------------------------


class KubernetesWorkloads:
    """Runs units as Kubernetes objects in the TightwadCluster's namespace."""

    def __init__(self, rest: Rest, settings: RenderSettings, *, probe_native_hosts: bool = True) -> None:
        self.rest = rest
        self.settings = settings
        self.probe_native_hosts = probe_native_hosts

    async def observe(self, context: Context, now: float) -> Observed:
        labels = {LABEL_CLUSTER: context.cluster.name}
        ns = context.cluster.namespace
        found: list[dict[str, Any]] = []
        for kind in ("Pod", "Deployment", "DaemonSet"):
            found += [{**o, "kind": kind} for o in await self.rest.list(kind, ns, labels)]
        pods = [o for o in found if o["kind"] == "Pod"]
        # Deployments and bare Pods (rpc workers) carry their unit; the swarm DaemonSet its units.
        workloads = [o for o in found if o["kind"] == "DaemonSet" or _unit_of(o) is not None]
        states = states_from_objects(workloads, pods)
        router = states.get(ENGINE_ROUTER)
        if router is not None and router.healthy:
            probe = await asyncio.to_thread(health.http_unit, router.unit)
            states[ENGINE_ROUTER] = router.with_(
                route=probe.body.get("unit"), inflight=dict(probe.body.get("inflight") or {})
            )
        if self.probe_native_hosts:
            states |= await self._native(context, states)
        scope = kubernetes_hosts(context.manifest)
        units = [*context.desired.units, context.desired.engine, *(s.unit for s in states.values())]
        return Observed(now=now, units=states, models=models_verified_in_pod(units, scope))

    async def _native(self, context: Context, states: Mapping[str, UnitState]) -> dict[str, UnitState]:
        native = {h.name for h in context.manifest.hosts if h.runtime == "native"}
        engine_up = any(s.healthy for s in states.values() if s.unit.kind is Kind.ENGINE)
        units = [u for u in context.desired.units if u.host in native]
        results = await asyncio.gather(*(asyncio.to_thread(probe_native, u, engine_up) for u in units))
        return {u.name: r for u, r in zip(units, results, strict=True)}

    async def execute(self, context: Context, action: Action) -> str:
        match action:
            case Start(unit=unit, reason=reason):
                await self.rest.apply(render_config(context.manifest, context.owner))
                if unit.kind is Kind.SWARM:
                    await self._apply_swarm(context)
                else:
                    for obj in render_unit(unit, context.owner, self.settings, context.hosts):
                        await self.rest.apply(obj)
                return f"start {unit.name} on {unit.host} ({reason})"
            case Stop(unit=unit, reason=reason):
                await self._delete(context, unit)
                return f"stop {unit.name} ({reason})"
            case Route(router=router, backend=backend, reason=reason):
                from tightwad.operator.reconcile import route

                token = context.manifest.token
                error = await asyncio.to_thread(route, router, backend, token)
                line = f"route {router.name} -> {backend.name} ({reason})"
                return f"{line}: failed, will retry: {error}" if error else line
            case VerifyModel(host=host, model=model):
                return f"verify model {model.name} on {host}: done in the pod's init container"
        raise TypeError(f"unknown action {action!r}")

    async def _apply_swarm(self, context: Context) -> None:
        scope = kubernetes_hosts(context.manifest)
        units = [u for u in context.desired.units if u.kind is Kind.SWARM and u.host in scope]
        if units:
            await self.rest.apply(render_swarm(units, context.owner, self.settings, context.hosts))
        else:
            await self.rest.delete(
                path_for("DaemonSet", context.cluster.namespace, swarm_name(context.owner))
            )

    async def _delete(self, context: Context, unit: Unit) -> None:
        ns = context.cluster.namespace
        if unit.kind is Kind.SWARM:
            await self._apply_swarm(context)
            return
        name = workload_name(context.owner, unit)
        kind = "Pod" if unit.kind is Kind.WORKER else "Deployment"
        await self.rest.delete(path_for(kind, ns, name))
        if unit.kind is Kind.PROXY:
            await self.rest.delete(path_for("Service", ns, object_name(context.owner.name, "proxy")))

    async def remove_all(self, cluster: ClusterRef) -> list[str]:
        labels = {LABEL_CLUSTER: cluster.name}
        removed = []
        for kind in ("Deployment", "DaemonSet", "Pod", "Service", "ConfigMap"):
            for obj in await self.rest.list(kind, cluster.namespace, labels):
                name = obj["metadata"]["name"]
                if await self.rest.delete(path_for(kind, cluster.namespace, name)):
                    removed.append(f"{kind}/{name}")
        return removed
