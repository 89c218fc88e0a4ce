"""Race: several drafters per round, in parallel; the engine verifies every candidate in ONE pass
(separate sequences sharing the prefix) and the longest accepted continuation wins. Always exact:
the engine decides every token, whichever drafter proposed it.

`RaceDrafter` looks like one guarded drafter to the speculation loop (speculate.py): `propose`
starts every drafter that is not backing off and waits for the first usable proposal. Each drafter
still running then has a deadline the cost model sets (`worth_waiting`): it is waited for (up to
1.5x its usual draft time) only when its usual yield per round over the longer round beats what
the proposals in hand yield over a round that starts now; otherwise it gets a short grace (about
one verify) and is cut off (cancelled: not a failure, no backoff). The answer is a `Candidates`
proposal, best guess first (the drafter that usually yields most; the pipelined loop drafts the
next round on it); the loop sends all candidates to the engine in one verify and hands the verdict
back (`Candidates.settle`), which credits the winner by `draft_index`. Each drafter keeps its own
fail-soft guard (guard.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tightwad.proxy.drafters.base import DraftRequest, Proposal
from tightwad.proxy.drafters.guard import GuardedDrafter
from tightwad.proxy.kpolicy.costmodel import Costs

MIN_GRACE = 0.005  # seconds a slower drafter always gets after the first proposal
MAX_GRACE = 1.0
WARMUP_ROUNDS = 3  # rounds a drafter takes part in before its yield is trusted (until then: waited for)
RECENT_WEIGHT = 0.25
PATIENCE = 1.5  # a drafter worth waiting for is waited for up to this times its usual draft time


@dataclass
class Lane:
    """One drafter's record in the race."""

    offered: int = 0  # rounds its proposal reached the engine
    wins: int = 0  # rounds its proposal was the longest accepted (and accepted at least one token)
    accepted: int = 0  # draft tokens of its winning proposals
    matched: int = 0  # draft tokens of all its proposals that the target's tokens confirmed
    cut: int = 0  # rounds it was cut off by the deadline
    arrived: int = 0  # proposals that arrived in time
    seconds: float = 0.0  # total time of its proposals that arrived
    recent: float = 0.0  # moving average of that time (recent calls weigh most)

    def record_arrival(self, seconds: float) -> None:
        self.recent = seconds if not self.arrived else self.recent + RECENT_WEIGHT * (seconds - self.recent)
        self.arrived += 1
        self.seconds += seconds

    @property
    def typical_seconds(self) -> float | None:
        """Its usual draft time lately (a reply's first call, which reads the prompt, fades out)."""
        return self.recent if self.arrived else None

    @property
    def value(self) -> float | None:
        """Draft tokens it usually gets accepted per round it takes part in (None: too new to say)."""
        return self.matched / self.offered if self.offered >= WARMUP_ROUNDS else None

    def to_json(self) -> dict[str, Any]:
        mean = self.seconds / self.arrived if self.arrived else None
        return {
            "offered": self.offered,
            "wins": self.wins,
            "accepted_tokens": self.accepted,
            "tokens_right_per_round": round(self.matched / self.offered, 3) if self.offered else None,
            "cut": self.cut,
            "win_rate": round(self.wins / self.offered, 4) if self.offered else None,
            "mean_draft_ms": round(mean * 1e3, 2) if mean is not None else None,
        }


@dataclass(frozen=True)
class Candidates(Proposal):
    """Several drafters' proposals for one round. `tokens`/`probs` are the first candidate's (what the
    single-drafter loop looks at); `candidates()` is what the engine verifies."""

    alternatives: tuple[Proposal, ...] = ()
    sources: tuple[str, ...] = ()
    board: Scoreboard | None = field(default=None, compare=False)

    @staticmethod
    def of(proposals: Sequence[Proposal], sources: Sequence[str], board: Scoreboard | None) -> Candidates:
        first = proposals[0]
        return Candidates(first.tokens, first.probs, tuple(proposals), tuple(sources), board)

    def candidates(self) -> list[Proposal]:
        return list(self.alternatives)

    def _keep(self, pairs: list[tuple[Proposal, str]]) -> Candidates | Proposal:
        pairs = [(p, s) for p, s in pairs if p.tokens]
        if not pairs:
            return Proposal(())
        return Candidates.of([p for p, _ in pairs], [s for _, s in pairs], self.board)

    def head(self, n: int) -> Proposal:
        return self._keep([(p.head(n), s) for p, s in zip(self.alternatives, self.sources, strict=True)])

    def tail(self, start: int) -> Proposal:
        return self._keep([(p.tail(start), s) for p, s in zip(self.alternatives, self.sources, strict=True)])

    def agreeing(self, added: Sequence[int]) -> Candidates | Proposal:
        """Only the candidates whose first tokens are `added` (the tokens the target produced since
        they were drafted), so a late race result can still serve a later round."""
        n = len(added)
        return self._keep(
            [
                (p, s)
                for p, s in zip(self.alternatives, self.sources, strict=True)
                if p.tokens[:n] == tuple(added)
            ]
        )

    def settle(self, draft_index: int, accepted: int, target_tokens: Sequence[int] = ()) -> None:
        """Credit the winner; `target_tokens` (the verdict's) also tell how far each loser was right."""
        if self.board is not None:
            matched = [_common(p.tokens, target_tokens) for p in self.alternatives]
            self.board.settle(self.sources, draft_index, accepted, matched)


