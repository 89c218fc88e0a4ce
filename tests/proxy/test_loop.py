"""The speculation loop against an in-process fake engine with a deterministic "target": whatever
the drafter does (right, wrong, garbage, down, slow, pipelined or not), the reply is the target's."""

from __future__ import annotations

import asyncio

import pytest
from support.proxy_fakes import (
    EOG,
    N_VOCAB,
    PROMPT,
    FakeDrafter,
    FakeEngine,
    job,
    make_speculator,
    run,
    target_alone,
)

from tightwad.proxy.detok import Vocabulary
from tightwad.proxy.kpolicy.controller import KPolicy
from tightwad.proxy.replies import TextReply
from tightwad.proxy.speculate import Job
from tightwad.verify_api import Sampling


def loop_drafter(behaviour: str = "good") -> FakeDrafter:
    """A drafter that takes a little time per token, so the loop measures a draft cost."""
    return FakeDrafter(behaviour, per_token_s=0.0005)


@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("behaviour", ["good", "half", "garbage"])
def test_reply_is_the_targets_whatever_the_drafter_does(behaviour: str, pipeline: bool) -> None:
    engine = FakeEngine()
    spec = make_speculator(engine, loop_drafter(behaviour), pipeline)
    assert run(spec, 40) == target_alone(PROMPT, 40)


def test_a_good_drafter_needs_few_rounds_and_pipelining_saves_draft_calls() -> None:
    engine = FakeEngine()
    spec = make_speculator(engine, loop_drafter("good"), pipeline=True)
    assert run(spec, 60) == target_alone(PROMPT, 60)
    assert engine.verify_calls < 60 / 3
    assert spec.telemetry.accepted > 0.9 * spec.telemetry.drafted


def test_target_end_of_generation_ends_the_reply() -> None:
    engine = FakeEngine(eog_at=len(PROMPT) + 11)
    spec = make_speculator(engine, loop_drafter("good"))
    out = run(spec, 50)
    assert out == target_alone(PROMPT, 50, eog_at=len(PROMPT) + 11) and out[-1] == EOG and len(out) == 12


def test_a_drafter_that_is_down_falls_back_to_the_target_alone() -> None:
    engine = FakeEngine()
    drafter = loop_drafter("down")
    spec = make_speculator(engine, drafter)
    assert run(spec, 30) == target_alone(PROMPT, 30)
    assert engine.generated > 0  # while it backs off, the engine decodes on its own
    assert spec.drafter.health.failures >= 1 and drafter.calls < 5
    assert spec.telemetry.fallbacks["drafter_backoff"] > 0


def test_a_slow_drafter_misses_its_deadline_and_the_reply_goes_on() -> None:
    engine = FakeEngine()
    spec = make_speculator(engine, loop_drafter("slow"), pipeline=False)
    assert run(spec, 12) == target_alone(PROMPT, 12)
    assert spec.drafter.health.timeouts >= 1


def test_a_drafter_that_dies_mid_reply() -> None:
    engine = FakeEngine()
    drafter = loop_drafter("good")
    spec = make_speculator(engine, drafter)

    async def go() -> list[int]:
        out: list[int] = []
        async for step in spec.run(job(40)):
            out += step.tokens
            if len(out) > 10:
                drafter.behaviour = "down"
        return out

    assert asyncio.run(go()) == target_alone(PROMPT, 40)


def test_speculation_turns_itself_off_for_a_useless_drafter() -> None:
    engine = FakeEngine(decode_s=0.002)
    policy = KPolicy(probe_after=16, warmup_rounds=3)
    spec = make_speculator(engine, loop_drafter("garbage"), pipeline=False, policy=policy)
    spec.controller.record_engine(20, 19, 19 * 0.002)  # the target alone is fast
    assert run(spec, 60) == target_alone(PROMPT, 60)
    assert engine.generated >= 16 and spec.telemetry.fallbacks["speculation_off"] >= 1


def test_an_evicted_conversation_is_resent_whole() -> None:
    engine = FakeEngine(evict_every=3)
    spec = make_speculator(engine, loop_drafter("half"))
    assert run(spec, 30) == target_alone(PROMPT, 30)
    assert engine.resets > 1


def test_max_tokens_and_a_full_context_end_the_reply() -> None:
    spec = make_speculator(FakeEngine(), loop_drafter("good"))
    assert run(spec, 7) == target_alone(PROMPT, 7)
    short = job(100, n_ctx=len(PROMPT) + 9)

    async def go() -> list[int]:
        return [t async for step in spec.run(short) for t in step.tokens]

    assert asyncio.run(go()) == target_alone(PROMPT, 8)


def test_the_reply_text_stops_at_a_stop_sequence_across_rounds_and_counts_tokens_to_it() -> None:
    pieces = [f"<{i}>".encode() for i in range(N_VOCAB)]
    vocab = Vocabulary(pieces)
    expected = target_alone(PROMPT, 30)
    text = "".join(f"<{t}>" for t in expected)
    cut_token = 17
    stop = f"{expected[cut_token - 1]}><{expected[cut_token]}"  # spans two tokens
    # The stop's first occurrence decides where the text ends.
    end = text.find(stop)
    spec = make_speculator(FakeEngine(), loop_drafter("good"))
    job = Job(PROMPT, Sampling(), 30, 4096, vocab)
    reply = TextReply(spec.run(job), vocab, [stop], set())

    async def go() -> str:
        return "".join([d.text async for d in reply.deltas()])

    assert asyncio.run(go()) == text[:end]
    assert reply.finish_reason == "stop"
    assert reply.completion_tokens == text[: end + len(stop)].count("<")  # up to the completing token
