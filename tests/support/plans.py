"""A hand-written manifest and `Sim`, a few lines that pretend to be a driver, for pure planner tests."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import yaml

from tightwad.manifest import manifest_from_dict
from tightwad.operator.desired import Desired, desired_state
from tightwad.operator.observed import Health, ModelCheck, ModelState, Observed, UnitState
from tightwad.operator.plan import ReconcilePlan, Route, Start, Stop, VerifyModel, plan
from tightwad.operator.units import Unit

NOW = 1_000_000.0
MiB = 2**20
GiB = 2**30

BASE = yaml.safe_load(
    """
apiVersion: tightwad.dev/v1alpha1
kind: TightwadCluster
metadata: {name: test}
spec:
  models:
    - {name: big, source: /models/big.gguf, contextSize: 1024}
    - {name: small, source: /models/small.gguf, contextSize: 1024}
    - {name: other, source: /models/other.gguf, contextSize: 1024}
  hosts:
    - name: box
      address: 127.0.0.1
      gpus:
        - {backend: cpu, port: 18100, threads: 1}
        - {backend: cpu, port: 18101, threads: 1}
  target: {model: big, host: box, port: 9000, maxConversations: 2}
  drafters:
    - {name: d1, kind: llama-server, model: small, host: box, port: 9001}
  proxy: {host: box, port: 9088}
  swarm: {enabled: false}
"""
)


def manifest_data(**edits: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for path, value in edits.items():
        node = data["spec"]
        *parents, last = path.split("__")
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return data


def desired(data: dict[str, Any] | None = None, components: Iterable[str] = ("proxy",)) -> Desired:
    return desired_state(manifest_from_dict(data or BASE), components=frozenset(components))


def running(unit: Unit, health: Health = Health.OK, **changes: Any) -> UnitState:
    return UnitState(unit=unit, running=True, health=health, started_at=NOW - 100, since=NOW - 100, **changes)


def ok_models(d: Desired, size: int = 100 * MiB) -> dict[Any, ModelCheck]:
    units = [*d.units, d.engine]
    return {(u.host, m): ModelCheck(ModelState.OK, size=size) for u in units for m in u.models}


class Sim:
    """A pretend driver: executes actions so the next pass sees their results (started units are
    healthy at once, verified models are fine unless listed as bad)."""

    def __init__(self, bad_models: dict[str, str] | None = None, size: int = 100 * MiB) -> None:
        self.units: dict[str, UnitState] = {}
        self.models: dict[Any, ModelCheck] = {}
        self.bad = bad_models or {}
        self.size = size
        self.log: list[str] = []
        self.free_bytes: int | None = None
        self.now = NOW

    def observed(self) -> Observed:
        return Observed(
            now=self.now, units=dict(self.units), models=dict(self.models), free_bytes=self.free_bytes
        )

    def apply(self, p: ReconcilePlan) -> None:
        for action in p.actions:
            match action:
                case Start(unit=unit):
                    self.units[unit.name] = running(unit)
                    self.log.append(f"start {unit.name}")
                case Stop(unit=unit):
                    self.units.pop(unit.name, None)
                    self.log.append(f"stop {unit.name}")
                case Route(router=router, backend=backend):
                    self.units[router.name] = self.units[router.name].with_(route=backend.name)
                    self.log.append(f"route {backend.name}")
                case VerifyModel(host=host, model=model):
                    bad = self.bad.get(model.name)
                    check = (
                        ModelCheck(ModelState.BAD, reason=bad)
                        if bad
                        else ModelCheck(ModelState.OK, size=self.size)
                    )
                    self.models[(host, model)] = check

    def converge(self, d: Desired, passes: int = 10, **kw: Any) -> ReconcilePlan:
        for _ in range(passes):
            p = plan(d, self.observed(), **kw)
            if p.converged:
                return p
            self.apply(p)
            self.now += 1
        raise AssertionError(f"did not converge: {p}")


def names(actions: Iterable[Any], kind: type) -> list[str]:
    """The unit (or model, for VerifyModel; backend, for Route) each action of `kind` is about."""
    out = []
    for action in actions:
        if not isinstance(action, kind):
            continue
        if isinstance(action, Route):
            out.append(action.backend.name)
        elif isinstance(action, VerifyModel):
            out.append(action.model.name)
        else:
            out.append(action.unit.name)
    return out