class Scoreboard:
    """Who won how often (for /tightwad/v1/stats, the dashboard and bench/race.py)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.lanes = {name: Lane() for name in names}
        self.rounds = 0
        self.no_winner = 0  # rounds where no candidate had an accepted token

    def settle(
        self, sources: Sequence[str], draft_index: int, accepted: int, matched: Sequence[int] = ()
    ) -> None:
        self.rounds += 1
        for i, name in enumerate(sources):
            self.lanes[name].offered += 1
            self.lanes[name].matched += matched[i] if i < len(matched) else 0
        if accepted > 0 and 0 <= draft_index < len(sources):
            lane = self.lanes[sources[draft_index]]
            lane.wins += 1
            lane.accepted += accepted
        else:
            self.no_winner += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "no_winner": self.no_winner,
            "drafters": {name: lane.to_json() for name, lane in self.lanes.items()},
        }


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def worth_waiting(waiting: Lane, best_in_hand: float, elapsed: float, round_cost: float) -> float | None:
    """Seconds after the race started until which a drafter still running is worth waiting for, or
    None (cut it at the grace). Tokens per second of a round that starts now with the proposals in
    hand, (1 + best_in_hand) / (elapsed + round_cost), against one that waits for this drafter,
    (1 + its value) / (its usual time + round_cost)."""
    value, typical = waiting.value, waiting.typical_seconds
    if value is None or typical is None:
        return None  # not measured yet: it shows its worth in rounds where it is alone or first
    now = (1.0 + best_in_hand) / (elapsed + round_cost)
    later = (1.0 + value) / (max(typical, elapsed) + round_cost)
    return PATIENCE * typical if later > now else None


def grace_seconds(costs: Costs | None, k: int) -> float:
    """How long, after the first proposal arrived, the race waits for the others: about one verify
    round (a later draft that costs more than a round of waiting cannot pay for itself)."""
    if costs is None:
        return MIN_GRACE
    round_cost = costs.verify_fixed + costs.verify_per_token * k + costs.rtt
    return min(max(MIN_GRACE, round_cost), MAX_GRACE)


class RaceDrafter:
    """Several guarded drafters behind the one-drafter interface the speculation loop uses."""

    kind = "race"

    def __init__(
        self,
        drafters: Sequence[GuardedDrafter],
        costs: Callable[[], Costs | None] = lambda: None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not drafters:
            raise ValueError("a race needs at least one drafter")
        names = [d.name for d in drafters]
        if len(set(names)) != len(names):
            raise ValueError(f"race drafters need distinct names, got {names}")
        self.drafters = list(drafters)
        self.costs = costs
        self.clock = clock
        self.board = Scoreboard(names)

    @property
    def name(self) -> str:
        return "+".join(d.name for d in self.drafters)

    def available(self) -> bool:
        return any(d.available() for d in self.drafters)

    def seconds_until_retry(self) -> float:
        return min(d.seconds_until_retry() for d in self.drafters)

    async def gather(self, request: DraftRequest, deadline: float) -> list[tuple[str, Proposal]]:
        """Every proposal that arrives in time: all of them until the first usable one, then the
        grace; the drafters still running after that are cut off (cancelled, not failures)."""
        started = self.clock()
        tasks = {asyncio.create_task(d.propose(request, deadline)): d for d in self.drafters if d.available()}
        got: list[tuple[str, Proposal]] = []
        cutoff: float | None = None
        try:
            while tasks:
                timeout = None if cutoff is None else max(cutoff - self.clock(), 0.0)
                done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break
                for task in done:
                    drafter = tasks.pop(task)
                    proposal = task.result()
                    if proposal is not None and proposal.tokens:
                        got.append((drafter.name, proposal))
                        self.board.lanes[drafter.name].record_arrival(self.clock() - started)
                if got and tasks:
                    cutoff = self._cutoff(started, got, list(tasks.values()), request.k)
        finally:
            for task, drafter in tasks.items():
                self.board.lanes[drafter.name].cut += 1
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
        return got

    def _cutoff(
        self, started: float, got: list[tuple[str, Proposal]], running: list[GuardedDrafter], k: int
    ) -> float:
        """When to stop waiting for the drafters still running, given the proposals in hand."""
        costs = self.costs()
        grace = grace_seconds(costs, k)
        round_cost = grace if costs is None else costs.verify_fixed + costs.verify_per_token * k + costs.rtt
        elapsed = self.clock() - started
        best = max(self._expected(name, proposal) for name, proposal in got)
        until = elapsed + grace
        for drafter in running:
            waited = worth_waiting(self.board.lanes[drafter.name], best, elapsed, round_cost)
            if waited is not None:
                until = max(until, waited)
        return started + min(until, elapsed + MAX_GRACE)

    def _expected(self, name: str, proposal: Proposal) -> float:
        value = self.board.lanes[name].value
        return min(value, len(proposal.tokens)) if value is not None else 0.0

    async def propose(self, request: DraftRequest, deadline: float) -> Proposal | None:
        got = await self.gather(request, deadline)
        if not got:
            return None
        # Best guess first: the pipelined loop drafts the next round assuming it is all accepted.
        got.sort(key=lambda item: (self._expected(*item), len(item[1].tokens)), reverse=True)
        return Candidates.of([p for _, p in got], [n for n, _ in got], self.board)

    async def close(self) -> None:
        for d in self.drafters:
            await d.close()

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "available": self.available(),
            "drafters": [d.snapshot() for d in self.drafters],
            "race": self.board.snapshot(),
        }
