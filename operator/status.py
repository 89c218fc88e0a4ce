"""Status: what the cluster is doing, as Kubernetes-style conditions plus one line per unit.

Built from the desired state, the observed state and the plan of one pass; written atomically to a
JSON file beside a plain manifest (`cluster.yaml` -> `cluster.status.json`), the file `tightwad
status` reads. Conditions: Ready (the endpoint serves a model), Progressing (there is work under
way), Degraded (something needs a person), each with a reason and since when. `generation` counts
the distinct manifests seen; `observedGeneration` is the one these conditions describe.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tightwad.operator.desired import Desired
from tightwad.operator.observed import Health, Observed, UnitState
from tightwad.operator.plan import ReconcilePlan, Start, Stop
from tightwad.operator.units import ENGINE_ROUTER, KIND_ORDER, PROXY, Kind

STATUS_FORMAT = 1


def status_path_for(manifest: Path) -> Path:
    return manifest.with_name(f"{manifest.stem}.status.json")


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def _observed_word(state: UnitState | None) -> str:
    if state is None:
        return "absent"
    if not state.running:
        return "exited"
    return {Health.OK: "running", Health.STARTING: "starting", Health.FAILING: "failing"}.get(
        state.health, "down"
    )


def conditions(
    desired: Desired | None,
    observed: Observed,
    plan: ReconcilePlan | None,
    manifest_error: str | None,
    extra_problems: Sequence[tuple[str, str]] = (),
) -> list[Condition]:
    units = observed.units
    router = units.get(ENGINE_ROUTER)
    engine = units.get(router.route) if router and router.healthy and router.route else None
    front = units.get(PROXY) if desired is not None and PROXY in desired.by_name else router
    serving = engine is not None and engine.healthy and front is not None and front.healthy
    endpoint = desired.endpoint if desired else None
    if serving and engine is not None:
        ready = Condition("Ready", True, "Serving", f"{engine.unit.spec['model']} at {endpoint}/v1")
    else:
        waiting = ", ".join(f"{n}: {w}" for n, w in list(plan.waiting.items())[:3]) if plan else ""
        ready = Condition("Ready", False, "NotServing", waiting or "no engine is serving yet")

    problems = []
    if manifest_error:
        problems.append(
            (
                "ManifestInvalid",
                f"the manifest is invalid; the last good one stays in force: {manifest_error}",
            )
        )
    problems += [(p.reason, p.message) for p in (plan.problems if plan else ())]
    problems += list(extra_problems)
    if problems:
        degraded = Condition("Degraded", True, problems[0][0], "; ".join(m for _, m in problems))
    else:
        degraded = Condition("Degraded", False, "AsExpected", "nothing needs attention")

    if plan is None:
        progressing = Condition("Progressing", False, "NoValidManifest", "waiting for a valid manifest")
    elif plan.converged:
        progressing = Condition("Progressing", False, "Converged", "every unit matches the manifest")
    else:
        steps = [
            f"{'start' if isinstance(a, Start) else 'stop'} {a.unit.name}"
            for a in plan.actions
            if isinstance(a, Start | Stop)
        ]
        steps += [f"{n}: {w}" for n, w in plan.waiting.items()]
        reason = "SwappingModel" if plan.swap else "Reconciling"
        message = plan.swap or "; ".join(steps[:4]) or "waiting for units to become healthy"
        progressing = Condition("Progressing", True, reason, message)
    return [ready, progressing, degraded]


def unit_rows(
    desired: Desired | None, observed: Observed, plan: ReconcilePlan | None
) -> list[dict[str, Any]]:
    """One row per unit desired or observed: the stack the plan converges to, plus everything else."""
    wanted: dict[str, Any] = {}
    if desired is not None:
        stack = plan.stack if plan is not None else desired.stacks["a"]
        wanted = {u.name: u for u in (*desired.services, *stack.units)}
    rows = []
    for name in set(wanted) | set(observed.units):
        state = observed.units.get(name)
        unit = state.unit if state else wanted[name]
        is_desired = name in wanted
        row: dict[str, Any] = {
            "name": name,
            "kind": unit.kind.value,
            "host": unit.host,
            "runtime": unit.runtime,
            "port": unit.port,
            "desired": "running" if is_desired else "absent",
            "observed": _observed_word(state),
            "healthy": bool(state and state.healthy),
            "specHash": unit.spec_hash,
            "restarts": state.failures if state else 0,
            "lastError": state.error if state else None,
            "waiting": plan.waiting.get(name) if plan else None,
        }
        if unit.kind is Kind.ENGINE:
            row["model"] = unit.spec.get("model")
        if state is not None:
            row |= {k: v for k, v in state.detail.items() if k in ("pid", "log", "container")}
            row["adopted"] = state.adopted
            if state.route:
                row["route"] = state.route
        rows.append(row)
    rows.sort(key=lambda r: (KIND_ORDER[Kind(r["kind"])], r["name"]))
    return rows


_ROWS = "\0units\0"  # where the unit rows go; JSON writes it escaped, so no value can spell it


def render_json(doc: dict[str, Any]) -> str:
    """The status document as indented JSON with one unit row per line. The same JSON as
    `json.dumps(doc, indent=2)`, laid out differently: indenting is done in pure Python and took
    most of a pass's time at 1000 hosts; a row per line is written by the C encoder."""
    units = doc.get("units")
    if not isinstance(units, list) or not units:
        return json.dumps(doc, indent=2) + "\n"
    head = json.dumps({**doc, "units": _ROWS}, indent=2)
    rows = ",\n".join(f"    {json.dumps(row)}" for row in units)
    return head.replace(json.dumps(_ROWS), f"[\n{rows}\n  ]", 1) + "\n"


