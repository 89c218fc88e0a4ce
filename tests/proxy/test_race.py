"""Race: several drafters per round, every candidate verified in one engine call, the longest
accepted continuation wins, slow drafters are cut off. Whatever the drafters do, the reply is the
target's (exact); the scoreboard says who won how often. Real processes: tests/proxy/test_live.py."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from support.proxy_fakes import N_VOCAB, FakeDrafter, FakeEngine, lane, make_race, run, target_alone

from tightwad.proxy.app import create_app
from tightwad.proxy.config import DrafterConfig, ProxyConfig
from tightwad.proxy.drafters.base import Proposal
from tightwad.proxy.drafters.guard import GuardedDrafter
from tightwad.proxy.drafters.race import (
    MAX_GRACE,
    MIN_GRACE,
    Candidates,
    RaceDrafter,
    Scoreboard,
    grace_seconds,
)
from tightwad.proxy.kpolicy.costmodel import Costs

EXPECTED = target_alone([5, 9, 13], 48)


@pytest.mark.parametrize(
    "rights",
    [(0, 0), (1, 5), (5, 1), (99, 0), (2, 2)],
    ids=["both-bad", "b-better", "a-better", "one-perfect", "tie"],
)
@pytest.mark.parametrize("pipeline", [False, True], ids=["plain", "pipelined"])
def test_the_reply_is_the_targets_whatever_the_drafters_propose(
    rights: tuple[int, int], pipeline: bool
) -> None:
    engine = FakeEngine(decode_s=0.0)
    a = lane("a", right=rights[0], wrong_with=1)
    b = lane("b", right=rights[1], wrong_with=2)
    spec = make_race([a, b], engine, pipeline=pipeline)
    assert run(spec, 48) == EXPECTED
    # both candidates went to the engine in one verify (pipelined, a perfect drafter's draft made
    # during the previous verify is the only candidate consistent with the history)
    assert engine.max_drafts == 2 or (pipeline and 99 in rights)


def test_the_longest_accepted_proposal_wins_and_the_scoreboard_says_so() -> None:
    engine = FakeEngine(decode_s=0.0)
    spec = make_race([lane("poor", right=1), lane("good", right=5)], engine, k=6)
    assert run(spec, 60) == target_alone([5, 9, 13], 60)
    board = spec.drafter.board.snapshot()
    good, poor = board["drafters"]["good"], board["drafters"]["poor"]
    assert good["wins"] > 0 and poor["wins"] == 0  # ties go to the first candidate that arrived
    assert good["accepted_tokens"] > 4 * good["wins"]  # 5 a round, less near max_tokens
    assert spec.telemetry.accepted == sum(d["accepted_tokens"] for d in board["drafters"].values())


def test_a_slow_drafter_is_cut_off_by_the_deadline_and_the_reply_does_not_wait_for_it() -> None:
    engine = FakeEngine(decode_s=0.002)
    slow = lane("slow", right=99, delay_s=0.4)
    fast = lane("fast", right=5)
    spec = make_race([slow, fast], engine, k=6)
    started = time.perf_counter()
    assert run(spec, 40) == target_alone([5, 9, 13], 40)
    took = time.perf_counter() - started
    board = spec.drafter.board.snapshot()["drafters"]
    assert board["slow"]["cut"] == spec.drafter.board.rounds >= 4
    assert board["slow"]["wins"] == 0 and board["fast"]["wins"] > 0
    assert took < 0.4  # the race never waited for the slow drafter, not even once
    assert spec.drafter.drafters[0].health.failures == 0  # cut off is not a failure: no backoff


def test_a_drafter_that_is_down_backs_off_and_the_race_goes_on_with_the_others() -> None:
    engine = FakeEngine(decode_s=0.0)
    down = FakeDrafter("down", name="down")
    spec = make_race([down, lane("ok", right=4)], engine)
    assert run(spec, 40) == target_alone([5, 9, 13], 40)
    assert down.calls < 5 and spec.drafter.drafters[0].health.failures >= 1
    assert spec.drafter.board.snapshot()["drafters"]["ok"]["wins"] > 0


def test_candidates_keep_their_sources_through_head_tail_and_agreeing() -> None:
    board = Scoreboard(["a", "b"])
    c = Candidates.of([Proposal((1, 2, 3)), Proposal((1, 5))], ["a", "b"], board)
    assert isinstance(c.head(1), Candidates) and [p.tokens for p in c.head(1).candidates()] == [(1,), (1,)]
    tail = c.agreeing([1, 2])
    assert isinstance(tail, Candidates) and tail.sources == ("a",)
    assert c.agreeing([7]).tokens == ()
    c.settle(1, 2)
    assert (
        board.snapshot()["drafters"]["b"]["wins"] == 1 and board.snapshot()["drafters"]["a"]["offered"] == 1
    )


def test_the_grace_is_about_one_verify_round_within_bounds() -> None:
    costs = Costs(0.8, 0.01, 0.001, verify_fixed=0.05, verify_per_token=0.005, rtt=0.01, baseline_rate=10)
    assert grace_seconds(costs, 4) == pytest.approx(0.05 + 0.02 + 0.01)
    assert grace_seconds(None, 4) == MIN_GRACE
    slow = Costs(0.8, 0.01, 0.001, verify_fixed=5, verify_per_token=0, rtt=0, baseline_rate=1)
    assert grace_seconds(slow, 4) == MAX_GRACE


def test_race_needs_distinct_names() -> None:
    guard = GuardedDrafter(lane("same", right=1), n_vocab=lambda: N_VOCAB)
    with pytest.raises(ValueError, match="distinct names"):
        RaceDrafter([guard, guard])


def test_models_metadata_and_header_label_consensus_approximate_and_race_exact() -> None:
    """Through the real Starlette app (ASGI transport) with the fake engine behind it."""

    drafters = [DrafterConfig(kind="ngram", name="one"), DrafterConfig(kind="ngram", name="two", ngram_n=2)]

    async def ask(mode: str) -> tuple[dict, httpx.Response, dict]:  # type: ignore[type-arg]
        app = create_app(ProxyConfig("http://fake", drafters=drafters, mode=mode).check(), FakeEngine())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            models = (await client.get("/v1/models")).json()
            reply = await client.post("/v1/completions", json={"prompt": [5, 9, 13], "max_tokens": 20})
            stats = (await client.get("/tightwad/v1/stats")).json()
        return models, reply, stats

    models, reply, stats = asyncio.run(ask("consensus"))
    meta = models["data"][0]["meta"]["proxy"]
    assert (
        meta["exact"] is False and meta["approximate"] == "consensus" and meta["consensus_policy"] == "strict"
    )
    assert reply.status_code == 200 and reply.headers["x-tightwad-approximate"] == "consensus"
    assert stats["consensus"]["approximate"] is True and "race" in stats

    models, reply, stats = asyncio.run(ask("race"))
    meta = models["data"][0]["meta"]["proxy"]
    assert meta["exact"] is True and meta["drafters"] == ["one", "two"] and "approximate" not in meta
    assert "x-tightwad-approximate" not in reply.headers
    assert reply.json()["choices"][0]["text"] == "x" * 20
    assert set(stats["race"]["drafters"]) == {"one", "two"} and "consensus" not in stats
