"""The Engine in-process on a deliberately small KV cache: eviction, overload and context limits."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import numpy as np
import pytest

from tightwad import models
from tightwad.engine import core, libllama
from tightwad.engine.core import Engine, ErrorEvent, FinishEvent, GenerationEvent, TokenEvent
from tightwad.engine.errors import ContextLengthExceeded, EngineError, Overloaded
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


def test_a_job_that_fails_while_it_is_admitted_fails_alone_and_frees_its_sequence(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    engine.generate(list(range(900, 940)), GREEDY, 30, events.put)

    def broken(seed: object = None) -> np.random.Generator:
        raise ValueError("no random stream today")

    sampled = Sampling(temperature=0.8, seed=3)
    monkeypatch.setattr(core.np.random, "default_rng", broken)
    failing = engine.verify(VerifyRequest("iso-a", [1, 2, 3], [Draft((4,))], sampled, reset=True))
    with pytest.raises(EngineError, match="no random stream today"):
        failing.result(timeout=60)
    monkeypatch.undo()
    n, last = drain(events)
    assert isinstance(last, FinishEvent) and last.reason == "length" and n == 30
    # Its sequence was freed: as many conversations as there are sequences still get one each.
    for i in range(engine.parallel + 1):
        request = VerifyRequest(f"iso-b{i}", [1, 2, 3 + i], [Draft((4,))], sampled, reset=True)
        assert engine.verify(request).result(timeout=60).n_past == 3


def test_a_job_whose_sampling_fails_fails_alone(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    real = core.target_distribution

    def fragile(logits: np.ndarray, params: Sampling) -> np.ndarray:
        if params.top_k == 7:
            raise FloatingPointError("this request's rows are broken")
        return real(logits, params)

    monkeypatch.setattr(core, "target_distribution", fragile)
    healthy: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    broken: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    engine.generate(list(range(1000, 1030)), Sampling(temperature=0.8, seed=1), 30, healthy.put)
    engine.generate(list(range(1100, 1130)), Sampling(temperature=0.8, top_k=7), 30, broken.put)
    _, failed = drain(broken)
    n, finished = drain(healthy)
    assert isinstance(failed, ErrorEvent) and "rows are broken" in str(failed.error)
    assert isinstance(finished, FinishEvent) and finished.reason == "length" and n == 30
