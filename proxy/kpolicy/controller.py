"""The draft-length policy of one drafter: measurements in, K out. Pure (no I/O, no clocks).

Each round the speculation loop asks `next_k()`:

- K > 0: draft K tokens and verify them (`record_round` afterwards);
- K = 0: speculation does not pay right now; let the target decode alone for `off_chunk()`
  tokens (`record_engine` afterwards; that also measures the baseline it has to beat).

Speculation turns itself off when the cost model says even the best K loses to the target alone
(a fast target, a poor drafter). It probes again after a number of tokens that doubles each time
the probe confirms it still loses (up to `max_probe_after`), so a bad drafter costs little and a
drafter that got better (or a target that got slower) is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass

from tightwad.proxy.kpolicy.costmodel import Choice, Costs, choose, rate
from tightwad.proxy.kpolicy.estimates import Acceptance, Average, Line, LineFit

# Shape priors (ratio of a token's cost to the fixed cost), used until the spread of measured K
# shows the real slope: a verify of 9 positions costs ~1.7x a one-token decode (measured on CPU);
# a model drafter spends about one token's time on fixed overheads.
VERIFY_RATIO = 0.09
DRAFT_RATIO = 1.0


@dataclass(frozen=True)
class KPolicy:
    """The rules `KController` chooses K under: its range, the warm-up, and the off/probe schedule."""

    k_max: int = 16  # the most tokens `auto` may draft
    fixed_k: int | None = None  # the user's fixed K (None = auto)
    initial_k: int = 4  # before anything is measured
    warmup_rounds: int = 4  # rounds before the policy may turn speculation off
    margin: float = 1.05  # speculation must be this much faster than the target alone to stay on
    probe_after: int = 32  # tokens the target decodes alone before the first probe
    max_probe_after: int = 1024
    probe_rounds: int = 4  # speculative rounds a probe runs to refresh the measurements
    pipelined: bool = False


class KController:
    """Measurements of one drafter and engine in, the next round's K out."""

    def __init__(self, policy: KPolicy | None = None) -> None:
        self.policy = policy or KPolicy()
        self.acceptance = Acceptance()
        self.draft = LineFit(Line(0.0, 0.0), DRAFT_RATIO)
        self.verify = LineFit(Line(0.0, 0.0), VERIFY_RATIO)
        self.rtt = Average(0.0, half_life=16)
        self.engine_rate = Average(0.0, half_life=8)  # tokens/s of the target decoding alone
        self.rounds = 0
        self.off = False
        self._off_left = 0  # tokens the target still decodes alone before the next probe
        self._probe_left = 0  # speculative rounds left in the current probe
        self._probe_after = self.policy.probe_after
        self.last_choice = Choice(self._start_k(), 0.0, 1.0)
        self.warmup_s: float | None = None  # how long the start-up measurement took, once done

    # measurements -----------------------------------------------------------------------------
    def record_round(self, k: int, accepted: int, verify_seconds: float | None) -> None:
        """One verify of a k-token draft (k = 0: the drafter had nothing in time). Its time is left
        out (None) when the call also evaluated a prompt or a resent conversation."""
        self.rounds += 1
        self.acceptance.add(k, accepted)
        if verify_seconds is not None:
            self.verify.add(k, verify_seconds)

    def record_verify(self, k: int, seconds: float) -> None:
        """A timed verify of a k-token block outside a reply (the warm-up): a point of the verify
        cost curve, not a round (acceptance and the warm-up count are left alone)."""
        self.verify.add(k, seconds)

    def record_draft(self, k: int, seconds: float) -> None:
        """One draft call of k tokens, from its start to its answer."""
        if k > 0:
            self.draft.add(k, seconds)

    def record_rtt(self, seconds: float) -> None:
        self.rtt.add(seconds)

    def record_engine(self, tokens: int, intervals: int, seconds: float) -> None:
        """The target decoded `tokens` alone; `intervals` token-to-token gaps took `seconds` (the
        steady rate, without the time to the first token)."""
        if intervals > 0 and seconds > 0:
            self.engine_rate.add(intervals / seconds, weight=intervals / 16)
        if self.off:
            self._off_left -= tokens
            if self._off_left <= 0:
                self._probe_left = self.policy.probe_rounds

    # decisions --------------------------------------------------------------------------------
    def costs(self) -> Costs:
        verify, draft = self.verify.line(), self.draft.line()
        rtt = min(self.rtt.value, verify.intercept)
        verify_fixed = max(verify.intercept - rtt, 1e-6)
        # Until the target alone is measured, one decode per token is its best case.
        baseline = self.engine_rate.value if self.engine_rate.measured else 1.0 / verify_fixed
        return Costs(
            acceptance=self.acceptance.alpha,
            draft_fixed=draft.intercept,
            draft_per_token=draft.slope,
            verify_fixed=verify_fixed,
            verify_per_token=verify.slope,
            rtt=rtt,
            baseline_rate=baseline,
            pipelined=self.policy.pipelined,
        )

    def choice(self) -> Choice:
        return choose(self.costs(), self.policy.k_max, self.policy.fixed_k, self.policy.margin)

    def next_k(self) -> int:
        if self.rounds < self.policy.warmup_rounds or not self.verify.measured:
            return self._start_k()
        if self.off and self._probe_left <= 0:
            return 0
        choice = self.choice()
        self.last_choice = choice
        if self.off:  # probing: speculate whatever the verdict, to measure it afresh
            self._probe_left -= 1
            if self._probe_left <= 0:
                self._end_probe(choice)
            return choice.k or self._best_k()
        if not choice.speculate:
            self._turn_off(first=True)
            return 0
        return choice.k

    def off_chunk(self) -> int:
        """How many tokens the target should decode alone before asking again."""
        return max(self._off_left, 1) if self.off else self.policy.probe_after

    # internals --------------------------------------------------------------------------------
    def _start_k(self) -> int:
        return self.policy.fixed_k or min(self.policy.initial_k, self.policy.k_max)

    def _best_k(self) -> int:
        if self.policy.fixed_k:
            return self.policy.fixed_k
        costs = self.costs()
        return max(range(1, self.policy.k_max + 1), key=lambda k: rate(costs, k))

    def _turn_off(self, first: bool) -> None:
        if first:
            self._probe_after = self.policy.probe_after
        self.off = True
        self._off_left = self._probe_after
        self._probe_left = 0

    def _end_probe(self, choice: Choice) -> None:
        if choice.speculate:
            self.off = False
            self._probe_after = self.policy.probe_after
        else:
            self._probe_after = min(self._probe_after * 2, self.policy.max_probe_after)
            self._turn_off(first=False)

    # reporting --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, float | int | bool | None]:
        costs = self.costs()
        choice = self.last_choice
        return {
            "k": choice.k if not self.off else 0,
            "speculating": not self.off,
            "acceptance": round(costs.acceptance, 4),
            "expected_speedup": round(choice.speedup, 3),
            "draft_ms_per_token": round(costs.draft_per_token * 1e3, 3),
            "draft_fixed_ms": round(costs.draft_fixed * 1e3, 3),
            "verify_fixed_ms": round(costs.verify_fixed * 1e3, 3),
            "verify_ms_per_token": round(costs.verify_per_token * 1e3, 3),
            "rtt_ms": round(costs.rtt * 1e3, 3),
            "target_alone_tok_s": round(costs.baseline_rate, 2),
            "warmup_s": round(self.warmup_s, 2) if self.warmup_s is not None else None,
        }
