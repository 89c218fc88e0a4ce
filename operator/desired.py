"""The desired state: a validated manifest turned into units. Pure: no files, no network.

One rpc worker per device of every host, one engine on the target host (behind the engine router, the
stable address its clients use), one llama-server per `llama-server` drafter, the proxy, and a swarm
sidecar per host when the swarm is enabled. Ports the manifest leaves out are assigned here,
deterministically, so every planner (process, docker, kubernetes) agrees on them, and always below
32768: Linux hands ports from 32768 up to outgoing connections, so a server assigned one there could
find it taken by an unrelated client (and Kubernetes keeps 30000-32767 for NodePorts).

The workers and the engine form a STACK, described twice: slot "a" on the manifest's ports and
slot "b" on spare ones. An rpc worker serves one client at a time, so a new engine cannot share the
old engine's workers: a hot-swap with room loads the new model on the other slot's workers while the
old stack serves, and the plan flips between the two.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tightwad.errors import TightwadError
from tightwad.manifest import Manifest
from tightwad.manifest_views import Gpu, Host, QueueSettings
from tightwad.netaddr import loopback_bind
from tightwad.operator.units import ENGINE_ROUTER, PROXY, Kind, ModelRef, Unit, digest, url_for

FIRST_WORKER_PORT = 18052
FIRST_DRAFTER_PORT = 8081
# Assigned ports stay below this: from 32768 up is the kernel's range for outgoing connections.
ASSIGNED_PORT_LIMIT = 32768
# Components that may not be installed yet; `available_components()` says which are.
OPTIONAL_COMPONENTS = ("proxy", "swarm")


SLOTS = ("a", "b")


@dataclass(frozen=True)
class Stack:
    """The engine and the workers it loads the target across, on one slot's ports."""

    slot: str
    workers: tuple[Unit, ...]
    engine: Unit

    @property
    def units(self) -> tuple[Unit, ...]:
        return (*self.workers, self.engine)


@dataclass(frozen=True)
class Desired:
    """Everything the manifest asks for: the units outside the stack, and the stack on each slot."""

    cluster: str
    spec_hash: str  # changes exactly when the manifest's spec does
    services: tuple[Unit, ...]  # the units outside the stack: router, drafters, proxy, swarm sidecars
    stacks: dict[str, Stack]
    endpoint: str  # the URL apps use (the proxy's, or the engine router's without a proxy)
    pool_bytes: int | None  # memory the pool's devices declare; None when any device leaves it out
    notes: tuple[str, ...] = field(default=())  # things the manifest asks for that cannot be done
    # Where the manifest file is for units that read it (proxy, swarm sidecar); kept out of unit
    # specs, which must not differ between an operator and an agent: give it to `command()`.
    manifest_path: str | None = None

    @property
    def units(self) -> tuple[Unit, ...]:
        """Slot a's workers and the services: what a cluster runs besides its engine, before any swap."""
        return (*self.stacks["a"].workers, *self.services)

    @property
    def by_name(self) -> dict[str, Unit]:
        return {unit.name: unit for unit in self.units}

    @property
    def engine(self) -> Unit:
        """The engine on slot a (where a cluster starts)."""
        return self.stacks["a"].engine

    @property
    def engine_ports(self) -> tuple[int, int]:
        return (self.stacks["a"].engine.port or 0, self.stacks["b"].engine.port or 0)

    @property
    def model(self) -> str:
        return str(self.engine.spec["model"])


def available_components() -> frozenset[str]:
    """Optional components present in this installation (their cli module exists)."""
    import importlib.util

    found = set()
    for name in OPTIONAL_COMPONENTS:
        try:
            if importlib.util.find_spec(f"tightwad.{name}.cli") is not None:
                found.add(name)
        except ImportError:
            pass
    return frozenset(found)


def token_fingerprint(token: str | None) -> str | None:
    """Stands in for the token in specs: a changed token restarts its users, the secret stays out."""
    if not token:
        return None
    return hashlib.sha256(b"tightwad-token:" + token.encode()).hexdigest()[:12]


def bind_address(address: str) -> str:
    """What a server on a host listens on: loopback for a loopback host (the manifest then needs no
    token, so nothing may listen beyond it: `localhost` is 127.0.0.1, never every interface), the
    host's IP itself, or every interface for any other name."""
    loopback = loopback_bind(address)
    if loopback is not None:
        return loopback
    try:
        ipaddress.ip_address(address.strip("[]"))
        return address.strip("[]")
    except ValueError:
        return "0.0.0.0"


def model_ref(manifest: Manifest, name: str) -> ModelRef:
    model = manifest.model(name)
    return ModelRef(model.name, model.source, model.sha256)


