"""Plain decoding on a named conversation (the `conversation` extension of /v1/completions, what the
proxy's target-alone decoding sends): it runs on that conversation's own KV sequence, so no other
conversation is evicted, and leaves the sequence holding what it evaluated, so the next verify with
`reset` evaluates only what is new. Without it a completion is anonymous and takes the least
recently used idle sequence: another conversation's."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import pytest
from support.engines import EngineProcess

from tightwad import models
from tightwad.engine import libllama
from tightwad.engine.core import Engine, FinishEvent, GenerationEvent, TokenEvent
from tightwad.engine.errors import BadRequest
from tightwad.toolchain import Toolchain
from tightwad.verify_api import Draft, Sampling, VerifyRequest

pytestmark = pytest.mark.integration
GREEDY = Sampling()
# Texts whose greedy continuations have wide margins (no near-tie for float noise to flip).
TEXT_A = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
TEXT_B = "a, b, c, d, e, f, g, h,"


@pytest.fixture
def engine(toolchain: Toolchain) -> Iterator[Engine]:
    """Two conversation sequences and room for both: nothing is evicted for space."""
    model = libllama.Model(models.resolve("smollm2-135m-q4_1"))
    # f32 KV, no flash attention: a position scores alike in a block and alone (README, Exactness).
    eng = Engine(model, n_ctx=1024, parallel=2, n_batch=64, flash_attn="off", kv_type="f32").start()
    yield eng
    eng.stop()
    model.close()


def prompts(engine: Engine) -> tuple[list[int], list[int]]:
    return engine.model.tokenize(TEXT_A), engine.model.tokenize(TEXT_B)


def decode(engine: Engine, prompt: list[int], n: int, conversation: str | None = None) -> list[int]:
    """Greedy plain decoding of n tokens; the generated ids."""
    events: queue.SimpleQueue[GenerationEvent] = queue.SimpleQueue()
    engine.generate(prompt, GREEDY, n, events.put, ignore_eos=True, conversation=conversation)
    tokens: list[int] = []
    while True:
        event = events.get(timeout=120)
        if isinstance(event, TokenEvent):
            tokens.append(event.token)
            continue
        assert isinstance(event, FinishEvent), event
        assert event.reason == "length" and event.completion_tokens == n
        return tokens


def hold(engine: Engine, conversation: str, prompt: list[int]) -> None:
    """Start a conversation the way the proxy does (a verify with `reset`), then leave it idle."""
    reply = engine.verify(VerifyRequest(conversation, prompt, [Draft((5, 6))], GREEDY, reset=True))
    assert reply.result(timeout=120).n_past >= len(prompt)


def test_plain_decoding_on_a_named_conversation_evicts_no_other(engine: Engine) -> None:
    prompt_a, prompt_b = prompts(engine)
    hold(engine, "a", prompt_a)
    hold(engine, "b", prompt_b)
    held_a = list(engine.sessions.find("a").tokens)  # type: ignore[union-attr]
    reply = decode(engine, prompt_b, 20, conversation="b")
    assert engine.stats.evictions == 0
    a = engine.sessions.find("a")
    assert a is not None and a.tokens == held_a  # "a" kept its KV: its next verify needs no reset
    assert engine.verify(VerifyRequest("a", [], [], GREEDY)).result(timeout=120).n_past == len(held_a) + 1
    # The same text as anonymous plain decoding of that prompt.
    assert decode(engine, prompt_b, 20) == reply


def test_a_verify_after_named_plain_decoding_evaluates_only_what_is_new(engine: Engine) -> None:
    prompt_a, prompt_b = prompts(engine)
    hold(engine, "a", prompt_a)
    hold(engine, "b", prompt_b)
    reply = decode(engine, prompt_b, 20, conversation="b")
    b = engine.sessions.find("b")
    # The sequence holds the prompt and every generated token but the last (not evaluated yet).
    assert b is not None and b.history == prompt_b + reply
    before = engine.stats.tokens_evaluated
    history = prompt_b + reply
    verdict = engine.verify(VerifyRequest("b", history, [Draft((7, 8, 9))], GREEDY, reset=True))
    assert verdict.result(timeout=120).n_past >= len(history)
    # The last generated token (the block's head) and the draft: nothing of what came before.
    assert engine.stats.tokens_evaluated - before == 1 + 3
    assert engine.stats.evictions == 0


def test_anonymous_plain_decoding_takes_an_idle_conversations_sequence(engine: Engine) -> None:
    """What the extension avoids: with every sequence held, an anonymous completion evicts one."""
    prompt_a, prompt_b = prompts(engine)
    hold(engine, "a", prompt_a)
    hold(engine, "b", prompt_b)
    decode(engine, prompt_b, 4)
    assert engine.stats.evictions == 1


def test_a_conversation_id_is_checked(engine: Engine) -> None:
    for bad in ("", "_anon:mine"):
        with pytest.raises(BadRequest) as refused:
            engine.generate([1, 2, 3], GREEDY, 4, lambda _: None, conversation=bad)
        assert refused.value.param == "conversation"


def test_the_http_extension_is_checked_by_name(local_engine: EngineProcess) -> None:
    base = {"prompt": "Once upon a time", "max_tokens": 2, "temperature": 0}
    for extra, words in (
        ({"conversation": 7}, "must be str"),
        ({"conversation": ""}, "non-empty"),
        ({"conversation": "_anon:x"}, "may not start with"),
        ({"conversation": "c", "n": 2}, "one prompt with n 1"),
    ):
        response = local_engine.post("/v1/completions", {**base, **extra})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "conversation", error
        assert words in error["message"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "conversation": "c"}
    response = local_engine.post("/v1/chat/completions", chat)
    assert response.status_code == 400 and "conversation" in response.json()["error"]["message"]
    named = local_engine.post("/v1/completions", {**base, "conversation": "http-c", "return_tokens": True})
    anonymous = local_engine.post("/v1/completions", {**base, "return_tokens": True})
    assert named.status_code == 200
    assert named.json()["choices"][0]["tokens"] == anonymous.json()["choices"][0]["tokens"]
