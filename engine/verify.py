"""The acceptance rules of speculative decoding: pure numpy, no I/O, no libllama.

The target's distribution at a position is defined by `target_distribution(logits, params)`:

1. temperature <= 0 means greedy: all mass on the first index of the largest logit;
2. otherwise logits are divided by the temperature;
3. top-k (k > 0): only the k largest logits survive (ties at the boundary: lower token ids first);
4. softmax over the survivors;
5. top-p (p < 1): the smallest set of most probable tokens whose mass reaches p survives (ties:
   lower token ids first), renormalised.

That is the order of the Hugging Face samplers. The engine's own sampling and verification both
use exactly this function, so "distributed as the target" means distributed as this.

Verification (Leviathan et al. 2023, Chen et al. 2023). Given draft tokens x_1..x_K and the target's
rows p_1..p_{K+1} (p_i is the distribution of the token at draft position i, p_{K+1} the bonus):

- greedy: accept while x_i equals the argmax of p_i; the next token is the argmax at the first
  mismatch (a correction) or at K+1 (the bonus);
- sampled, drafter probabilities q_i known: accept x_i with probability min(1, p_i(x)/q_i(x)); on
  rejection the next token is drawn from norm(max(0, p_i - q_i)); after K acceptances it is drawn from
  p_{K+1}. Exact when x_i really was drawn from q_i;
- sampled, no probabilities (a greedy, text or n-gram drafter): q_i is a point mass on x_i, so x_i
  is accepted with probability p_i(x) and the residual is p_i without x, renormalised. This is exact
  for ANY way of choosing x_i that does not look at our random numbers: P(out = y) = p(y) for all y.
  It is also what a drafter probability of zero for its own token falls back to.
- several drafts, sampled: `accept_tree` walks the drafts as a prefix tree and, at each node, tries
  the distinct candidate tokens in turn with the point-mass rule against the running residual
  (accept c with probability r(c)/sum(r), else remove c from r). Every candidate tried keeps the
  output distributed exactly as p, so the result is exact whatever the drafts are. Drafter
  probabilities are not used there: choosing the "best" of several independently verified drafts
  would bias the output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tightwad.verify_api import Sampling


@dataclass(frozen=True)
class Acceptance:
    """How many draft tokens the target accepts, and the token it adds (correction or bonus). The
    pure outcome of one rule; the engine turns it into the verify API's reply."""

    n_accepted: int
    next_token: int


