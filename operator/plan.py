"""`plan(desired, observed) -> ReconcilePlan`: what to do next to move the cluster towards the manifest.

Pure and level-triggered: it looks only at the two states it is given (and `observed.now`), never at
what it planned before, so any pass can be the first (an operator restart adopts and carries on) and
running it twice on the same states gives the same actions. Drivers execute the actions; the next
pass observes the result. Ordering falls out of that: a unit whose needs are not healthy yet, or
whose models are not verified, waits, with the reason in `ReconcilePlan.waiting`.

The engine is the one unit with a life cycle of its own (hot-swap): a changed target gets a NEW
engine unit (its name carries its content hash), verified before anything stops, loaded beside the
old one when the pool has room, routed to once healthy, and the old one stopped once drained.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tightwad.operator.desired import Desired, Stack
from tightwad.operator.observed import Health, ModelCheck, ModelState, Observed, UnitState
from tightwad.operator.units import ENGINE_ROUTER, KIND_ORDER, Kind, ModelRef, Unit


@dataclass(frozen=True)
class Start:
    """Start `unit` (create it, or restart it after it exited). `failed`: the previous run ended
    badly, so the driver counts it towards the restart backoff."""

    unit: Unit
    reason: str
    failed: bool = False


@dataclass(frozen=True)
class Stop:
    """Stop and remove the unit as it was created."""

    unit: Unit
    reason: str


@dataclass(frozen=True)
class Route:
    """Point `router` at `backend`; the router finishes requests already on the old backend."""

    router: Unit
    backend: Unit
    reason: str


@dataclass(frozen=True)
class VerifyModel:
    """Check that `model` is present (and matches its sha256) on `host`; results show up in
    `Observed.models` on a later pass."""

    host: str
    runtime: str
    model: ModelRef


Action = Start | Stop | Route | VerifyModel
_ACTION_ORDER = {Stop: 0, Route: 1, VerifyModel: 2, Start: 3}  # free ports/memory before using them


@dataclass(frozen=True)
class Fault:
    """Something that keeps the cluster from its desired state until a person acts."""

    reason: str  # CamelCase, as in Kubernetes conditions
    message: str


@dataclass(frozen=True)
class PlannerPolicy:
    """Timings the plan uses; defaults suit real clusters, tests shorten them."""

    backoff_base: float = 1.0  # seconds before the second restart; doubles per failure
    backoff_cap: float = 60.0
    failing_grace: float = 3.0  # a unit that answers but reports failure for this long is restarted
    crash_loop: int = 3  # consecutive failures that mark the cluster Degraded
    start_timeout: Mapping[Kind, float] = field(
        default_factory=lambda: {Kind.ENGINE: 900.0, Kind.DRAFTER: 300.0, Kind.SWARM: 300.0}
    )
    default_start_timeout: float = 60.0
    memory_overhead: float = 1.2  # memory a model needs beyond its file size (compute buffers, KV)

    def backoff(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        return min(self.backoff_cap, self.backoff_base * 2 ** (failures - 1))

    def timeout(self, kind: Kind) -> float:
        return self.start_timeout.get(kind, self.default_start_timeout)

    def need(self, size: int) -> int:
        return int(size * self.memory_overhead)


@dataclass(frozen=True)
class ReconcilePlan:
    actions: tuple[Action, ...]
    waiting: Mapping[str, str]  # unit -> why it is not started or changed yet
    problems: tuple[Fault, ...]
    serving: str | None  # the engine unit the router sends requests to
    swap: str | None  # a hot-swap in progress, in words
    converged: bool  # nothing to do and everything desired is healthy
    stack: Stack  # the stack (slot) this plan converges towards


def plan(
    desired: Desired,
    observed: Observed,
    *,
    scope: Iterable[str] | None = None,
    policy: PlannerPolicy | None = None,
) -> ReconcilePlan:
    """Actions for the units on hosts in `scope` (default: every host). Units elsewhere (another
    agent's, another driver's) are only read, as dependencies."""
    return _Planner(
        desired, observed, None if scope is None else frozenset(scope), policy or PlannerPolicy()
    ).run()


class _Planner:
    def __init__(
        self, desired: Desired, observed: Observed, scope: frozenset[str] | None, policy: PlannerPolicy
    ):
        self.desired = desired
        self.observed = observed
        self.scope = scope
        self.policy = policy
        self.now = observed.now
        self.actions: list[Action] = []
        self.verifying: set[VerifyModel] = set()
        self.waiting: dict[str, str] = {}
        self.problems: list[Fault] = []
        self.swap: str | None = None
        self.serving: str | None = None
        self.engine_ready = False
        self.chosen: Stack = desired.stacks["a"]

    # -- helpers ---------------------------------------------------------------------------------

    def in_scope(self, host: str) -> bool:
        return self.scope is None or host in self.scope

    def state(self, name: str) -> UnitState | None:
        return self.observed.units.get(name)

    def ready(self, name: str) -> bool:
        """Healthy, and for the engine router: sending requests to a healthy engine."""
        state = self.state(name)
        if state is None or not state.healthy:
            return False
        if name == ENGINE_ROUTER:
            backend = self.state(state.route) if state.route else None
            return backend is not None and backend.healthy
        return True

    def check(self, host: str, model: ModelRef) -> ModelCheck | None:
        return self.observed.models.get((host, model))

    def blockers(self, unit: Unit) -> str | None:
        """Why `unit` cannot start yet, or None."""
        waiting = [need for need in unit.needs if not self.ready(need)]
        if waiting:
            shown = ", ".join(waiting[:3]) + (f" and {len(waiting) - 3} more" if len(waiting) > 3 else "")
            return f"waiting for {shown} to be healthy"
        for model in unit.models:
            check = self.check(unit.host, model)
            if check is None or check.state is ModelState.CHECKING:
                return f"verifying model {model.name} on {unit.host}"
            if check.state is not ModelState.OK:
                message = (
                    f"model {model.name} is not usable on {unit.host}: {check.reason or check.state.value}"
                )
                self.problem("ModelRejected", message)
                return message
        return None

    def verify(self, unit: Unit) -> None:
        for model in unit.models:
            if self.in_scope(unit.host) and (unit.host, model) not in self.observed.models:
                action = VerifyModel(unit.host, unit.runtime, model)
                if action not in self.verifying:
                    self.verifying.add(action)
                    self.actions.append(action)

    def replace(self, old: Unit, new: Unit, reason: str, *, failed: bool = False) -> None:
        self.actions += [Stop(old, reason), Start(new, reason, failed=failed)]

    # -- one ordinary unit -----------------------------------------------------------------------

    def converge(self, unit: Unit, why: str = "created") -> None:
        """Create, update-by-hash, restart with backoff, or leave alone."""
        self.verify(unit)
        state = self.state(unit.name)
        blocked = self.blockers(unit)
        if state is None:
            if blocked:
                self.waiting[unit.name] = blocked
            else:
                self.actions.append(Start(unit, why))
            return
        if state.unit.spec_hash != unit.spec_hash:
            if blocked:  # the old one keeps running until the new one can start
                self.waiting[unit.name] = f"update {blocked}"
            else:
                self.replace(state.unit, unit, "spec changed")
            return
        if state.failures >= self.policy.crash_loop:
            detail = f": {state.error}" if state.error else ""
            self.problem("CrashLoop", f"{unit.name} failed {state.failures} times in a row{detail}")
        if not state.running:
            wait = (state.exited_at or 0.0) + self.policy.backoff(state.failures) - self.now
            # Any exit of a server is a failure, whatever its code; the reason is the log's telling line.
            code = "" if state.exit_code is None else f" with code {state.exit_code}"
            code += f" ({state.error})" if state.error else ""
            if wait > 0:
                self.waiting[unit.name] = f"exited{code}; restarting in {wait:.0f}s"
            elif blocked:
                self.waiting[unit.name] = f"exited{code}; restart {blocked}"
            else:
                self.actions.append(Start(unit, f"restart: exited{code}", failed=True))
            return
        since = state.since if state.since is not None else state.started_at
        if state.health is Health.FAILING and since is not None:
            if self.now - since < self.policy.failing_grace:
                self.waiting[unit.name] = f"failing: {state.error or 'unhealthy'}"
            elif blocked:
                self.waiting[unit.name] = f"failing: {state.error or 'unhealthy'}; restart {blocked}"
            else:
                self.replace(state.unit, unit, f"restart: failing: {state.error or 'unhealthy'}", failed=True)
            return
        if state.health is Health.STARTING and state.started_at is not None:
            limit = self.policy.timeout(unit.kind)
            if self.now - state.started_at > limit:
                self.replace(state.unit, unit, f"restart: not ready after {limit:.0f}s", failed=True)
            else:
                self.waiting[unit.name] = "starting"

    # -- the stack (workers + engine) and its hot-swap --------------------------------------------

    def stack(self) -> None:
        engines = {n: s for n, s in self.observed.units.items() if s.unit.kind is Kind.ENGINE}
        router = self.state(ENGINE_ROUTER)
        routed = router.route if router is not None and router.running else None
        serving = engines.get(routed) if routed else None
        serving = serving if serving is not None and serving.healthy else None
        self.serving = serving.name if serving else None
        for state in engines.values():
            self.verify(state.unit)  # the serving model's size decides whether a new one fits beside it

        chosen, may_start = self.choose(engines, serving)
        self.chosen = chosen
        beside = serving is not None and serving.unit.spec.get("slot", "a") != chosen.slot
        why = (
            f"hot-swap: loading {chosen.engine.spec['model']} beside {serving.unit.spec['model']}"
            if beside
            else "created"
        )
        for worker in chosen.workers:
            if self.in_scope(worker.host):
                self.converge(worker, why)
        engine = chosen.engine
        current = engines.get(engine.name)
        if self.in_scope(engine.host) and (current is not None or may_start):
            self.converge(engine, why)
        if current is not None and current.healthy:
            self.engine_ready = router is not None and router.route == engine.name
            if router is not None and router.healthy and router.route != engine.name:
                self.actions.append(Route(router.unit, engine, f"{engine.name} is ready"))
        self.retire(engines, serving, router)

    def choose(self, engines: dict[str, UnitState], serving: UnitState | None) -> tuple[Stack, bool]:
        """The stack to converge, and whether its engine may be started."""
        stacks = self.desired.stacks
        if serving is None:
            # Nothing serves: build where workers already run (a finished swap may have left them on b).
            running = {
                slot: sum(1 for w in stack.workers if (s := self.state(w.name)) is not None and s.running)
                for slot, stack in stacks.items()
            }
            chosen = stacks["b"] if running["b"] > running["a"] else stacks["a"]
            return chosen, self.admit(chosen.engine, None) is None
        slot = str(serving.unit.spec.get("slot", "a"))
        same, other = stacks[slot], stacks["b" if slot == "a" else "a"]
        if serving.name == same.engine.name:
            return same, True  # steady: the serving engine is the desired one
        old, new = serving.unit.spec["model"], same.engine.spec["model"]
        started = engines.get(other.engine.name)
        if started is not None:  # a swap beside the serving engine is under way
            if not started.healthy:
                self.swap = f"loading {new} beside {old}"
                self.waiting[serving.name] = f"serving until {other.engine.name} is ready"
            else:
                self.swap = f"switching to {new}"
            return other, True
        blocked = self.admit(same.engine, serving)
        if blocked is not None:
            if serving.unit.spec["model"] != new:
                self.swap = f"verifying {new} before replacing {old}" if "verifying" in blocked else None
            return same, False
        if self.alongside(same.engine, serving):
            self.swap = f"loading {new} beside {old}"
            self.waiting[serving.name] = f"serving until {other.engine.name} is ready"
            return other, True
        # No room for both: an announced, short switch. The new engine starts on the same workers
        # on the next pass, once the old one has let go of them.
        self.swap = f"switching from {old} to {new}: no room for both, requests fail meanwhile"
        self.actions.append(Stop(serving.unit, f"hot-swap to {new}: not enough memory to load both"))
        return same, False

    def admit(self, engine: Unit, serving: UnitState | None) -> str | None:
        """Why `engine` may not start now (its model unverified, bad, or too large), or None."""
        self.verify(engine)
        model = engine.models[0]
        check = self.check(engine.host, model)
        keeps = f"; {serving.unit.spec['model']} keeps serving" if serving else ""
        if check is None or check.state is ModelState.CHECKING:
            message = f"verifying model {model.name} on {engine.host}"
            self.waiting[engine.name] = message
            return message
        if check.state is not ModelState.OK:
            reason = check.reason or check.state.value
            message = f"model {model.name} is not usable on {engine.host}: {reason}{keeps}"
            self.problem("ModelRejected", message)
            self.waiting[engine.name] = message
            return message
        need = self.policy.need(check.size or 0)
        if not self.fits(need, self.serving_need(serving)):
            have = self.desired.pool_bytes
            have = self.observed.free_bytes if have is None else have
            message = (
                f"model {model.name} needs about {_gib(need)} but the pool has {_gib(have or 0)}; "
                f"add memory to spec.hosts[].gpus[] or pick a smaller model{keeps}"
            )
            self.problem("ModelTooLarge", message)
            self.waiting[engine.name] = message
            return message
        return None

    def retire(
        self, engines: dict[str, UnitState], serving: UnitState | None, router: UnitState | None
    ) -> None:
        """Stop engines that are neither desired nor serving (once drained), and workers no kept
        engine needs. Engines go first in the action list, so their workers outlive them."""
        chosen = self.chosen
        kept = {chosen.engine.name} | ({serving.name} if serving else set())
        for name, state in engines.items():
            if name in kept or not self.in_scope(state.unit.host):
                continue
            inflight = router.inflight.get(name, 0) if router is not None else 0
            if inflight:
                self.waiting[name] = f"draining {inflight} request(s) before it stops"
                self.swap = self.swap or f"draining {name}"
                kept.add(name)
                continue
            reason = (
                f"replaced by {serving.name}"
                if serving
                else f"not the desired engine ({chosen.engine.name} is)"
            )
            self.actions.append(Stop(state.unit, reason))
        needed = {w.name for w in chosen.workers}
        for name in kept:
            state = engines.get(name)
            if state is not None:
                needed |= set(state.unit.needs)
        desired_workers = {w.name for stack in self.desired.stacks.values() for w in stack.workers}
        for name, state in self.observed.units.items():
            if state.unit.kind is not Kind.WORKER or name in needed or not self.in_scope(state.unit.host):
                continue
            why = "not used by the serving stack" if name in desired_workers else "no longer in the manifest"
            self.actions.append(Stop(state.unit, why))

    def problem(self, reason: str, message: str) -> None:
        problem = Fault(reason, message)
        if problem not in self.problems:
            self.problems.append(problem)

    def serving_need(self, serving: UnitState | None) -> int | None:
        if serving is None:
            return 0
        check = self.check(serving.unit.host, serving.unit.models[0]) if serving.unit.models else None
        return self.policy.need(check.size) if check and check.size is not None else None

    def fits(self, need: int, serving_need: int | None) -> bool:
        """Does the new model fit the pool at all (the serving one stopped if need be)?"""
        if self.desired.pool_bytes is not None:
            return need <= self.desired.pool_bytes
        if self.observed.free_bytes is not None and serving_need is not None:
            return need <= self.observed.free_bytes + serving_need
        return True  # nothing declared or measured: let the engine try

    def alongside(self, engine: Unit, serving: UnitState) -> bool:
        """Is there room for the new model while the serving one stays loaded?"""
        check = self.check(engine.host, engine.models[0])
        if check is None or check.size is None:
            return False  # its size unknown (a driver that could not measure it): no room known
        need = self.policy.need(check.size)
        serving_need = self.serving_need(serving)
        if self.observed.free_bytes is not None:
            return need <= self.observed.free_bytes
        if self.desired.pool_bytes is not None and serving_need is not None:
            return serving_need + need <= self.desired.pool_bytes
        return False  # unknown: the safe choice is the announced switch

    # -- the whole pass --------------------------------------------------------------------------

    def run(self) -> ReconcilePlan:
        desired_names = {unit.name for unit in self.desired.services}
        self.stack()  # the foundations first: workers, then the engine
        for unit in sorted(self.desired.services, key=lambda u: KIND_ORDER[u.kind]):
            if self.in_scope(unit.host):
                self.converge(unit)
        for name, state in self.observed.units.items():
            unit = state.unit
            if (
                name in desired_names
                or unit.kind in (Kind.ENGINE, Kind.WORKER)
                or not self.in_scope(unit.host)
            ):
                continue
            self.actions.append(Stop(unit, "no longer in the manifest"))
        actions = sorted(self.actions, key=lambda a: _ACTION_ORDER[type(a)])
        wanted = (*self.desired.services, *self.chosen.units)
        healthy = all(
            (s := self.state(u.name)) is not None and s.healthy and s.unit.spec_hash == u.spec_hash
            for u in wanted
        )
        converged = (
            not actions
            and not self.waiting
            and not self.problems
            and healthy
            and self.engine_ready
            and self.ready(ENGINE_ROUTER)
        )
        return ReconcilePlan(
            actions=tuple(actions),
            waiting=dict(self.waiting),
            problems=tuple(self.problems),
            serving=self.serving,
            swap=self.swap,
            converged=converged,
            stack=self.chosen,
        )


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"
