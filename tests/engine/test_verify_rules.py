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
    accept_seeded,
    accept_tree,
    accept_tree_seeded,
    keyed_uniform,
    penalty_counts,
    sample,
    seeded_choice,
    shape_logits,
    target_distribution,
    token_logprob,
)
from tightwad.verify_api import LOGPROB_FLOOR, Sampling


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


# shaping: logit_bias and penalties -------------------------------------------------------------
def test_shaping_is_openais_formula() -> None:
    logits = np.array([1.0, 2.0, 3.0, 4.0])
    params = Sampling(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((0, 10.0), (3, -1.0)))
    shaped = shape_logits(logits, params, penalty_counts([1, 1, 3]))
    # token 1 seen twice: -(2 * 0.25 + 0.5); token 3 once: -(0.25 + 0.5) and its bias -1
    assert shaped.tolist() == [11.0, 1.0, 3.0, 2.25]
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0]  # the caller's row is never changed


def test_shaping_without_penalties_or_bias_is_the_same_row() -> None:
    logits = np.array([1.0, 2.0])
    assert shape_logits(logits, Sampling(temperature=1.0), penalty_counts([0, 1])) is logits


def test_a_bias_forces_and_bans_under_greedy() -> None:
    logits = np.array([5.0, 1.0, 0.0])
    forced = shape_logits(logits, Sampling(logit_bias=((2, 100.0),)), {})
    assert target_distribution(forced, Sampling()).tolist() == [0.0, 0.0, 1.0]
    banned = shape_logits(logits, Sampling(logit_bias=((0, -100.0),)), {})
    assert int(np.argmax(banned)) == 1


def test_penalty_history_includes_the_earlier_draft_tokens() -> None:
    """At draft position i the history is the generated text plus draft[:i], as for the target alone:
    a penalty that would turn the argmax away from a repeated token does so inside a block too."""
    row = np.array([3.0, 2.5, 0.0])
    params = Sampling(frequency_penalty=1.0)
    rows = [shape_logits(row, params, penalty_counts([0, 1][:i])) for i in range(3)]
    # position 0: nothing generated -> 0; position 1: 0 seen once -> 2.0 vs 2.5 -> 1; position 2: both seen
    assert accept_greedy([0, 1], [int(np.argmax(r)) for r in rows]) == Acceptance(2, 0)


def test_bad_shaping_values_are_refused_naming_the_field() -> None:
    from tightwad.openai import InvalidRequest

    with pytest.raises(InvalidRequest) as info:
        Sampling.from_json({"presence_penalty": 3})
    assert info.value.param == "presence_penalty"
    with pytest.raises(InvalidRequest) as info:
        Sampling.from_json({"logit_bias": {"x": 1}})
    assert info.value.param == "logit_bias"
    with pytest.raises(InvalidRequest) as info:
        Sampling.from_json({"logit_bias": {"5": 101}})
    assert info.value.param == "logit_bias"
    parsed = Sampling.from_json({"logit_bias": {"7": 2, "3": -1, "9": 0}, "frequency_penalty": 0.5})
    assert parsed.logit_bias == ((3, -1.0), (7, 2.0)) and parsed.frequency_penalty == 0.5
    assert Sampling.from_json(parsed.to_json()) == parsed


# seeds -----------------------------------------------------------------------------------------
def test_keyed_uniforms_are_pure_and_uniform() -> None:
    assert keyed_uniform(42, 7) == keyed_uniform(42, 7)
    assert keyed_uniform(42, 7) != keyed_uniform(42, 8) != keyed_uniform(43, 8)
    assert keyed_uniform(-1, 3) == keyed_uniform(2**64 - 1, 3)  # a negative seed is its two's complement
    draws = np.array([keyed_uniform(5, p) for p in range(20000)])
    assert draws.min() >= 0 and draws.max() < 1
    counts = Counter(int(u * 10) for u in draws)
    assert tv(counts, np.full(10, 0.1)) < tv_tolerance(10, 20000)


def test_a_seeded_verify_emits_the_target_alones_tokens_whatever_the_draft() -> None:
    """The engine alone picks seeded_choice(p_P, seed, P) at each position P; a seeded verify of ANY
    draft emits exactly those tokens, only more or fewer per round."""
    rng = np.random.default_rng(30)
    rows = [rng.dirichlet(np.ones(6)) for _ in range(8)]
    seed, start = 1234, 50
    alone = [seeded_choice(rows[i], seed, start + i) for i in range(8)]
    for trial in range(200):
        draft = [int(t) for t in rng.integers(0, 6, size=int(rng.integers(0, 7)))]
        if trial % 3 == 0:  # a draft that is right for a while
            cut = int(rng.integers(0, 7))
            draft = alone[:cut] + draft[cut:]
        verdict = accept_seeded(draft, rows, seed, start)
        assert draft[: verdict.n_accepted] == alone[: verdict.n_accepted]
        assert verdict.next_token == alone[verdict.n_accepted]
        tree, winner = accept_tree_seeded([draft, alone[:3]], lambda d, i: rows[i], seed, start)
        emitted = [*([draft, alone[:3]][winner][: tree.n_accepted]), tree.next_token]
        assert emitted == alone[: tree.n_accepted + 1]


def test_the_seeded_rule_is_exact_for_any_draft() -> None:
    """Over seeds, a seeded verify's first token is distributed as p, whatever the draft token."""
    p0 = np.array([0.1, 0.5, 0.3, 0.1])
    for x in (1, 3):
        verdicts = [accept_seeded([x], [p0, P1], seed, 0) for seed in range(20000)]
        counts = Counter(x if v.n_accepted else v.next_token for v in verdicts)
        assert tv(counts, p0) < tv_tolerance(4, 20000)


def test_seeded_rows_are_read_only_up_to_the_first_mismatch() -> None:
    class Rows(list):  # type: ignore[type-arg]
        def __getitem__(self, i):  # type: ignore[no-untyped-def]
            assert i <= 1, "read past the first rejection"
            return super().__getitem__(i)

    certain = np.array([0.0, 1.0, 0.0])
    verdict = accept_seeded([2, 0, 0], Rows([certain, certain, certain, certain]), 9, 0)
    assert verdict == Acceptance(0, 1)


# logprobs --------------------------------------------------------------------------------------
def test_token_logprob_is_the_log_softmax_and_the_top_list_is_ordered() -> None:
    logits = np.array([1.0, 3.0, 3.0, -np.inf, 0.0])
    entry = token_logprob(logits, 4, top=3)
    finite = np.array([1.0, 3.0, 3.0, 0.0])
    norm = np.log(np.exp(finite).sum())
    assert entry.logprob == pytest.approx(0.0 - norm)
    assert [t for t, _ in entry.top] == [1, 2, 0]  # ties: lower id first
    assert entry.top[0][1] == pytest.approx(3.0 - norm)
    assert token_logprob(logits, 3, top=0).logprob == LOGPROB_FLOOR  # -inf travels as OpenAI's floor
    assert token_logprob(logits, 1, top=0).top == ()
