"""The acceptance rules of engine/verify.py on hand-made distributions.

Statistical checks use fixed seeds and a total-variation tolerance derived from the sample size:
for k categories and n samples, E[TV(empirical, p)] <= 0.5 * sqrt(k / n), and TV moves by at most 1/n
per sample, so by McDiarmid P(TV > E[TV] + t) <= exp(-2 n t^2); `tv_tolerance` takes t for a failure
probability of 1e-6. Every wrong rule tested against (always accept, never accept, sampling the
bonus from q, ...) is at least 0.2 away in TV, far outside these tolerances.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from support.stats import tv, tv_tolerance

from tightwad.engine.verify import (
    Acceptance,
    accept_greedy,
    accept_sampled,
    accept_tree,
    sample,
    target_distribution,
)
from tightwad.verify_api import Sampling


# target_distribution ---------------------------------------------------------------------------
def test_greedy_is_a_point_mass_on_the_first_largest_logit() -> None:
    probs = target_distribution(np.array([0.5, 2.0, 2.0, -1.0]), Sampling(temperature=0))
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_temperature_scales_logits_before_the_softmax() -> None:
    logits = np.array([1.0, 2.0, 3.0])
    probs = target_distribution(logits, Sampling(temperature=2.0))
    expected = np.exp(logits / 2) / np.exp(logits / 2).sum()
    assert np.allclose(probs, expected) and probs.dtype == np.float64


def test_top_k_keeps_k_largest_with_ties_to_lower_ids() -> None:
    probs = target_distribution(np.array([1.0, 3.0, 3.0, 3.0, 0.0]), Sampling(temperature=1, top_k=2))
    assert np.flatnonzero(probs).tolist() == [1, 2]
    assert probs[1] == pytest.approx(0.5)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    probs = target_distribution(logits, Sampling(temperature=1, top_p=0.79))
    assert np.allclose(probs, [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    probs = target_distribution(logits, Sampling(temperature=1, top_p=0.81))
    assert np.flatnonzero(probs).tolist() == [0, 1, 2]
    probs = target_distribution(logits, Sampling(temperature=1, top_p=0.01))
    assert probs.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_top_k_then_top_p() -> None:
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    probs = target_distribution(logits, Sampling(temperature=1, top_k=3, top_p=0.75))
    # after top-3: 0.4/0.9, 0.3/0.9, 0.2/0.9 -> cumulative 0.44, 0.78 -> keep two
    assert np.allclose(probs, [4 / 7, 3 / 7, 0, 0])


def test_bad_parameters_are_refused() -> None:
    for kwargs in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            Sampling(**kwargs)  # type: ignore[arg-type]


def test_sample_never_returns_a_zero_probability_token() -> None:
    rng = np.random.default_rng(0)
    p = np.array([0.0, 0.25, 0.0, 0.75, 0.0])
    seen = {sample(p, rng) for _ in range(2000)}
    assert seen == {1, 3}
    with pytest.raises(ValueError):
        sample(np.zeros(3), rng)


# greedy ----------------------------------------------------------------------------------------
def test_greedy_all_accepted_gives_the_bonus() -> None:
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == Acceptance(3, 8)


def test_greedy_first_rejected_gives_the_correction() -> None:
    assert accept_greedy([5, 6, 7], [4, 6, 7, 8]) == Acceptance(0, 4)


def test_greedy_stops_at_the_first_mismatch() -> None:
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]) == Acceptance(1, 9)


def test_greedy_empty_draft_is_one_plain_step() -> None:
    assert accept_greedy([], [42]) == Acceptance(0, 42)


def test_greedy_needs_one_more_row_than_draft_tokens() -> None:
    with pytest.raises(ValueError):
        accept_greedy([1, 2], [1, 2])


# sampled: deterministic edge cases ---------------------------------------------------------------
P0 = np.array([0.5, 0.3, 0.2, 0.0])
P1 = np.array([0.1, 0.1, 0.1, 0.7])


def test_a_draft_token_the_target_gives_zero_probability_is_always_rejected() -> None:
    rng = np.random.default_rng(1)
    for q in (None, [np.array([0.0, 0.0, 0.0, 1.0])]):
        for _ in range(200):
            verdict = accept_sampled([3], q, [P0, P1], rng)
            assert verdict.n_accepted == 0 and verdict.next_token != 3


def test_a_certain_target_token_is_always_accepted_and_the_bonus_comes_from_the_last_row() -> None:
    rng = np.random.default_rng(2)
    certain = np.array([0.0, 1.0, 0.0, 0.0])
    bonus = np.array([0.0, 0.0, 0.0, 1.0])
    for q in (None, [np.array([0.25, 0.25, 0.25, 0.25])] * 2):
        assert accept_sampled([1, 1], q, [certain, certain, bonus], rng) == Acceptance(2, 3)


def test_first_rejected_stops_reading_rows() -> None:
    rng = np.random.default_rng(3)
    read: list[int] = []

    class Rows(list):  # type: ignore[type-arg]
        def __getitem__(self, i):  # type: ignore[no-untyped-def]
            read.append(i)
            return super().__getitem__(i)

    verdict = accept_sampled([3, 0], None, Rows([P0, P1, P1]), rng)
    assert verdict.n_accepted == 0 and read == [0]


def test_zero_drafter_probability_for_its_own_token_falls_back_to_the_point_mass_rule() -> None:
    # q(x) = 0 for the proposed x: min(1, p/q) is undefined; the point-mass rule is exact anyway.
    rng = np.random.default_rng(4)
    q = [np.array([0.0, 1.0, 0.0, 0.0])]
    n = 20000
    firsts = Counter()
    for _ in range(n):
        v = accept_sampled([0], q, [P0, P1], rng)
        firsts[0 if v.n_accepted else v.next_token] += 1
    assert tv(firsts, P0) < tv_tolerance(4, n)


def test_mismatched_probability_rows_are_refused() -> None:
    with pytest.raises(ValueError):
        accept_sampled([1, 2], [P0], [P0, P0, P0], np.random.default_rng(0))


# sampled: distributions ------------------------------------------------------------------------
def _first_tokens(run, n: int) -> Counter[int]:  # type: ignore[no-untyped-def]
    return Counter(run() for _ in range(n))


@pytest.mark.parametrize("with_q", [True, False])
def test_first_token_is_distributed_as_the_target(with_q: bool) -> None:
    """Draft token sampled from q (which differs from p by TV 0.45): output token 0 ~ p."""
    rng = np.random.default_rng(10)
    q0 = np.array([0.05, 0.1, 0.1, 0.75])
    p0 = np.array([0.5, 0.3, 0.15, 0.05])
    assert 0.5 * np.abs(p0 - q0).sum() > 0.4
    n = 20000

    def one() -> int:
        x = int(rng.choice(4, p=q0))
        verdict = accept_sampled([x], [q0] if with_q else None, [p0, P1], rng)
        return x if verdict.n_accepted else verdict.next_token

    counts = _first_tokens(one, n)
    assert tv(counts, p0) < tv_tolerance(4, n)


def test_second_token_after_an_accepted_first_is_distributed_as_the_target() -> None:
    rng = np.random.default_rng(11)
    p0 = np.array([0.6, 0.2, 0.2, 0.0])
    p1 = np.array([0.1, 0.2, 0.3, 0.4])
    q1 = np.array([0.7, 0.1, 0.1, 0.1])
    bonus = np.array([1.0, 0.0, 0.0, 0.0])
    seconds: Counter[int] = Counter()
    n = 20000
    for _ in range(n):
        x1 = int(rng.choice(4, p=q1))
        verdict = accept_sampled([0, x1], [np.eye(4)[0], q1], [p0, p1, bonus], rng)
        if verdict.n_accepted >= 1:
            seconds[x1 if verdict.n_accepted == 2 else verdict.next_token] += 1
    m = sum(seconds.values())
    assert m > 0.5 * n  # token 0 was accepted with probability 0.6
    assert tv(seconds, p1) < tv_tolerance(4, m)


def test_all_accepted_bonus_is_distributed_as_the_last_row() -> None:
    rng = np.random.default_rng(12)
    certain = np.array([0.0, 0.0, 1.0, 0.0])
    bonus = np.array([0.25, 0.25, 0.4, 0.1])
    counts = Counter(accept_sampled([2], None, [certain, bonus], rng).next_token for _ in range(20000))
    assert tv(counts, bonus) < tv_tolerance(4, 20000)


# several drafts --------------------------------------------------------------------------------
def test_tree_first_token_is_distributed_as_the_target() -> None:
    rng = np.random.default_rng(20)
    p0 = np.array([0.1, 0.2, 0.3, 0.4])
    p_after = {0: np.array([1.0, 0, 0, 0]), 1: np.array([0, 1.0, 0, 0]), 2: np.array([0, 0, 1.0, 0])}
    drafts = [[3, 0], [2, 1], [3, 2]]  # two share their first token

    def row(d: int, i: int) -> np.ndarray:
        return p0 if i == 0 else p_after[d] if i == 1 else p0

    n = 20000
    counts: Counter[int] = Counter()
    for _ in range(n):
        verdict, winner = accept_tree(drafts, row, rng)
        first = drafts[winner][0] if verdict.n_accepted else verdict.next_token
        counts[first] += 1
    assert tv(counts, p0) < tv_tolerance(4, n)


def test_tree_under_greedy_rows_picks_the_longest_match() -> None:
    rng = np.random.default_rng(21)
    truth = [4, 5, 6, 7]
    drafts = [[4, 9, 9], [4, 5, 6], [1, 2, 3]]

    def row(d: int, i: int) -> np.ndarray:
        # the target's greedy continuation does not depend on which draft led there, as long as
        # the draft matched so far
        onehot = np.zeros(10)
        onehot[truth[i]] = 1.0
        return onehot

    verdict, winner = accept_tree(drafts, row, rng)
    assert (verdict, winner) == (Acceptance(3, 7), 1)
    greedy = [accept_greedy(d, truth[: len(d) + 1]) for d in drafts]
    assert max(v.n_accepted for v in greedy) == verdict.n_accepted


def test_a_tiny_temperature_never_produces_nan() -> None:
    logits = np.array([3.0, 1.0, -2.0, 3.0], dtype=np.float32)
    # Sampling itself treats it as greedy; the rule must not break even when asked directly.
    params = Sampling(temperature=0.5)
    object.__setattr__(params, "temperature", 1e-308)
    probs = target_distribution(logits, params)
    assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0)
    assert probs[0] == pytest.approx(1.0)


def test_non_finite_logits_give_a_distribution_not_an_exception() -> None:
    rng = np.random.default_rng(0)
    for logits in (np.array([np.inf, 1.0, np.inf]), np.array([np.nan, 1.0, 0.0]), np.full(3, -np.inf)):
        probs = target_distribution(logits, Sampling(temperature=1.0, top_p=0.9))
        assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0)
        sample(probs, rng)
