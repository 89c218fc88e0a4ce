"""A manifest of N hosts, mixed the way a lab grows (CUDA and ROCm boxes in containers, some on their
own Docker daemon, some on the operator's; Macs with Metal run by an agent; CPU servers as plain
processes on another machine, also through an agent), for the scale tests and bench/scale.py.

Deterministic: the same N gives the same document, so a figure can be reproduced.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from tightwad.manifest import Manifest
from tightwad.manifest_views import Host
from tightwad.operator.commands import Binaries
from tightwad.operator.desired import Desired
from tightwad.operator.observed import Health, ModelCheck, ModelState, UnitState
from tightwad.operator.reconcile import PassResult, Reconciler
from tightwad.operator.units import ModelRef, Unit

WORKER_PORT = 50052
TOKEN = "fleet-token"

# Four hosts in a row: what each one is. 3 of 4 hosts run Docker (the 750 in 1000).
_KINDS: tuple[tuple[str, str, bool], ...] = (
    # (backend, runtime, its own Docker endpoint)
    ("cuda", "docker", True),
    ("rocm", "docker", True),
    ("cpu", "docker", False),  # the daemon of the machine running Tightwad
    ("metal", "native", False),
)


def host_name(i: int) -> str:
    return f"h{i:05d}"


def host_address(i: int) -> str:
    # 10.0.0.0/8 without .0 or .255 in the last byte: a routable-looking, never-contacted address.
    return f"10.{i // 64516 % 254 + 1}.{i // 254 % 254 + 1}.{i % 254 + 1}"


def host_entry(i: int) -> dict[str, Any]:
    backend, runtime, own_daemon = _KINDS[i % len(_KINDS)]
    if backend == "metal" and i % 8 == 7:
        runtime = "process"  # a process host on another machine: an agent runs it too
    host: dict[str, Any] = {"name": host_name(i), "address": host_address(i), "runtime": runtime}
    if own_daemon:
        host["docker"] = {"endpoint": f"tcp://{host_address(i)}:2376"}
    gpus: list[dict[str, Any]] = [{"backend": backend, "port": WORKER_PORT}]
    if backend == "cuda" and i % 3 == 0:  # some boxes hold two cards
        gpus.append({"backend": "cuda", "index": 1, "port": WORKER_PORT + 1})
    host["gpus"] = gpus
    return host


def fleet_manifest(hosts: int, name: str = "fleet") -> dict[str, Any]:
    """A valid manifest with `hosts` hosts; the engine, a drafter and the proxy live on host 0."""
    if hosts < 1:
        raise ValueError("a fleet has at least one host")
    first = host_name(0)
    return {
        "apiVersion": "tightwad.dev/v1alpha1",
        "kind": "TightwadCluster",
        "metadata": {"name": name},
        "spec": {
            "auth": {"token": TOKEN},
            "models": [
                {"name": "target", "source": "/models/target.gguf"},
                {"name": "draft", "source": "/models/draft.gguf"},
            ],
            "hosts": [host_entry(i) for i in range(hosts)],
            "target": {"model": "target", "host": first},
            "drafters": [
                {"name": "d", "kind": "llama-server", "model": "draft", "host": first, "port": 8081}
            ],
            "proxy": {"host": first},
            "swarm": {"enabled": False},
        },
    }


def fleet_yaml(hosts: int, name: str = "fleet") -> str:
    """The manifest as YAML in block style, as a person (or a generator of theirs) would write it."""
    return yaml.safe_dump(fleet_manifest(hosts, name), sort_keys=False, default_flow_style=False)


def write_fleet(path: Path, hosts: int, name: str = "fleet") -> Path:
    """Write the manifest to `path` the way editors do (a new file renamed over the old one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(fleet_yaml(hosts, name), encoding="utf-8")
    os.replace(tmp, path)
    return path


def edit_fraction(data: dict[str, Any], every: int = 10) -> list[str]:
    """Declare the memory of every `every`-th host's devices: a spec edit of those hosts' workers
    alone (the engine knows its workers by address), so exactly they must restart. Returns the
    edited hosts' names."""
    edited = []
    for i, host in enumerate(data["spec"]["hosts"]):
        if i % every != every - 1:
            continue
        for gpu in host["gpus"]:
            gpu["memory"] = "24GiB"
        edited.append(host["name"])
    return edited


# ------------------------------------------------------------------------------------------------
# A simulated fleet: the REAL reconcile loop (Reconciler: load, observe, plan, execute, status) over
# N hosts, with STAND-INS at the driver boundary only, in one process. Nothing here is a daemon or
# an agent: these classes answer the Driver protocol (and the agent reports) the way the real ones
# do, from memory, so the loop's own costs can be measured and its behaviour asserted at scale.


class SimulatedDockerHost:
    """STAND-IN for one host's DockerDriver (no daemon behind it). Like the real driver it keeps
    each unit as JSON (the real one keeps it in a container label) and reads it back on every
    observe; a started unit runs and is healthy from the next observe on."""

    runtime = "docker"

    def __init__(self, host: str, journal: list[str]) -> None:
        self.host = host
        self.containers: dict[str, dict[str, Any]] = {}
        self.checks: dict[Any, ModelCheck] = {}
        self.log = journal  # "start NAME" / "stop NAME", in order, shared by the whole fleet
        self.observed = 0

    def observe(self, now: float) -> dict[str, UnitState]:
        self.observed += 1
        states = {}
        for name, box in self.containers.items():
            unit = Unit.from_json(json.loads(box["unit"]))
            running = box["exit_code"] is None
            states[name] = UnitState(
                unit,
                running,
                Health.OK if running else Health.DOWN,
                started_at=box["started_at"],
                since=box["started_at"],
                failures=box["failures"],
                exited_at=box["exited_at"],
                exit_code=box["exit_code"],
                error=None if running else f"exited with code {box['exit_code']}",
                route=box.get("route"),
                adopted=True,
            )
        return states

    def start(self, unit: Unit, reason: str, failed: bool = False) -> None:
        failures = self.containers.get(unit.name, {}).get("failures", 0) + 1 if failed else 0
        self.containers[unit.name] = {
            "unit": json.dumps(unit.to_json(), sort_keys=True),
            "started_at": time.time(),
            "exited_at": None,
            "exit_code": None,
            "failures": failures,
        }
        self.log.append(f"start {unit.name}")

    def stop(self, unit: Unit, reason: str = "") -> None:
        self.containers.pop(unit.name, None)
        self.log.append(f"stop {unit.name}")

    def verify(self, host: str, model: ModelRef) -> None:
        self.checks[(host, model)] = ModelCheck(ModelState.OK, size=10**9)

    def models(self) -> dict[Any, ModelCheck]:
        return dict(self.checks)

    def stop_all(self) -> list[str]:
        names = list(self.containers)
        self.containers.clear()
        return names

    def close(self) -> None:
        pass

    def crash(self, name: str, code: int = 1) -> None:
        """The unit's process dies (an rpc worker segfaults, say)."""
        self.containers[name] |= {"exit_code": code, "exited_at": time.time()}


class SimulatedAgent:
    """STAND-IN for `tightwad agent` on one host: it runs what the operator wants on its host and
    reports it (with its models) as a real agent does over the agent API."""

    def __init__(self, host: str, journal: list[str]) -> None:
        self.host = host
        self.running: dict[str, UnitState] = {}
        self.log = journal

    def report(self, reconciler: Reconciler) -> None:
        desired = reconciler.desired
        if desired is None:
            return
        wanted = _units_by_host(desired).get(self.host, [])
        now = time.time()
        reported = dict(self.running)  # what it had started by the last report
        for unit in wanted:
            current = self.running.get(unit.name)
            if current is None or current.unit.spec_hash != unit.spec_hash:
                self.running[unit.name] = UnitState(unit, True, Health.OK, started_at=now, since=now)
                self.log.append(f"start {unit.name}")
        names = {u.name for u in wanted}
        self.running = {k: v for k, v in self.running.items() if k in names}
        models = {(u.host, m): ModelCheck(ModelState.OK, size=10**9) for u in wanted for m in u.models}
        reconciler.report(self.host, reported, models)


_BY_HOST: dict[int, tuple[Desired, dict[str, list[Unit]]]] = {}


def _units_by_host(desired: Desired) -> dict[str, list[Unit]]:
    """The desired units grouped by host, once per desired state (each agent asks for its own)."""
    known = _BY_HOST.get(id(desired))
    if known is None or known[0] is not desired:
        grouped: dict[str, list[Unit]] = {}
        for unit in (*desired.units, desired.engine):
            grouped.setdefault(unit.host, []).append(unit)
        _BY_HOST.clear()
        known = _BY_HOST[id(desired)] = (desired, grouped)
    return known[1]


class SimulatedFleet:
    """N hosts of `fleet_manifest` in `folder`, driven by the real Reconciler with the stand-ins
    above; `tick()` is one pass of the loop (agents report first, as they do between passes)."""

    def __init__(self, folder: Path, hosts: int, name: str = "fleet") -> None:
        self.path = write_fleet(folder / f"{name}.yaml", hosts, name)
        self.docker: dict[str, SimulatedDockerHost] = {}
        self.agents: dict[str, SimulatedAgent] = {}
        self.journal: list[str] = []  # every start and stop, docker hosts' and agents', in order
        self.routes: list[str] = []
        self.reconciler = Reconciler(
            self.path,
            components=frozenset({"proxy"}),
            binaries=Binaries(),
            docker_factory=self._docker,
            router=self._route,
            lock=False,
        )
        for host, kind in self.reconciler.host_kinds.items():
            if kind == "agent":
                self.agents[host] = SimulatedAgent(host, self.journal)

    def _docker(self, host: Host, manifest: Manifest) -> SimulatedDockerHost:
        if host.name not in self.docker:
            self.docker[host.name] = SimulatedDockerHost(host.name, self.journal)
        return self.docker[host.name]

    def _route(self, router: Unit, backend: Unit, token: str | None) -> str | None:
        """STAND-IN for the router's PUT: the router container now reports the new route."""
        self.docker[router.host].containers[router.name]["route"] = backend.name
        self.routes.append(backend.name)
        return None

    def tick(self) -> PassResult:
        for agent in self.agents.values():
            agent.report(self.reconciler)
        return self.reconciler.pass_once()

    def converge(self, limit: int = 50) -> list[PassResult]:
        """Passes until one plans nothing and the cluster is Ready; AssertionError past `limit`."""
        passes = []
        for _ in range(limit):
            result = self.tick()
            passes.append(result)
            if result.plan is not None and result.plan.converged and not result.plan.actions:
                return passes
        raise AssertionError(f"the fleet did not converge in {limit} passes: {passes[-1].plan}")

    def close(self) -> None:
        self.reconciler.close()
