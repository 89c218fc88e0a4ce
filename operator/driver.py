"""What every driver (process, docker, an agent's report) offers the reconcile loop."""

from __future__ import annotations

from typing import Protocol

from tightwad.errors import TightwadError
from tightwad.operator.observed import ModelCheck, ModelKey, UnitState
from tightwad.operator.units import ModelRef, Unit


class DriverUnavailable(TightwadError):
    """The driver cannot see its units right now (a Docker daemon down): act on none of them."""


class Driver(Protocol):
    runtime: str

    def observe(self, now: float) -> dict[str, UnitState]:
        """Every unit this driver runs (or ran: exited ones too), as it is now; DriverUnavailable
        when it cannot tell."""
        ...

    def start(self, unit: Unit, reason: str, failed: bool = False) -> None:
        """Start `unit`; return without waiting for it to be healthy."""
        ...

    def stop(self, unit: Unit, reason: str = "") -> None:
        """Stop `unit` and forget it; a no-op for an unknown unit."""
        ...

    def verify(self, host: str, model: ModelRef) -> None:
        """Begin checking `model` on `host`; the answer appears in `models()`."""
        ...

    def models(self) -> dict[ModelKey, ModelCheck]: ...

    def stop_all(self) -> list[str]:
        """Stop every unit, front door first; the names stopped."""
        ...

    def close(self) -> None: ...
