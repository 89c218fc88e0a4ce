"""How many tokens to draft per round: a pure cost model (no I/O, no clocks).

Leviathan et al. (2023): when each draft token is accepted with probability α, independently, a
round that drafts K tokens yields on average

    E(K) = (1 - α^(K+1)) / (1 - α)

target tokens (the accepted draft tokens plus the one the target adds: a correction or a bonus).
A round costs the drafter's time for K tokens, the engine's time to score K+1 positions in one
decode, and the network round trip to the engine:

    T(K) = draft(K) + verify(K) + rtt,   draft(K) = d0 + d1·K,   verify(K) = v0 + v1·K

With pipelining the drafter already drafted this round while the previous verify was in flight,
which pays off when that whole previous draft and its bonus were guessed right (probability
α^(K+1)); then the round costs max(draft, verify + rtt) instead of the sum.

The target alone produces `baseline_rate` tokens per second (the engine's own decoding, one token
per decode and no network round trip per token). K is chosen to maximise E(K)/T(K); when even the
best K is not clearly faster than the baseline, speculation is off.
"""

from __future__ import annotations

from dataclasses import dataclass

ALPHA_CEILING = 0.995  # α = 1 would make E(K) grow without bound; no real drafter is perfect


@dataclass(frozen=True)
class Costs:
    """What one round costs, in seconds, and how good the drafter is."""

    acceptance: float  # α, per draft token
    draft_fixed: float  # d0: per draft call (HTTP, evaluating the tokens new to the drafter)
    draft_per_token: float  # d1
    verify_fixed: float  # v0: an engine decode scoring one position, without the network
    verify_per_token: float  # v1: each extra position scored in the same decode
    rtt: float  # proxy <-> engine round trip, paid once per round
    baseline_rate: float  # tokens/s of the target decoding alone
    pipelined: bool = False


@dataclass(frozen=True)
class Choice:
    k: int  # draft tokens for the next round; 0 = speculation off (the target alone)
    rate: float  # expected tokens/s at that K
    speedup: float  # expected rate / baseline rate

    @property
    def speculate(self) -> bool:
        return self.k > 0


def expected_tokens(alpha: float, k: int) -> float:
    """E(K): target tokens one round yields (accepted draft tokens + the target's own token)."""
    if k <= 0:
        return 1.0
    a = min(max(alpha, 0.0), ALPHA_CEILING)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def draft_time(costs: Costs, k: int) -> float:
    return 0.0 if k <= 0 else costs.draft_fixed + costs.draft_per_token * k


def verify_time(costs: Costs, k: int) -> float:
    return costs.verify_fixed + costs.verify_per_token * max(k, 0) + costs.rtt


def round_time(costs: Costs, k: int) -> float:
    if k <= 0:
        return verify_time(costs, 0)
    verify = verify_time(costs, k)
    if not costs.pipelined:
        return draft_time(costs, k) + verify
    # The pipelined draft also guesses the bonus token, so it is one token longer.
    hit = min(max(costs.acceptance, 0.0), ALPHA_CEILING) ** (k + 1)
    draft = draft_time(costs, k + 1)
    return hit * max(draft, verify) + (1.0 - hit) * (draft_time(costs, k) + verify)


def rate(costs: Costs, k: int) -> float:
    """Expected target tokens per second when every round drafts k tokens."""
    return expected_tokens(costs.acceptance, k) / max(round_time(costs, k), 1e-9)


def choose(costs: Costs, k_max: int, fixed_k: int | None = None, margin: float = 1.05) -> Choice:
    """The K with the best expected rate, or K = 0 (off) when speculating is not at least `margin`
    times faster than the target alone. A fixed K (the user's choice) is kept, but is still turned
    off when it loses."""
    baseline = max(costs.baseline_rate, 1e-9)
    candidates = [fixed_k] if fixed_k else range(1, max(k_max, 1) + 1)
    best_k = max(candidates, key=lambda k: (rate(costs, k), -k))
    best = rate(costs, best_k)
    if best < baseline * margin:
        return Choice(0, baseline, 1.0)
    return Choice(best_k, best, best / baseline)
