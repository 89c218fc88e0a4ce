"""Consensus (APPROXIMATE): the three agreement rules differ on the same drafts, and in the loop the
target is skipped exactly where the rule says; agreeing drafters that are wrong make a wrong reply
(which is why the mode is opt-in and labelled approximate), while race on the same drafters is exact."""

from __future__ import annotations

import pytest
from support.proxy_fakes import FakeDrafter, FakeEngine, lane, make_race, run, target_alone

from tightwad.errors import TightwadError
from tightwad.proxy.config import DrafterConfig, ProxyConfig
from tightwad.proxy.consensus import POLICIES, agreed

A, B, C, D, X, Y = 1, 2, 3, 4, 8, 9


def test_the_three_rules_differ_on_the_same_drafts() -> None:
    drafts = [[A, B, C, D], [A], [A, B]]
    assert agreed(drafts, "strict") == [A]  # the second drafter has nothing at position 2
    assert agreed(drafts, "majority") == [A, B]  # C has one vote of three
    assert agreed(drafts, "any_disagree") == [A, B, C, D]  # nobody contradicts C or D


def test_a_majority_outvotes_a_disagreement_that_the_others_stop_at() -> None:
    drafts = [[A, B, C], [A, B, C], [A, X, Y]]
    assert agreed(drafts, "strict") == [A]
    assert agreed(drafts, "any_disagree") == [A]
    assert agreed(drafts, "majority") == [A, B, C]


def test_majority_counts_every_drafter_asked_and_only_those_still_on_the_agreed_path() -> None:
    # Two of five drafters answered: no majority of the five.
    assert agreed([[A, B], [A, B]], "majority", n_drafters=5) == []
    # After B wins position 1, the drafter that said X there no longer votes.
    assert agreed([[A, B, C], [A, B, D], [A, X, C]], "majority") == [A, B]


def test_strict_needs_every_drafter_asked_and_nobody_alone_is_a_consensus() -> None:
    assert agreed([[A, B], [A, B]], "strict", n_drafters=3) == []
    for policy in POLICIES:
        assert agreed([[A, B, C]], policy) == []
        assert agreed([], policy) == []
    with pytest.raises(ValueError, match="strict, majority, any_disagree"):
        agreed([[A], [A]], "most")


def test_in_the_loop_the_rules_skip_the_target_differently() -> None:
    """Every drafter is right, but they draft different lengths, and every third history length
    one of them is wrong from the first token: where the target is skipped depends on the rule."""
    results = {}
    for policy in POLICIES:
        engine = FakeEngine(decode_s=0.0)
        drafters = [
            lane("long", right=99),
            lane("one", right=99, length=1, wrong_every=3),
            lane("two", right=99, length=2),
        ]
        spec = make_race(drafters, engine, consensus=policy, k=6)
        out = run(spec, 60)
        assert out == target_alone([5, 9, 13], 60)  # agreed tokens were all right here
        results[policy] = (spec.skipped_rounds, spec.skipped_tokens, engine.verify_calls)
        # the engine's conversation holds the skipped tokens too (sent with the next verify)
        history = [5, 9, 13, *out]
        for conversation in engine.conversations.values():
            assert history[: len(conversation)] == conversation
    assert len(set(results.values())) == 3, results
    strict, majority, any_disagree = (results[p] for p in POLICIES)
    assert strict[1] < majority[1]  # majority outvotes the wrong drafter, strict stops at it
    assert any_disagree[1] / any_disagree[0] > majority[1] / majority[0]  # longer agreed runs
    assert all(r[0] > 0 for r in results.values())


def test_agreeing_drafters_that_are_wrong_make_consensus_wrong_but_race_stays_exact() -> None:
    def drafters() -> list[FakeDrafter]:
        return [lane("a", right=2, wrong_with=5), lane("b", right=2, wrong_with=5)]

    expected = target_alone([5, 9, 13], 30)
    approx = run(make_race(drafters(), FakeEngine(decode_s=0.0), consensus="strict", k=4), 30)
    assert approx != expected
    exact = run(make_race(drafters(), FakeEngine(decode_s=0.0), consensus=None, k=4), 30)
    assert exact == expected


def test_config_needs_two_drafters_and_a_known_policy() -> None:
    one = [DrafterConfig(kind="ngram", name="a")]
    two = [*one, DrafterConfig(kind="ngram", name="b")]
    with pytest.raises(TightwadError, match="at least two drafters"):
        ProxyConfig("http://e", drafters=one, mode="consensus").check()
    with pytest.raises(TightwadError, match="not one of"):
        ProxyConfig("http://e", drafters=two, mode="consensus", consensus_policy="most").check()
    with pytest.raises(TightwadError, match="distinct names"):
        ProxyConfig("http://e", drafters=[one[0], one[0]], mode="race").check()
    assert ProxyConfig("http://e", drafters=two, mode="consensus", consensus_policy="majority").check()