class _Ports:
    """Ports in use per host: the manifest's explicit ones first, then each assignment."""

    def __init__(self, claims: Iterable[tuple[str, int]]) -> None:
        self.taken: dict[str, set[int]] = defaultdict(set)
        for host, port in claims:
            self.taken[host].add(port)

    def assign(self, host: str, wanted: int | None, first: int) -> int:
        """`wanted` when the manifest gives it, else the first free port from `first`, going on
        from FIRST_WORKER_PORT at the limit (e.g. after an explicit 50052 or a target on 32767)."""
        if wanted is not None:
            return wanted
        port = first
        for _ in range(ASSIGNED_PORT_LIMIT):  # at most one lap
            if port >= ASSIGNED_PORT_LIMIT:
                port = FIRST_WORKER_PORT
            if port not in self.taken[host]:
                self.taken[host].add(port)
                return port
            port += 1
        raise TightwadError(
            f"host {host!r} has no free port left below {ASSIGNED_PORT_LIMIT} to assign; "
            "give the units on it explicit ports"
        )


def _explicit_ports(manifest: Manifest) -> Iterable[tuple[str, int]]:
    for host in manifest.hosts:
        for gpu in host.gpus:
            if gpu.port is not None:
                yield host.name, gpu.port
    yield manifest.target.host, manifest.target.port
    for drafter in manifest.drafters:
        if drafter.runs_here and drafter.host is not None and drafter.port is not None:
            yield drafter.host, drafter.port
    if manifest.proxy:
        yield manifest.proxy.host, manifest.proxy.port
    if manifest.swarm.enabled:
        for host in manifest.hosts:
            yield host.name, manifest.swarm.port


