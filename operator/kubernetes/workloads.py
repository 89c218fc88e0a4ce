"""The kubernetes driver: carries out plan actions as Kubernetes objects, and reports what runs.

`Workloads` is the seam the controller drives; `KubernetesWorkloads` is the real one: Start renders
the unit (render.py) and server-side-applies it, Stop deletes it, Route re-points the engine
router over HTTP, and `observe` reads Pods, Deployments and the swarm DaemonSet back into the plan's
UnitStates. Kubernetes restarts crashed containers itself, so an object that exists counts as
running; readiness decides health, restarts count as failures, and a container stuck crashing shows
its reason as the unit's error.

VerifyModel is a check Pod on the host (render.render_model_check): it ends with the model's size
as its termination message, or why the file is refused. Sizes let the plan choose a hot-swap beside
the serving engine, which on Kubernetes also needs a second GPU unit per GPU of the stack on its
node (a device plugin lends each unit to one pod): without one, the switch is announced and short.

Hosts with `runtime: native` (a Mac running its own agent) are never scheduled: their units are
only looked at over the network (`probe_native`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kubernetes_asyncio import client

from tightwad.manifest import Manifest
from tightwad.manifest_views import Host
from tightwad.operator import health
from tightwad.operator.desired import Desired
from tightwad.operator.kubernetes.api import Rest, path_for
from tightwad.operator.kubernetes.cr import ClusterRef
from tightwad.operator.kubernetes.render import (
    ANNOTATION_MODEL,
    ANNOTATION_UNIT,
    CHECK_CONTAINER,
    CHECK_KIND,
    GPU_RESOURCES,
    LABEL_CLUSTER,
    LABEL_KIND,
    LABEL_UNIT,
    SWARM_UNITS,
    Owner,
    RenderSettings,
    check_name,
    object_name,
    render_config,
    render_model_check,
    render_swarm,
    render_unit,
    swarm_name,
    workload_name,
)
from tightwad.operator.observed import Health, ModelCheck, ModelKey, ModelState, Observed, UnitState
from tightwad.operator.plan import Action, Route, Start, Stop, VerifyModel
from tightwad.operator.units import ENGINE_ROUTER, Kind, ModelRef, Unit

log = logging.getLogger("tightwad.operator.kubernetes")

RECHECK_BAD_S = 30.0  # a refused model's check pod stays this long (for kubectl), then runs again


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


# -- model checks ---------------------------------------------------------------------------------


def check_key(pod: Mapping[str, Any]) -> ModelKey | None:
    text = pod.get("metadata", {}).get("annotations", {}).get(ANNOTATION_MODEL)
    if not text:
        return None
    data = json.loads(text)
    return (str(data["host"]), ModelRef.from_json(data["model"]))


def check_result(pod: Mapping[str, Any]) -> ModelCheck:
    """A check pod's answer: OK with the size its container reported, BAD with its reason, or
    CHECKING while it runs (or waits for the swarm to bring the file, or for a node)."""
    status = pod.get("status", {})
    phase = status.get("phase")
    container = next(
        (c for c in status.get("containerStatuses") or [] if c.get("name") == CHECK_CONTAINER), {}
    )
    ended = (container.get("state") or {}).get("terminated") or {}
    message = str(ended.get("message") or "").strip()
    if phase == "Succeeded":
        # A runtime that reports no termination message leaves the size unknown: no swap beside.
        return ModelCheck(ModelState.OK, size=int(message) if message.isdigit() else None)
    if phase == "Failed":
        return ModelCheck(
            ModelState.BAD, reason=message or f"the check exited with code {ended.get('exitCode')}"
        )
    unschedulable = next(
        (c.get("message") for c in status.get("conditions") or [] if c.get("reason") == "Unschedulable"), None
    )
    return ModelCheck(
        ModelState.CHECKING, reason=f"not scheduled: {unschedulable}" if unschedulable else None
    )


def room_for_a_second_stack(
    desired: Desired, scope: set[str], nodes: Mapping[str, Mapping[str, Any] | None]
) -> int | None:
    """`Observed.free_bytes` on Kubernetes: None (the plan judges by the declared pool and the
    models' sizes) when every GPU node of the stack can lend each of its GPUs a second time, else 0
    (a second stack could not be scheduled: the announced switch). `nodes`: node name -> Node."""
    if desired.pool_bytes is None:
        return None  # the plan cannot judge room anyway: it switches
    wanted: dict[tuple[str, str], int] = {}
    for worker in desired.stacks["a"].workers:
        resource = GPU_RESOURCES.get(str(worker.spec.get("backend")))
        if resource and worker.host in scope:
            wanted[(worker.host, resource)] = wanted.get((worker.host, resource), 0) + 1
    for (host, resource), count in wanted.items():
        node = nodes.get(host) or {}
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        if int(str(allocatable.get(resource, "0")) or 0) < 2 * count:
            return 0
    return None


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
        # Answers of finished check pods (the pods are deleted once read), per (host, model).
        self.checked: dict[ModelKey, ModelCheck] = {}
        self.told_no_nodes = False

    async def observe(self, context: Context, now: float) -> Observed:
        labels = {LABEL_CLUSTER: context.cluster.name}
        ns = context.cluster.namespace
        found: list[dict[str, Any]] = []
        for kind in ("Pod", "Deployment", "DaemonSet"):
            found += [{**o, "kind": kind} for o in await self.rest.list(kind, ns, labels)]
        pods = [o for o in found if o["kind"] == "Pod"]
        checks = [p for p in pods if p["metadata"].get("labels", {}).get(LABEL_KIND) == CHECK_KIND]
        # Deployments and bare Pods (rpc workers) carry their unit; the swarm DaemonSet its units.
        workloads = [o for o in found if o["kind"] == "DaemonSet" or _unit_of(o) is not None]
        states = states_from_objects(workloads, pods)
        models = await self._model_checks(context, checks, now)
        router = states.get(ENGINE_ROUTER)
        if router is not None and router.healthy:
            probe = await asyncio.to_thread(health.http_unit, router.unit)
            states[ENGINE_ROUTER] = router.with_(
                route=probe.body.get("unit"), inflight=dict(probe.body.get("inflight") or {})
            )
        if self.probe_native_hosts:
            states |= await self._native(context, states)
        free = await self._room(context, states)
        return Observed(now=now, units=states, models=models, free_bytes=free)

    async def _model_checks(
        self, context: Context, pods: Sequence[Mapping[str, Any]], now: float
    ) -> dict[ModelKey, ModelCheck]:
        running: dict[ModelKey, ModelCheck] = {}
        for pod in pods:
            key = check_key(pod)
            if key is None:
                continue
            result = check_result(pod)
            path = path_for("Pod", context.cluster.namespace, pod["metadata"]["name"])
            if result.state is ModelState.CHECKING:
                running[key] = result
                self.checked.pop(key, None)
            elif result.state is ModelState.OK:
                self.checked[key] = result
                await self.rest.delete(path)  # read: the answer is kept here
            else:
                finished = _time(_terminated_at(pod)) or now
                if now - finished >= RECHECK_BAD_S:
                    self.checked.pop(key, None)  # the file may have been replaced: check again
                    await self.rest.delete(path)
                else:
                    self.checked[key] = result
        return {**self.checked, **running}

    async def _room(self, context: Context, states: Mapping[str, UnitState]) -> int | None:
        """Only while a swap may be coming (an engine runs another model than the desired one) are
        the GPU nodes read: a converged pass costs no extra call."""
        desired_model = context.desired.engine.spec.get("model")
        engines = [s for s in states.values() if s.unit.kind is Kind.ENGINE]
        if not any(s.unit.spec.get("model") != desired_model for s in engines):
            return None
        scope = kubernetes_hosts(context.manifest)
        gpu_hosts = {
            w.host
            for w in context.desired.stacks["a"].workers
            if w.host in scope and w.spec.get("backend") in GPU_RESOURCES
        }
        try:
            nodes = {host: await self.rest.get(path_for("Node", None, host)) for host in sorted(gpu_hosts)}
        except client.ApiException as exc:
            if exc.status != 403:
                raise
            if not self.told_no_nodes:
                self.told_no_nodes = True
                log.info("may not read nodes (the chart's operator.readNodes): every model swap switches")
            return 0 if context.desired.pool_bytes is not None else None
        return room_for_a_second_stack(context.desired, scope, nodes)

    async def _native(self, context: Context, states: Mapping[str, UnitState]) -> dict[str, UnitState]:
        native = {h.name for h in context.manifest.hosts if h.runtime == "native"}
        # A healthy engine vouches for its own workers only: the other slot's (a swap loading
        # beside it) are greeted.
        attached = {
            n for s in states.values() if s.unit.kind is Kind.ENGINE and s.healthy for n in s.unit.needs
        }
        first = [u for u in context.desired.units if u.host in native]
        known = {u.name for u in first}
        other = [w for w in context.desired.stacks["b"].workers if w.host in native and w.name not in known]
        units = [*first, *other]
        results = await asyncio.gather(
            *(asyncio.to_thread(probe_native, u, u.name in attached) for u in units)
        )
        found = {u.name: r for u, r in zip(units, results, strict=True)}
        # The other slot's workers count only once their agent runs them (a swap under way).
        return {n: r for n, r in found.items() if n in known or r.running}

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
                unit = _unit_reading(context, host, model)
                if unit is None:
                    return f"verify model {model.name} on {host}: no unit there reads it"
                await self.rest.apply(
                    render_model_check(unit, model, context.owner, self.settings, context.hosts)
                )
                return f"verify model {model.name} on {host}: pod {check_name(context.owner, host, model)}"
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


def _terminated_at(pod: Mapping[str, Any]) -> str | None:
    for c in pod.get("status", {}).get("containerStatuses") or []:
        ended = (c.get("state") or {}).get("terminated")
        if ended:
            return ended.get("finishedAt")
    return None


def _unit_reading(context: Context, host: str, model: ModelRef) -> Unit | None:
    """A desired unit on `host` that reads `model` (its modelDir is where the check looks)."""
    stacks = context.desired.stacks.values()
    units = [*context.desired.units, *(s.engine for s in stacks), *(w for s in stacks for w in s.workers)]
    return next((u for u in units if u.host == host and model in u.models), None)