def _top_k_mask(z: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k largest entries; ties at the threshold go to lower indices."""
    if k <= 0 or k >= z.size:
        return np.ones(z.size, dtype=bool)
    threshold = np.partition(z, z.size - k)[z.size - k]
    mask = z > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        ties = np.flatnonzero(z == threshold)[:missing]
        mask[ties] = True
    return mask


def _argmax(logits: np.ndarray) -> int:
    """The first largest logit, NaN ignored (token 0 when none is a number)."""
    finite = np.where(np.isnan(logits), -np.inf, logits)
    return int(np.argmax(finite))


def target_distribution(logits: np.ndarray, params: Sampling) -> np.ndarray:
    """The target's next-token distribution (float64, sums to 1) under `params`; see module doc."""
    logits = np.asarray(logits)
    probs = np.zeros(logits.size, dtype=np.float64)
    if params.greedy:
        probs[int(np.argmax(logits))] = 1.0
        return probs
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        z = logits.astype(np.float64) / params.temperature
        keep = _top_k_mask(z, params.top_k)
        kept = np.flatnonzero(keep)
        weights = np.exp(z[kept] - z[kept].max())
        weights /= weights.sum()
    if not np.isfinite(weights).all():
        # Non-finite logits, or a temperature so small that logits/T overflowed (Sampling makes
        # such temperatures greedy; this is the last line): the limit of the rule is the argmax.
        probs[_argmax(logits)] = 1.0
        return probs
    if params.top_p < 1.0:
        order = np.lexsort((kept, -weights))  # most probable first, lower id first on ties
        cumulative = np.cumsum(weights[order])
        n_keep = int(np.searchsorted(cumulative, params.top_p, side="left")) + 1
        chosen = order[: min(n_keep, order.size)]
        kept, weights = kept[chosen], weights[chosen]
        weights /= weights.sum()
    probs[kept] = weights
    return probs


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from a (possibly unnormalised, non-negative) distribution; never a zero-mass token."""
    cumulative = np.cumsum(probs, dtype=np.float64)
    total = cumulative[-1]
    if not total > 0:
        raise ValueError("cannot sample from a distribution with no mass")
    index = int(np.searchsorted(cumulative, rng.random() * total, side="right"))
    if index >= probs.size or probs[index] <= 0:  # rounding at the very top end
        index = int(np.flatnonzero(probs > 0)[-1])
    return index


def accept_greedy(draft: Sequence[int], target_argmax: Sequence[int]) -> Acceptance:
    """Accept while the draft equals the target's argmax; `target_argmax` has len(draft) + 1 entries."""
    if len(target_argmax) != len(draft) + 1:
        raise ValueError(f"need {len(draft) + 1} target rows for {len(draft)} draft tokens")
    n = 0
    while n < len(draft) and int(draft[n]) == int(target_argmax[n]):
        n += 1
    return Acceptance(n, int(target_argmax[n]))


def _residual(p: np.ndarray, q: np.ndarray | None, token: int) -> np.ndarray:
    if q is None:
        residual = p.copy()
        residual[token] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    return residual


def accept_sampled(
    draft: Sequence[int],
    draft_probs: Sequence[np.ndarray] | None,
    target_probs_rows: Sequence[np.ndarray],
    rng: np.random.Generator,
) -> Acceptance:
    """The Leviathan/Chen rejection rule; `target_probs_rows[i]` is p at draft position i and row
    len(draft) is the bonus. Rows are read lazily, in order, and only up to the first rejection."""
    if draft_probs is not None and len(draft_probs) != len(draft):
        raise ValueError(f"{len(draft_probs)} probability rows for {len(draft)} draft tokens")
    for i, token in enumerate(draft):
        token = int(token)
        p = target_probs_rows[i]
        q = None if draft_probs is None else np.asarray(draft_probs[i], dtype=np.float64)
        if q is not None and not q[token] > 0:
            q = None  # the drafter says it could not have proposed this: the point-mass rule is exact
        accept = min(1.0, p[token] / q[token]) if q is not None else float(p[token])
        if rng.random() < accept:
            continue
        residual = _residual(p, q, token)
        if not residual.sum() > 0:  # only reachable through rounding: p and q agree everywhere
            residual = p
        return Acceptance(i, sample(residual, rng))
    return Acceptance(len(draft), sample(target_probs_rows[len(draft)], rng))


def accept_tree(
    drafts: Sequence[Sequence[int]],
    target_row: Callable[[int, int], np.ndarray],
    rng: np.random.Generator,
) -> tuple[Acceptance, int]:
    """Exact sampled verification of several drafts at once (see module doc).

    `target_row(d, i)` is the target's distribution at position i of draft d (the context is the
    conversation plus drafts[d][:i]). Returns the acceptance and the index of a draft whose first
    `n_accepted` tokens were accepted (the lowest such index).
    """
    if not drafts:
        raise ValueError("no drafts to verify")
    alive = list(range(len(drafts)))
    depth = 0
    while True:
        representative = alive[0]
        p = target_row(representative, depth)
        candidates: list[int] = []
        for d in alive:
            if len(drafts[d]) > depth and int(drafts[d][depth]) not in candidates:
                candidates.append(int(drafts[d][depth]))
        residual = p.astype(np.float64, copy=True)
        chosen: int | None = None
        for token in candidates:
            mass = residual.sum()
            if not mass > 0:
                break
            if rng.random() < residual[token] / mass:
                chosen = token
                break
            residual[token] = 0.0
        if chosen is None:
            if not residual.sum() > 0:
                residual = p
            return Acceptance(depth, sample(residual, rng)), representative
        alive = [d for d in alive if len(drafts[d]) > depth and int(drafts[d][depth]) == chosen]
        depth += 1
