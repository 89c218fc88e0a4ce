"""The acceptance rules of speculative decoding: pure numpy, no I/O, no libllama.

The target's distribution at a position is defined by `target_distribution(logits, params)`, on
logits already shaped by `shape_logits(logits, params, counts)`:

0. shaping (OpenAI's definition): z[j] = logits[j] + logit_bias[j] - frequency_penalty * c[j]
   - presence_penalty * (c[j] > 0), where c[j] counts token j in the text generated so far (the
   conversation from its generation start, and at a draft position also the draft's earlier tokens:
   exactly the history the target alone would have there);
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

Seeds. With a seed, every random number is a pure function of (seed, position), where position is
the absolute index in the conversation of the token being chosen:

    u(seed, P) = (first 8 bytes, little-endian, of BLAKE2b-64(b"tightwad-u1" | seed | P)) >> 11, / 2^53

with seed (as unsigned 64-bit) and P as 8 bytes little-endian each: a float in [0, 1), uniform,
independent across positions. The token at P is then `inverse_cdf(p_P, u(seed, P))` (token ids in
order, the first whose cumulative mass passes u * total), whoever computes it: the engine decoding
alone, or a verify of any draft. A verify accepts draft tokens while they equal that token and
emits it at the first mismatch (`accept_seeded`, `accept_tree_seeded`): greedy acceptance with the
argmax replaced by the seeded choice. This IS the point-mass rejection rule, realised with one
uniform for the accept test and the residual sample: P(accept x) = P(inverse_cdf(p, u) = x) = p(x),
and given a rejection the token is inverse_cdf(p, u) conditioned on != x, i.e. p without x,
renormalised. So a seeded reply is exact, and it is the same token sequence whatever the drafter
proposed and however rounds were cut: the engine alone and the proxy give the same text (up to the
float noise of scoring a position in a block rather than alone; see README "Exactness, precisely").
The price: drafter probabilities are not used under a seed (the acceptance is p(x), not
min(1, p(x)/q(x))), since any rule that uses them makes the output depend on the draft.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tightwad.verify_api import LOGPROB_FLOOR, Sampling, TokenLogprob


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


def shape_logits(logits: np.ndarray, params: Sampling, counts: Mapping[int, int]) -> np.ndarray:
    """Step 0 of the module doc: `logits` with logit_bias and the penalties applied (`counts`: each
    token's occurrences in the text generated so far). The same array when nothing applies."""
    if not params.penalized:
        return logits
    z = np.array(logits, dtype=np.float64)
    for token, bias in params.logit_bias:
        if token < z.size:
            z[token] += bias
    if params.presence_penalty or params.frequency_penalty:
        seen = [t for t, c in counts.items() if c > 0 and 0 <= t < z.size]
        if seen:
            ids = np.asarray(seen, dtype=np.int64)
            times = np.asarray([counts[t] for t in seen], dtype=np.float64)
            z[ids] -= params.frequency_penalty * times + params.presence_penalty
    return z


def penalty_counts(generated: Iterable[int]) -> Counter[int]:
    """c[j] of the module doc for a generated text (only needed when penalties are on)."""
    return Counter(int(t) for t in generated)


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


def inverse_cdf(probs: np.ndarray, u: float) -> int:
    """The token whose cumulative mass (ids in order) first passes u * total, for u in [0, 1); never
    a zero-mass token. With u uniform this samples from the (unnormalised) distribution."""
    cumulative = np.cumsum(probs, dtype=np.float64)
    total = cumulative[-1]
    if not total > 0:
        raise ValueError("cannot sample from a distribution with no mass")
    index = int(np.searchsorted(cumulative, u * total, side="right"))
    if index >= probs.size or probs[index] <= 0:  # rounding at the very top end
        index = int(np.flatnonzero(probs > 0)[-1])
    return index


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from a (possibly unnormalised, non-negative) distribution; never a zero-mass token."""
    return inverse_cdf(probs, rng.random())


_U_DOMAIN = b"tightwad-u1"


def keyed_uniform(seed: int, position: int) -> float:
    """u(seed, P) of the module doc ("Seeds"): uniform in [0, 1), a pure function of its inputs."""
    data = _U_DOMAIN + (seed % 2**64).to_bytes(8, "little") + (position % 2**64).to_bytes(8, "little")
    bits = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    return (bits >> 11) / float(1 << 53)


def seeded_choice(probs: np.ndarray, seed: int, position: int) -> int:
    """The token at absolute position `position` of a seeded generation."""
    return inverse_cdf(probs, keyed_uniform(seed, position))


def accept_seeded(
    draft: Sequence[int], target_probs_rows: Sequence[np.ndarray], seed: int, first_position: int
) -> Acceptance:
    """The seeded rule (module doc, "Seeds"): row i chooses the token at `first_position + i`; draft
    tokens are accepted while they equal it. Rows are read lazily, up to the first mismatch."""
    choices = _LazyChoices(target_probs_rows, seed, first_position, len(draft) + 1)
    return accept_greedy(draft, choices)


class _LazyChoices(Sequence[int]):
    def __init__(self, rows: Sequence[np.ndarray], seed: int, first: int, n: int) -> None:
        self._rows, self._seed, self._first, self._n = rows, seed, first, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        return seeded_choice(self._rows[i], self._seed, self._first + i)


def accept_tree_seeded(
    drafts: Sequence[Sequence[int]],
    target_row: Callable[[int, int], np.ndarray],
    seed: int,
    first_position: int,
) -> tuple[Acceptance, int]:
    """Several drafts under a seed: the seeded token at each depth, followed through every draft
    that has it. Returns the acceptance and the lowest index of a draft that holds the accepted
    tokens (as accept_tree)."""
    if not drafts:
        raise ValueError("no drafts to verify")
    alive = list(range(len(drafts)))
    depth = 0
    while True:
        chosen = seeded_choice(target_row(alive[0], depth), seed, first_position + depth)
        following = [d for d in alive if len(drafts[d]) > depth and int(drafts[d][depth]) == chosen]
        if not following:
            return Acceptance(depth, chosen), alive[0]
        alive = following
        depth += 1


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under log-softmax(logits) (temperature 1, shaped logits), and the
    `top` most likely tokens (most likely first, lower id first on ties). -inf is LOGPROB_FLOOR."""
    z = np.asarray(logits, dtype=np.float64)
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        return TokenLogprob(token, LOGPROB_FLOOR, ())
    peak = finite.max()
    with np.errstate(over="ignore", invalid="ignore"):
        norm = peak + np.log(np.exp(finite - peak).sum())

    def lp(value: float) -> float:
        out = float(value - norm)
        return out if np.isfinite(out) and out > LOGPROB_FLOOR else LOGPROB_FLOOR

    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        k = min(top, z.size)
        safe = np.where(np.isnan(z), -np.inf, z)
        candidates = np.argpartition(-safe, k - 1)[:k] if k < z.size else np.arange(z.size)
        # Ties at the boundary: every token equal to the k-th value competes, lower ids first.
        threshold = safe[candidates].min()
        pool = np.flatnonzero(safe >= threshold)
        order = pool[np.lexsort((pool, -safe[pool]))][:k]
        best = tuple((int(t), lp(safe[t])) for t in order)
    return TokenLogprob(int(token), lp(z[token]), best)


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
