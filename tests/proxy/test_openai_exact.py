"""logprobs, penalties, logit_bias and seeds through the proxy WITH speculation, against the engine
alone, with the official `openai` SDK as the client: a real engine (F32 SmolLM2, the batch-invariant
configuration), a real llama-server drafter (its Q4_1 build: a same-model pair) and the real proxy.

Golden: greedy with penalties or a bias gives the engine's tokens exactly; logprobs are the engine's,
token for token, to float noise (a position scored inside a verify block rather than alone, ~1e-5
in the logits here); a seeded sampled reply is the same text twice, and the engine's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI
from support.engines import EngineProcess
from support.procs import Processes
from support.proxies import TOKEN, ProxyProcess, start_drafter, start_proxy

from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

MODEL = ""  # set by the clients fixture
TOLERANCE = 1e-3  # logprob, engine alone vs through verify blocks
CHAT = [{"role": "user", "content": "Write a short story about a cat who likes boxes."}]
PROMPT = "<|im_start|>user\nList five colors, one per line.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def proxy(local_engine: EngineProcess, toolchain: Toolchain, module_processes: Processes) -> ProxyProcess:
    drafter = start_drafter(module_processes, toolchain)[0]
    return start_proxy(module_processes, local_engine.url, draft=drafter)


@pytest.fixture(scope="module")
def clients(local_engine: EngineProcess, proxy: ProxyProcess) -> Iterator[tuple[OpenAI, OpenAI]]:
    engine = OpenAI(base_url=f"{local_engine.url}/v1", api_key="unused", max_retries=0, timeout=120)
    front = OpenAI(base_url=f"{proxy.url}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    global MODEL
    MODEL = engine.models.list().data[0].id  # the served model's name (others are a 404)
    yield engine, front
    engine.close()
    front.close()


def _chat(client: OpenAI, **kw: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=CHAT, **kw).choices[0]  # type: ignore[arg-type]


STORY = (
    "<|im_start|>user\nWrite a short story about a cat who likes boxes.<|im_end|>\n<|im_start|>assistant\n"
)


def _tokens(client: OpenAI, prompt: str = PROMPT, **kw: Any) -> list[int]:
    """A completion's token ids (the `return_tokens` extension)."""
    reply = client.completions.create(model=MODEL, prompt=prompt, extra_body={"return_tokens": True}, **kw)
    return list(reply.choices[0].model_dump()["tokens"])


def _same_logprobs(expected: list[Any], got: list[Any]) -> None:
    assert [e.token for e in got] == [e.token for e in expected]
    for a, b in zip(expected, got, strict=True):
        assert b.bytes == a.bytes
        assert abs(a.logprob - b.logprob) < TOLERANCE, (a, b)
        assert [t.token for t in b.top_logprobs] == [t.token for t in a.top_logprobs]
        assert all(
            abs(x.logprob - y.logprob) < TOLERANCE
            for x, y in zip(a.top_logprobs, b.top_logprobs, strict=True)
        )


# logprobs ---------------------------------------------------------------------------------------
def test_chat_logprobs_through_the_proxy_are_the_engines(clients: tuple[OpenAI, OpenAI]) -> None:
    engine, front = clients
    kw = {"max_tokens": 40, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    expected, got = _chat(engine, **kw), _chat(front, **kw)
    assert got.message.content == expected.message.content
    content = expected.logprobs.content
    assert len(content) == 40 and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.logprob - TOLERANCE for e in content)  # greedy: the best
    _same_logprobs(content, got.logprobs.content)

    stream = front.chat.completions.create(model=MODEL, messages=CHAT, stream=True, **kw)  # type: ignore[arg-type, call-overload]
    streamed = [e for chunk in stream for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    _same_logprobs(content, streamed)


def test_legacy_completion_logprobs_through_the_proxy_are_the_engines(clients: tuple[OpenAI, OpenAI]) -> None:
    engine, front = clients
    kw = {"max_tokens": 30, "temperature": 0, "logprobs": 2}
    expected = engine.completions.create(model=MODEL, prompt=PROMPT, **kw).choices[0]
    got = front.completions.create(model=MODEL, prompt=PROMPT, **kw).choices[0]
    assert got.text == expected.text
    assert got.logprobs.tokens == expected.logprobs.tokens
    assert got.logprobs.text_offset == expected.logprobs.text_offset
    assert "".join(expected.logprobs.tokens) == expected.text  # every rendered token has its entry
    for a, b in zip(expected.logprobs.token_logprobs, got.logprobs.token_logprobs, strict=True):
        assert abs(a - b) < TOLERANCE
    for a, b in zip(expected.logprobs.top_logprobs, got.logprobs.top_logprobs, strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < TOLERANCE for k in a)


def test_echo_is_served(clients: tuple[OpenAI, OpenAI]) -> None:
    # with logprobs too: tests/engine/test_openai_surface.py, tests/proxy/test_openai_surface.py
    for client in clients:
        echoed = client.completions.create(
            model=MODEL, prompt="Hi there", max_tokens=3, echo=True, temperature=0
        )
        assert echoed.choices[0].text.startswith("Hi there")


# penalties and logit_bias -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "penalties",
    [
        {"frequency_penalty": 1.2},
        {"presence_penalty": 1.5},
        {"frequency_penalty": 0.6, "presence_penalty": -0.5},
    ],
)
def test_greedy_with_penalties_through_the_proxy_equals_the_engine(
    clients: tuple[OpenAI, OpenAI], penalties: dict[str, float]
) -> None:
    engine, front = clients
    plain = _tokens(engine, STORY, max_tokens=64, temperature=0)
    expected = _tokens(engine, STORY, max_tokens=64, temperature=0, **penalties)
    assert expected != plain  # the penalty changed the reply: the test can tell
    assert _tokens(front, STORY, max_tokens=64, temperature=0, **penalties) == expected


def test_logit_bias_forces_and_bans_through_both(clients: tuple[OpenAI, OpenAI]) -> None:
    engine, front = clients
    plain = _tokens(engine, max_tokens=12, temperature=0)
    forced_id = 1003
    for client in clients:
        assert (
            _tokens(client, max_tokens=6, temperature=0, logit_bias={str(forced_id): 100}) == [forced_id] * 6
        )
    banned = {str(t): -100 for t in set(plain)}
    expected = _tokens(engine, max_tokens=24, temperature=0, logit_bias=banned)
    assert not set(expected) & set(plain)
    assert _tokens(front, max_tokens=24, temperature=0, logit_bias=banned) == expected


# seeds ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [7, 2024, -1])
def test_a_seeded_sampled_reply_is_the_same_through_the_proxy_twice_and_the_engines(
    clients: tuple[OpenAI, OpenAI], seed: int
) -> None:
    engine, front = clients
    kw = {"max_tokens": 48, "temperature": 0.9, "top_p": 0.95, "seed": seed, "frequency_penalty": 0.3}
    first, second = _tokens(front, **kw), _tokens(front, **kw)
    assert first == second
    assert _tokens(engine, **kw) == first
    assert _tokens(engine, **{**kw, "seed": seed + 1}) != first  # the seed matters


def test_speculation_served_all_of_it(proxy: ProxyProcess) -> None:
    stats = proxy.stats()
    assert stats["rounds"] > 0 and stats["accepted_tokens"] > 0
    assert stats["generated_tokens"]["verify"] > stats["rounds"]
    assert stats["errors"] == {}
