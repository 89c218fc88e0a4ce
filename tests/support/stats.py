"""Is an empirical distribution the one it should be? Total variation with a bound that fails once
in a million runs, not a loose tolerance.

With k categories and n samples, E[TV(empirical, p)] <= 0.5 * sqrt(k / n), and TV moves by at most
1/n per sample, so by McDiarmid P(TV > E[TV] + t) <= exp(-2 n t^2): `tv_tolerance` takes t for
the given failure probability.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np


def tv_tolerance(k: int, n: int, failure: float = 1e-6) -> float:
    return 0.5 * math.sqrt(k / n) + math.sqrt(math.log(1 / failure) / (2 * n))


def tv(counts: Counter[int], p: np.ndarray) -> float:
    """Total variation distance between the sample counts and the distribution p."""
    n = sum(counts.values())
    empirical = np.zeros_like(p)
    for token, c in counts.items():
        empirical[token] = c / n
    return 0.5 * float(np.abs(empirical - p).sum())
