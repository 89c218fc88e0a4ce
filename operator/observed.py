"""The observed state: what drivers found running, what probes said, which models checked out.

Drivers build these; `plan` reads them. Plain frozen data, so tests write observed states by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from tightwad.operator.units import ModelRef, Unit


class Health(StrEnum):
    OK = "ok"  # answers and says it serves
    STARTING = "starting"  # alive, not answering yet (loading a model)
    FAILING = "failing"  # answers, but reports it cannot serve (an engine that lost a worker)
    DOWN = "down"  # not running


@dataclass(frozen=True)
class UnitState:
    """One unit as a driver found it. `unit` is the unit as it was created (its spec and port)."""

    unit: Unit
    running: bool
    health: Health
    started_at: float | None = None  # when the current run began (time.time())
    since: float | None = None  # when `health` last changed
    failures: int = 0  # consecutive runs that ended badly; drives the restart backoff
    exited_at: float | None = None
    exit_code: int | None = None
    error: str | None = None  # the last thing that went wrong, in one line
    adopted: bool = False  # found running by a new operator instead of started by this one
    route: str | None = None  # routers: the unit name they send requests to
    inflight: Mapping[str, int] = field(default_factory=dict)  # routers: open requests per backend
    detail: Mapping[str, Any] = field(default_factory=dict)  # driver specifics (pid, container id, log)

    @property
    def name(self) -> str:
        return self.unit.name

    @property
    def healthy(self) -> bool:
        return self.running and self.health is Health.OK

    def with_(self, **changes: Any) -> UnitState:
        return replace(self, **changes)


class ModelState(StrEnum):
    OK = "ok"
    CHECKING = "checking"  # a verification is under way
    MISSING = "missing"
    BAD = "bad"  # present but wrong: sha256 mismatch, not a GGUF


@dataclass(frozen=True)
class ModelCheck:
    """A model's presence on one host, as verified by a driver."""

    state: ModelState
    size: int | None = None
    path: str | None = None
    reason: str | None = None


ModelKey = tuple[str, ModelRef]  # (host, model)


@dataclass(frozen=True)
class Observed:
    """Everything the drivers saw in one pass. `free_bytes` is memory the pool could still give a new
    model right now, when a driver can measure it (None: unknown)."""

    now: float
    units: Mapping[str, UnitState] = field(default_factory=dict)
    models: Mapping[ModelKey, ModelCheck] = field(default_factory=dict)
    free_bytes: int | None = None


# -- the wire format agents report in ---------------------------------------------------------


def state_to_json(state: UnitState) -> dict[str, Any]:
    return {
        "unit": state.unit.to_json(),
        "running": state.running,
        "health": state.health.value,
        "startedAt": state.started_at,
        "since": state.since,
        "failures": state.failures,
        "exitedAt": state.exited_at,
        "exitCode": state.exit_code,
        "error": state.error,
        "adopted": state.adopted,
        "route": state.route,
        "inflight": dict(state.inflight),
        "detail": {k: v for k, v in state.detail.items() if isinstance(v, str | int | float | bool)},
    }


def state_from_json(data: dict[str, Any]) -> UnitState:
    return UnitState(
        unit=Unit.from_json(data["unit"]),
        running=bool(data["running"]),
        health=Health(data["health"]),
        started_at=data.get("startedAt"),
        since=data.get("since"),
        failures=int(data.get("failures", 0)),
        exited_at=data.get("exitedAt"),
        exit_code=data.get("exitCode"),
        error=data.get("error"),
        adopted=bool(data.get("adopted", False)),
        route=data.get("route"),
        inflight={str(k): int(v) for k, v in (data.get("inflight") or {}).items()},
        detail=dict(data.get("detail") or {}),
    )


def checks_to_json(checks: Mapping[ModelKey, ModelCheck]) -> list[dict[str, Any]]:
    return [
        {
            "host": host,
            "model": ref.to_json(),
            "state": check.state.value,
            "size": check.size,
            "path": check.path,
            "reason": check.reason,
        }
        for (host, ref), check in checks.items()
    ]


def checks_from_json(items: list[dict[str, Any]]) -> dict[ModelKey, ModelCheck]:
    return {
        (str(item["host"]), ModelRef.from_json(item["model"])): ModelCheck(
            ModelState(item["state"]), item.get("size"), item.get("path"), item.get("reason")
        )
        for item in items
    }
