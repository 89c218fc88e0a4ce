"""The Engine in-process on a deliberately small KV cache: eviction, overload and context limits."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import pytest

from tightwad import models
from tightwad.engine import libllama
from tightwad.engine.core import Engine, ErrorEvent, FinishEvent, GenerationEvent, TokenEvent
from tightwad.engine.errors import ContextLengthExceeded, Overloaded
from tightwad.toolchain import Toolchain
from tightwad.verify_api import ConversationEvicted, Draft, Sampling, VerifyRequest

pytestmark = pytest.mark.integration
GREEDY = Sampling()


@pytest.fixture(scope="module")
def engine(toolchain: Toolchain) -> Iterator[Engine]:
    model = libllama.Model(models.resolve("smollm2-135m-q4_1"))
    eng = Engine(model, n_ctx=256, parallel=2, n_batch=64).start()
    yield eng
    eng.stop()
    model.close()


def drain(events: queue.SimpleQueue[GenerationEvent]) -> tuple[int, GenerationEvent]:
    n = 0
    while True:
        event = events.get(timeout=120)
        if isinstance(event, TokenEvent):
            n += 1
        else:
            return n, event


def test_a_conversation_that_needs_the_room_evicts_the_idle_one(engine: Engine) -> None:
    first = VerifyRequest("a", list(range(100, 250)), [Draft((5, 6))], GREEDY, reset=True)
    assert engine.verify(first).result(timeout=120).n_past == 150
    second = engine.verify(VerifyRequest("b", list(range(300, 450)), [Draft((5, 6))], GREEDY, reset=True))
    assert second.result(timeout=120).n_past == 150 and engine.sessions.held_tokens() <= engine.n_ctx
    with pytest.raises(ConversationEvicted, match="reset: true"):
        engine.verify(VerifyRequest("a", [1], [], GREEDY)).result(timeout=120)


def test_two_requests_that_cannot_both_fit_fail_one_with_overloaded(engine: Engine) -> None:
    streams: list[queue.SimpleQueue[GenerationEvent]] = [queue.SimpleQueue(), queue.SimpleQueue()]
    for events, start in zip(streams, (500, 700), strict=True):
        engine.generate(list(range(start, start + 140)), GREEDY, 60, events.put)
    outcomes = [drain(events)[1] for events in streams]
    assert sorted(type(o).__name__ for o in outcomes) == ["ErrorEvent", "FinishEvent"]
    error = next(o for o in outcomes if isinstance(o, ErrorEvent)).error
    finish = next(o for o in outcomes if isinstance(o, FinishEvent))
    assert isinstance(error, Overloaded) and "raise --ctx" in str(error)
    assert finish.reason == "length" and finish.completion_tokens == 60


def test_a_conversation_longer_than_the_context_is_refused(engine: Engine) -> None:
    with pytest.raises(ContextLengthExceeded):
        engine.verify(VerifyRequest("c", list(range(1000, 1300)), [], GREEDY, reset=True)).result(timeout=120)
    with pytest.raises(ContextLengthExceeded):
        engine.generate(list(range(300)), GREEDY, 4, lambda _: None)