def desired_state(
    manifest: Manifest,
    *,
    components: frozenset[str] = frozenset(OPTIONAL_COMPONENTS),
    manifest_path: str | None = None,
) -> Desired:
    """The units that serve `manifest`. `components` lists the optional components installed:
    without the proxy, the front door is a router straight to the engine."""
    token = manifest.token
    fingerprint = token_fingerprint(token)
    secrets = {"TIGHTWAD_TOKEN": token} if token else {}
    hosts = {host.name: host for host in manifest.hosts}
    ports = _Ports(_explicit_ports(manifest))
    notes: list[str] = []

    def unit(
        name: str,
        kind: Kind,
        host: str,
        spec: dict[str, Any],
        needs: Iterable[str] = (),
        models: Iterable[ModelRef] = (),
    ) -> Unit:
        entry = hosts[host]
        return Unit(
            name=name,
            kind=kind,
            host=host,
            runtime=entry.runtime,
            address=entry.address,
            spec=spec,
            needs=tuple(needs),
            models=tuple(models),
            secrets=dict(secrets),
        )

    # rpc workers: one per device. No auth in the RPC protocol: they listen on the host's address only.
    # Slot b's ports are assigned after every explicit one, so they never collide.
    devices: list[tuple[Host, int, Gpu, int]] = []
    declared: list[int | None] = []
    for host in manifest.hosts:
        for i, gpu in enumerate(host.gpus):
            devices.append((host, i, gpu, ports.assign(host.name, gpu.port, FIRST_WORKER_PORT)))
            declared.append(gpu.memory_bytes)
    target = manifest.target
    engine_ports = {"a": ports.assign(target.host, None, target.port + 1)}
    engine_ports["b"] = ports.assign(target.host, None, target.port + 1)
    worker_ports = {"a": [port for *_, port in devices]}
    worker_ports["b"] = [ports.assign(host.name, None, port + 1) for host, _, _, port in devices]

    target_host = hosts[target.host]
    split = target.tensor_split
    engine_models = (model_ref(manifest, target.model),)
    stacks: dict[str, Stack] = {}
    for slot in SLOTS:
        suffix = "" if slot == "a" else f"-{slot}"
        workers = []
        for (host, i, gpu, _), port, memory in zip(devices, worker_ports[slot], declared, strict=True):
            spec = {
                "backend": gpu.backend,
                "index": gpu.index,
                "port": port,
                "bind": bind_address(host.address),
                "threads": gpu.threads,
                "memory": memory,
                "slot": slot,
            }
            if target.exact != "off":  # only when set: a default manifest keeps its workers' hashes
                spec["exact"] = target.exact
            workers.append(unit(f"worker-{host.name}-{i}{suffix}", Kind.WORKER, host.name, spec))
        # One KV sequence per conversation: the engine's `--parallel`, each with a whole context;
        # `auto`: the engine sizes its KV cache from memory and keeps what that holds.
        conversations = target.max_conversations
        engine_spec = {
            "model": target.model,
            "alias": target.model,
            "ctx": "auto" if conversations == "auto" else manifest.context_size * conversations,
            "parallel": conversations,
            "rpc": [w.endpoint for w in workers],
            "tensorSplit": split if isinstance(split, str) else ",".join(str(x) for x in split),
            "bind": bind_address(target_host.address),
            "port": engine_ports[slot],
            "token": fingerprint,
            "slot": slot,
        }
        if conversations == "auto":  # only then: an unchanged manifest keeps its engine's hash
            engine_spec["conversationCtx"] = manifest.context_size
        if target.queue != QueueSettings():  # only when set: an unchanged manifest keeps its hash
            engine_spec["queue"] = target.queue.limit
            engine_spec["queueTimeout"] = target.queue.timeout_seconds
        if target.aliases:  # only when set: an unchanged manifest keeps its engine's hash
            engine_spec["aliases"] = list(target.aliases)
        if target.exact != "off":  # likewise; a changed value is a new engine and new workers
            engine_spec["exact"] = target.exact
        # The name carries the content: a changed target is a new engine, which a swap needs.
        content = digest({"spec": engine_spec, "models": [m.to_json() for m in engine_models]})
        engine = unit(
            f"engine-{content[:8]}",
            Kind.ENGINE,
            target.host,
            engine_spec,
            needs=[w.name for w in workers],
            models=engine_models,
        )
        stacks[slot] = Stack(slot, tuple(workers), engine)

    router_spec = {
        "port": target.port,
        "bind": bind_address(target_host.address),
        "token": fingerprint,
    }
    router = unit(ENGINE_ROUTER, Kind.ROUTER, target.host, router_spec)

    # Drafters Tightwad runs; other kinds (openai, ollama, ngram) are the proxy's business.
    drafters: list[Unit] = []
    for drafter in manifest.drafters:
        # The schema requires model and host of a llama-server drafter.
        if not drafter.runs_here or drafter.host is None or drafter.model is None:
            continue
        host = hosts[drafter.host]
        model = manifest.model(drafter.model)
        cpu_threads = [g.threads for g in host.gpus if g.backend == "cpu" and g.threads is not None]
        spec = {
            "model": drafter.model,
            "port": ports.assign(drafter.host, drafter.port, FIRST_DRAFTER_PORT),
            "bind": bind_address(host.address),
            "ctx": model.context_size,
            # Lend the drafter what the host lends its CPU workers, not every core.
            "threads": min(cpu_threads) if cpu_threads else None,
            "modelDir": host.model_dir,
            "token": fingerprint,  # its API key: a new token must restart it, or the proxy gets 401s
        }
        ref = model_ref(manifest, drafter.model)
        drafters.append(unit(f"drafter-{drafter.name}", Kind.DRAFTER, drafter.host, spec, models=[ref]))

    units: list[Unit] = [router, *drafters]
    endpoint = router.url
    proxy = manifest.proxy
    if proxy:
        host = hosts[proxy.host]
        reachable = host.address if proxy.bind in ("0.0.0.0", "::") else proxy.bind
        endpoint = url_for(reachable, proxy.port)
        spec: dict[str, Any] = {
            "port": proxy.port,
            "bind": proxy.bind,
            "token": fingerprint,
            "target": router.url,
        }
        if "proxy" in components:
            # The proxy reads drafters, limits and mode from the manifest itself, but only finds
            # llama-server drafters whose port the manifest spells out; else it gets flags.
            spelled = all(d.port is not None for d in manifest.drafters if d.runs_here)
            spec |= {
                "impl": "proxy",
                "mode": proxy.mode,
                "drafts": [d.url for d in drafters],
                "manifest": spelled,  # read the manifest file where it runs (its path is the driver's)
            }
        else:
            # The proxy component is not installed: the front door forwards to the engine.
            spec |= {"impl": "router"}
            notes.append("the proxy component is not installed; the front door forwards to the engine")
        units.append(unit(PROXY, Kind.PROXY, proxy.host, spec, needs=[ENGINE_ROUTER]))

    swarm = manifest.swarm
    if swarm.enabled:
        for host in manifest.hosts:
            users = (*drafters, stacks["a"].engine)
            wanted = sorted({m.name for u in users if u.host == host.name for m in u.models})
            spec = {
                "port": swarm.port,
                "bind": bind_address(host.address),
                "modelDir": host.model_dir,
                "pieceSize": swarm.piece_size,
                "peers": list(swarm.peers),
                "trackers": list(swarm.trackers),
                "models": wanted,
                "token": fingerprint,
                "installed": "swarm" in components,
            }
            units.append(unit(f"swarm-{host.name}", Kind.SWARM, host.name, spec))

    pool_bytes = sum(d for d in declared if d) if declared and all(declared) else None
    return Desired(
        cluster=manifest.name,
        spec_hash=digest(manifest.data["spec"])[:16],
        services=tuple(units),
        stacks=stacks,
        endpoint=endpoint,
        pool_bytes=pool_bytes,
        notes=tuple(notes),
        manifest_path=manifest_path,
    )