class StatusFile:
    """The status document on disk, and the generation counter it carries between runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.previous = self.read(path) or {}

    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def generation(self, manifest_digest: str) -> int:
        """The generation of the manifest with this digest: bumped whenever the digest changes."""
        generation = int(self.previous.get("generation", 0))
        if self.previous.get("manifestDigest") != manifest_digest:
            generation += 1
        return generation

    def write(
        self,
        *,
        cluster: str | None,
        manifest: str,
        manifest_digest: str,
        desired: Desired | None,
        observed: Observed,
        plan: ReconcilePlan | None,
        manifest_error: str | None,
        problems: Sequence[tuple[str, str]] = (),
        operator: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        generation = self.generation(manifest_digest)
        now = observed.now
        old = {c["type"]: c for c in self.previous.get("conditions", [])}
        rendered = []
        for c in conditions(desired, observed, plan, manifest_error, problems):
            status = "True" if c.status else "False"
            before = old.get(c.type)
            since = before["lastTransitionTime"] if before and before.get("status") == status else _iso(now)
            rendered.append(
                {
                    "type": c.type,
                    "status": status,
                    "reason": c.reason,
                    "message": c.message,
                    "lastTransitionTime": since,
                    "observedGeneration": generation,
                }
            )
        router = observed.units.get(ENGINE_ROUTER)
        doc = {
            "format": STATUS_FORMAT,
            "cluster": cluster or self.previous.get("cluster"),
            "manifest": manifest,
            "manifestDigest": manifest_digest,
            "generation": generation,
            "observedGeneration": generation,
            "updatedAt": _iso(now),
            "endpoint": f"{desired.endpoint}/v1" if desired else self.previous.get("endpoint"),
            "model": {
                "desired": desired.engine.spec["model"] if desired else None,
                "serving": plan.serving and observed.units[plan.serving].unit.spec["model"] if plan else None,
            },
            "swap": plan.swap if plan else None,
            "conditions": rendered,
            "units": unit_rows(desired, observed, plan),
            "route": router.route if router else None,
            "notes": list(desired.notes) if desired else [],
            "operator": operator or {},
        }
        self._save(doc)
        return doc

    def write_stopped(self, now: float, why: str) -> None:
        """The operator stopped its units on purpose (Ctrl-C, `tightwad down`): say so, rather than
        leave the last pass's "Ready" behind."""
        doc = dict(self.previous)
        if not doc:
            return
        stamp = _iso(now)
        generation = doc.get("generation", 0)
        condition = {"status": "False", "reason": "Stopped", "message": why, "lastTransitionTime": stamp}
        doc["conditions"] = [
            {"type": kind, **condition, "observedGeneration": generation}
            for kind in ("Ready", "Progressing", "Degraded")
        ]
        doc["units"] = [{**u, "observed": "absent", "healthy": False} for u in doc.get("units", [])]
        doc["model"] = {**doc.get("model", {}), "serving": None}
        doc["updatedAt"] = stamp
        doc["operator"] = {**doc.get("operator", {}), "pid": None, "stoppedAt": stamp}
        self._save(doc)

    def _save(self, doc: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(render_json(doc))
        os.replace(tmp, self.path)
        self.previous = doc
