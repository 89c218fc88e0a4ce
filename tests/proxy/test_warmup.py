"""Cold start: the proxy measures its engine and drafter before the first request (Speculator.warm_up),
so the first reply, even a short one, is speculated on measured costs, with no fallback.

Against the in-process fake engine and drafter (tests/support/proxy_fakes.py): a verify there costs
`decode_s * (1 + draft_cost * k)` and a draft `per_token_s * k`, so the warm-up must find a verify
cost that grows with the block and a draft cost per token, and the target alone's rate."""

from __future__ import annotations

import asyncio

import httpx
from support.proxy_fakes import N_VOCAB, PROMPT, FakeDrafter, FakeEngine, make_speculator, run, target_alone

from tightwad.proxy.app import create_app
from tightwad.proxy.config import DrafterConfig, ProxyConfig
from tightwad.proxy.detok import Vocabulary
from tightwad.proxy.speculate import Job
from tightwad.verify_api import Sampling

VOCABULARY = Vocabulary([b"x"] * N_VOCAB)


class ReachableEngine(FakeEngine):
    """The fake engine, answering the round-trip probe too (the plain fake has no network)."""

    async def ping(self) -> float:
        await asyncio.sleep(0.001)
        return 0.001


def test_warm_up_measures_every_cost_before_the_first_request() -> None:
    engine = ReachableEngine(decode_s=0.01, draft_cost=0.5)
    spec = make_speculator(engine, FakeDrafter(per_token_s=0.002))
    controller = spec.controller
    assert not (controller.draft.measured or controller.verify.measured or controller.engine_rate.measured)

    asyncio.run(spec.warm_up(VOCABULARY, chat=True))

    assert controller.warmup_s is not None
    assert controller.draft.measured and controller.verify.measured and controller.engine_rate.measured
    costs = controller.costs()
    # Blocks of 0..12 positions were timed: the fit sees the slope (0.5 decode per position), not
    # the prior shape (0.09); drafts of 2 and 8 tokens show a cost per draft token.
    assert costs.verify_per_token > 0.2 * costs.verify_fixed
    assert costs.draft_per_token > 0
    assert costs.baseline_rate > 0
    # The fake drafter drafts the target's tokens: its first verified guess was all accepted.
    assert controller.acceptance.alpha > 0.6
    # Nothing of it is a user's: no rounds, no fallbacks, no tokens in the stats.
    assert controller.rounds == 0 and spec.telemetry.rounds == 0
    assert not spec.telemetry.fallbacks and not spec.telemetry.generated


def test_after_the_warm_up_a_short_first_reply_is_speculated_without_fallbacks() -> None:
    engine = ReachableEngine(decode_s=0.01, draft_cost=0.05)
    spec = make_speculator(engine, FakeDrafter(per_token_s=0.0005))
    asyncio.run(spec.warm_up(VOCABULARY, chat=True))
    assert run(spec, 16) == target_alone(PROMPT, 16)
    assert not spec.telemetry.fallbacks, spec.telemetry.fallbacks
    assert spec.telemetry.rounds > 0
    assert spec.telemetry.generated["verify"] > spec.telemetry.rounds  # more than one token a round


def test_a_warm_up_that_cannot_reach_the_engine_keeps_the_priors() -> None:
    spec = make_speculator(FakeEngine(), FakeDrafter())  # the plain fake: its probe finds no engine
    asyncio.run(spec.warm_up(VOCABULARY, chat=True))
    assert spec.controller.warmup_s is None and not spec.controller.verify.measured
    assert run(spec, 12) == target_alone(PROMPT, 12)


def test_the_app_warms_up_when_it_learns_the_engine_before_serving_anyone() -> None:
    engine = ReachableEngine()
    config = ProxyConfig("http://fake", drafters=[DrafterConfig(kind="ngram", name="lookup")]).check()
    app = create_app(config, engine)

    async def ask() -> tuple[int, dict]:  # type: ignore[type-arg]
        await app.state.proxy.learn_engine()  # what /ready and every request wait for
        calls = engine.verify_calls
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return calls, (await client.get("/tightwad/v1/stats")).json()

    calls, stats = asyncio.run(ask())
    assert calls >= 5  # the drafter's guess and four blocks, before anyone was served
    assert stats["policy"]["warmup_s"] is not None
    assert stats["rounds"] == 0 and stats["fallbacks"] == {} and stats["requests"] == {}


def test_the_target_alone_fallback_stops_where_the_context_is_full() -> None:
    # A drafter that is down: the first round verifies no draft (1 token), then the drafter backs off
    # and the target decodes alone in chunks of 4. With room for 6 tokens the second chunk must
    # stop after 1, where the context is full (the engine would end the reply there).
    spec = make_speculator(FakeEngine(), FakeDrafter("down"), pipeline=False)

    async def go() -> list[int]:
        short = Job(list(PROMPT), Sampling(), 100, n_ctx=len(PROMPT) + 7, vocabulary=VOCABULARY)
        return [t async for step in spec.run(short) for t in step.tokens]

    assert asyncio.run(go()) == target_alone(PROMPT, 6)
