"""Online estimates of what the cost model needs, from measured rounds: pure, no clocks.

Everything decays (each new observation weighs `1 / half_life` more than the oldest), so the
estimates follow a drafter that warms up, a pool that gets busier, or a new kind of prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _decay(half_life: float) -> float:
    return math.exp(-math.log(2) / max(half_life, 1.0))


class Average:
    """Exponentially weighted mean; `value` is `prior` until the first observation."""

    def __init__(self, prior: float, half_life: float = 32) -> None:
        self.prior = prior
        self.keep = _decay(half_life)
        self.weight = 0.0
        self.total = 0.0

    def add(self, value: float, weight: float = 1.0) -> None:
        self.weight = self.weight * self.keep + weight
        self.total = self.total * self.keep + value * weight

    @property
    def value(self) -> float:
        return self.total / self.weight if self.weight > 0 else self.prior

    @property
    def measured(self) -> bool:
        return self.weight > 0


class Acceptance:
    """Per-token acceptance α under the geometric model: a round drafting k tokens that accepts n
    contributes n successes and, when n < k, one failure; α = successes / (successes + failures).
    A weak prior keeps the first rounds from swinging it to 0 or 1."""

    def __init__(self, prior: float = 0.6, prior_weight: float = 2.0, half_life: float = 64) -> None:
        self.keep = _decay(half_life)
        self.successes = prior * prior_weight
        self.failures = (1.0 - prior) * prior_weight
        self.rounds = 0

    def add(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        accepted = min(max(accepted, 0), drafted)
        self.successes = self.successes * self.keep + accepted
        self.failures = self.failures * self.keep + (1.0 if accepted < drafted else 0.0)
        self.rounds += 1

    @property
    def alpha(self) -> float:
        return self.successes / max(self.successes + self.failures, 1e-9)


@dataclass(frozen=True)
class Line:
    intercept: float
    slope: float

    def at(self, x: float) -> float:
        return self.intercept + self.slope * x


class LineFit:
    """Decayed least squares of y = a + b·x (time against tokens). With too little spread in x
    to see the slope, the slope is taken as `ratio` times the intercept (a prior shape)."""

    def __init__(self, prior: Line, ratio: float, half_life: float = 48) -> None:
        self.prior = prior
        self.ratio = ratio
        self.keep = _decay(half_life)
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def add(self, x: float, y: float) -> None:
        k = self.keep
        self.w = self.w * k + 1.0
        self.x = self.x * k + x
        self.y = self.y * k + y
        self.xx = self.xx * k + x * x
        self.xy = self.xy * k + x * y

    @property
    def measured(self) -> bool:
        return self.w > 0

    def line(self) -> Line:
        if self.w <= 0:
            return self.prior
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        if var > 0.5:
            slope = (self.xy / self.w - mx * my) / var
            intercept = my - slope * mx
            if slope >= 0 and intercept >= 0:
                return Line(intercept, slope)
        # Not enough spread (or a fit that says negative time): keep the prior's shape.
        intercept = my / (1.0 + self.ratio * mx)
        return Line(intercept, self.ratio * intercept)
