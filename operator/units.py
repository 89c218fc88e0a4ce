"""Units: the things the operator runs, described as plain data every driver can carry out.

A unit is one long-running server (an rpc worker, an engine, a drafter, a router, the proxy, a swarm
sidecar) on one host. Its `spec` is driver-neutral JSON data: the process driver turns it into a
command line, the docker driver into a container, the kubernetes driver into a pod. The spec hash
names exactly what runs, so a unit is restarted only when its own spec changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any


class Kind(StrEnum):
    WORKER = "rpc-worker"  # ggml-rpc-server lending one device to the pool
    ENGINE = "engine"  # tightwad engine: the target across the pool
    ROUTER = "router"  # stable address in front of a backend that may change (engine hot-swap)
    DRAFTER = "drafter"  # llama-server with a draft model
    PROXY = "proxy"  # the front door on :8088
    SWARM = "swarm-sidecar"  # keeps the host's model volume filled


# Start order when several units are ready at once; also the order status lists them in.
KIND_ORDER = {kind: i for i, kind in enumerate(Kind)}

ENGINE_ROUTER = "engine-router"  # the router every client of the engine talks to
PROXY = "proxy"


@dataclass(frozen=True)
class ModelRef:
    """A model as the manifest names it; what must be present on a host before a unit needs it."""

    name: str
    source: str
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRef:
        return cls(str(data["name"]), str(data["source"]), data.get("sha256"))


def canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def digest(data: Any) -> str:
    return hashlib.sha256(canonical(data).encode()).hexdigest()


@dataclass(frozen=True)
class Unit:
    """One server on one host, as desired.

    `needs`: units that must be healthy before this one starts (an engine needs its workers).
    `models`: models that must be present and verified on `host` before it starts.
    `secrets`: values the driver passes as environment (the token); never hashed by value, never
    written to state or status files (the spec carries a fingerprint instead, so a new token still
    restarts what uses it).
    """

    name: str
    kind: Kind
    host: str
    runtime: str
    address: str  # where others reach it (the host's address)
    spec: dict[str, Any]
    needs: tuple[str, ...] = ()
    models: tuple[ModelRef, ...] = ()
    secrets: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def spec_hash(self) -> str:
        body = {
            "kind": self.kind.value,
            "host": self.host,
            "runtime": self.runtime,
            "address": self.address,
            "spec": self.spec,
            "models": [m.to_json() for m in self.models],
        }
        return digest(body)[:16]

    @property
    def port(self) -> int | None:
        port = self.spec.get("port")
        return int(port) if port is not None else None

    @property
    def url(self) -> str:
        """Base URL of an HTTP unit."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    @property
    def endpoint(self) -> str:
        """host:port, as rpc clients write it."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        """Everything but the secrets, for state files and the agent API."""
        return {
            "name": self.name,
            "kind": self.kind.value,
            "host": self.host,
            "runtime": self.runtime,
            "address": self.address,
            "spec": self.spec,
            "needs": list(self.needs),
            "models": [m.to_json() for m in self.models],
            "specHash": self.spec_hash,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], secrets: dict[str, str] | None = None) -> Unit:
        return cls(
            name=str(data["name"]),
            kind=Kind(data["kind"]),
            host=str(data["host"]),
            runtime=str(data["runtime"]),
            address=str(data["address"]),
            spec=dict(data["spec"]),
            needs=tuple(data.get("needs", ())),
            models=tuple(ModelRef.from_json(m) for m in data.get("models", ())),
            secrets=dict(secrets or {}),
        )

    def with_spec(self, **changes: Any) -> Unit:
        return Unit(
            self.name,
            self.kind,
            self.host,
            self.runtime,
            self.address,
            {**self.spec, **changes},
            self.needs,
            self.models,
            self.secrets,
        )


def url_for(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}"
