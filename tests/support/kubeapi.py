"""A real Kubernetes API server for the tests, and a workloads driver that records instead of running.

`start_server` runs scripts/start-crd-apiserver.sh: etcd plus the apiextensions-apiserver that
scripts/build-crd-apiserver.sh built (`make` builds it before the tests; a missing binary is a test
failure, never a skip). Watches go straight to etcd (--watch-cache=false), so compacting etcd
expires a watch's resourceVersion for real.

That server has no core API, so the rendered Pods and Deployments cannot be created there:
`RecordingWorkloads` renders every unit with the real renderer, validates each object against the
real Kubernetes schemas (kubernetes-validate), keeps it, and reports the units as running and ready.
Those objects are created for real, on a full control plane, in support/kubefull.py's tests.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate

from tightwad.operator.kubernetes.cr import ClusterRef
from tightwad.operator.kubernetes.render import RenderSettings, render_swarm, render_unit
from tightwad.operator.kubernetes.workloads import Context, kubernetes_hosts, models_verified_in_pod
from tightwad.operator.observed import Health, Observed, UnitState
from tightwad.operator.plan import Action, Route, Start, Stop, VerifyModel
from tightwad.operator.units import ENGINE_ROUTER, Kind, Unit

from . import ROOT, kubelocal

__all__ = ["ROOT", "RecordingWorkloads", "Server", "start_server", "stop_server", "validate"]

KUBERNETES_VERSION = "1.37.0"


@dataclass(frozen=True)
class Server:
    folder: Path
    kubeconfig: Path
    etcd_url: str

    def etcd(self, call: str, body: dict[str, Any]) -> dict[str, Any]:
        """One call of etcd's JSON gateway (e.g. kv/range, kv/compaction)."""
        request = urllib.request.Request(
            f"{self.etcd_url}/v3/{call}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def compact(self) -> int:
        """Compact etcd at its current revision: every older resourceVersion expires (410)."""
        key = base64.b64encode(b"/").decode()
        revision = int(self.etcd("kv/range", {"key": key})["header"]["revision"])
        self.etcd("kv/compaction", {"revision": str(revision), "physical": True})
        return revision


def start_server(folder: Path) -> Server:
    kubeconfig = kubelocal.start(
        "start-crd-apiserver.sh",
        folder,
        what="the CRD API server",
        build="scripts/build-crd-apiserver.sh",
        timeout=120,
        env={"TIGHTWAD_CRD_APISERVER_ARGS": "--watch-cache=false"},
    )
    return Server(folder, kubeconfig, (folder / "etcd.url").read_text().strip())


def stop_server(server: Server) -> None:
    kubelocal.stop("start-crd-apiserver.sh", server.folder)


def validate(obj: dict[str, Any]) -> None:
    """Raise unless `obj` is valid against the real Kubernetes schema of its kind (strict: unknown
    fields are errors)."""
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@dataclass
class RecordingWorkloads:
    """A Workloads driver that renders, validates and records; every started unit is ready."""

    settings: RenderSettings = field(default_factory=lambda: RenderSettings(token_secret="tightwad-token"))
    running: dict[str, Unit] = field(default_factory=dict)
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    actions: list[Action] = field(default_factory=list)
    removed: list[ClusterRef] = field(default_factory=list)
    route: str | None = None
    # Called inside every observe until it returns True: another writer acting mid-pass.
    interfere: Callable[[Context], Awaitable[bool]] | None = None

    async def observe(self, context: Context, now: float) -> Observed:
        if self.interfere is not None and await self.interfere(context):
            self.interfere = None
        states = {
            name: UnitState(
                unit,
                running=True,
                health=Health.OK,
                started_at=now - 60,
                since=now - 60,
                route=self.route if name == ENGINE_ROUTER else None,
            )
            for name, unit in self.running.items()
        }
        # The agents on native hosts report their units up.
        for unit in context.desired.units:
            if context.hosts[unit.host].runtime == "native":
                states[unit.name] = UnitState(unit, running=True, health=Health.OK, started_at=now - 60)
        scope = kubernetes_hosts(context.manifest)
        units = [*context.desired.units, context.desired.engine, *(s.unit for s in states.values())]
        return Observed(now=now, units=states, models=models_verified_in_pod(units, scope))

    async def execute(self, context: Context, action: Action) -> str:
        self.actions.append(action)
        match action:
            case Start(unit=unit):
                if unit.kind is Kind.SWARM:
                    scope = kubernetes_hosts(context.manifest)
                    swarm = [u for u in context.desired.units if u.kind is Kind.SWARM and u.host in scope]
                    objects = [render_swarm(swarm, context.owner, self.settings, context.hosts)]
                else:
                    objects = render_unit(unit, context.owner, self.settings, context.hosts)
                for obj in objects:
                    validate(obj)
                    self.objects[(obj["kind"], obj["metadata"]["name"])] = obj
                self.running[unit.name] = unit
                return f"start {unit.name}"
            case Stop(unit=unit):
                self.running.pop(unit.name, None)
                return f"stop {unit.name}"
            case Route(backend=backend):
                self.route = backend.name
                return f"route to {backend.name}"
            case VerifyModel(host=host, model=model):
                return f"verify {model.name} on {host}"
        raise TypeError(action)

    async def remove_all(self, cluster: ClusterRef) -> list[str]:
        self.removed.append(cluster)
        names = list(self.running)
        self.running.clear()
        return names

    def started(self, kind: Kind) -> list[Unit]:
        return [a.unit for a in self.actions if isinstance(a, Start) and a.unit.kind is kind]

    def stops(self) -> list[Unit]:
        return [a.unit for a in self.actions if isinstance(a, Stop)]
