"""The OpenAI surface through the proxy with speculation on (an n-gram drafter), with the official
`openai` SDK: aliases and model objects, unknown models, parameters refused by name before any
speculation, n > 1 and prompt lists (passed through to the engine), context exceeded."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from support.engines import INVARIANT_ENGINE, EngineProcess, start_engine
from support.procs import Processes
from support.proxies import TOKEN, ProxyProcess, start_proxy

from tightwad import models
from tightwad.openai import InvalidRequest
from tightwad.proxy.request_parsing import token_counts
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

NAMES = ("smol", "gpt-4o-mini", "my-org/app-model")
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def engine(toolchain: Toolchain, module_processes: Processes) -> EngineProcess:
    """An engine answering to three names: the first is the one replies carry."""
    aliases = [arg for name in NAMES for arg in ("--alias", name)]
    return start_engine(
        module_processes,
        models.resolve("smollm2-135m-f32"),
        parallel=4,
        ctx=1024,
        extra=[*INVARIANT_ENGINE, *aliases],
        name="alias-engine",
    )


@pytest.fixture(scope="module")
def proxy(engine: EngineProcess, module_processes: Processes) -> ProxyProcess:
    return start_proxy(module_processes, engine.url, "--draft-kind", "ngram")


@pytest.fixture(scope="module")
def client(proxy: ProxyProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=TOKEN, max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def direct(engine: EngineProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{engine.url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def test_models_and_aliases(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    for sdk in (client, direct):
        assert [m.id for m in sdk.models.list().data] == list(NAMES)
        for name in NAMES:
            assert sdk.models.retrieve(name).id == name
        with pytest.raises(openai.NotFoundError) as caught:
            sdk.models.retrieve("gpt-4o")
        assert caught.value.code == "model_not_found"


def test_an_alias_is_served_speculatively_and_exactly(
    client: openai.OpenAI, direct: openai.OpenAI, proxy: ProxyProcess
) -> None:
    before = proxy.stats()["requests"].get("speculate", 0)
    fast = client.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=12, temperature=0)
    plain = direct.chat.completions.create(model="smol", messages=HELLO, max_tokens=12, temperature=0)
    assert fast.choices[0].message.content == plain.choices[0].message.content
    assert fast.model == "smol"
    assert proxy.stats()["requests"]["speculate"] == before + 1  # the loop served it, not passthrough


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    for call in (
        lambda: client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2),
        lambda: client.completions.create(model="gpt-4o", prompt="Hi", max_tokens=2),
        lambda: client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2, n=2),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        error = caught.value
        assert (error.code, error.param, error.type) == ("model_not_found", "model", "invalid_request_error")


def test_n_and_prompt_lists_pass_through(client: openai.OpenAI, direct: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="smol", messages=HELLO, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content == reply.choices[1].message.content
    sampled = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "Write a short story about a cat."}],
        max_tokens=16,
        temperature=1.5,
        n=2,
        seed=5,
    )
    assert sampled.choices[0].message.content != sampled.choices[1].message.content
    prompts = ["The capital of France is", "One, two, three,"]
    several = client.completions.create(model="smol", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in several.choices] == [0, 1]
    alone = client.completions.create(model="smol", prompt=prompts[1], max_tokens=6, temperature=0)
    assert several.choices[1].text == alone.choices[0].text


def test_context_exceeded(client: openai.OpenAI) -> None:
    long = "hello " * 1500
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": long}], max_tokens=2
        )
    error = caught.value
    assert (error.type, error.code, error.param) == (
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="smol", prompt=long, max_tokens=2)
    assert (caught.value.type, caught.value.code, caught.value.param) == (
        "invalid_request_error",
        "context_length_exceeded",
        "prompt",
    )


def test_refused_parameters_are_named(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="smol", messages=HELLO, max_tokens=2, response_format={"type": "bogus"}
        )  # type: ignore[typeddict-item]
    assert caught.value.param == "response_format"
    tool = {"type": "function", "function": {"name": "get_weather"}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smol", messages=HELLO, max_tokens=2, tools=[tool])  # type: ignore[list-item]
    assert caught.value.param == "tools" and "chat template has no tool support" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="smol", prompt="Hi", max_tokens=2, extra_body={"min_p": 0.1})
    assert caught.value.param == "min_p" and caught.value.code == "unknown_parameter"
    ok = client.chat.completions.create(
        model="smol", messages=HELLO, max_tokens=2, tool_choice="none", response_format={"type": "text"}
    )
    assert ok.choices[0].message.content is not None


def test_echo_with_logprobs_is_the_engines_scoring(
    client: openai.OpenAI, direct: openai.OpenAI, proxy: ProxyProcess
) -> None:
    """Passed through to the engine (the prompt is scored there, nothing to speculate), max_tokens 0
    included: the reply is the engine's own, the prompt's tokens first."""
    prompt = "The capital of France is"
    before = proxy.stats()["requests"].get("passthrough", 0)
    for max_tokens in (0, 6):
        kw = {"model": "smol", "prompt": prompt, "echo": True, "logprobs": 2, "temperature": 0}
        got = client.completions.create(max_tokens=max_tokens, **kw).choices[0]  # type: ignore[call-overload]
        alone = direct.completions.create(max_tokens=max_tokens, **kw).choices[0]  # type: ignore[call-overload]
        assert got.text == alone.text and got.text.startswith(prompt)
        assert got.logprobs.tokens == alone.logprobs.tokens and "".join(got.logprobs.tokens) == got.text
        assert got.logprobs.token_logprobs[0] is None and got.logprobs.top_logprobs[0] is None
        assert got.logprobs.token_logprobs[1:] == pytest.approx(alone.logprobs.token_logprobs[1:], abs=1e-4)
        assert got.logprobs.text_offset == alone.logprobs.text_offset
        assert (max_tokens == 0) == (got.text == prompt)
    assert proxy.stats()["requests"]["passthrough"] == before + 2


def test_max_tokens_zero_is_counted_only_with_echo() -> None:
    """Under limits.maxTokens the proxy checks the counts of what it passes through too."""
    assert token_counts({"prompt": "Hi", "echo": True, "max_tokens": 0}, 64) == {"max_tokens": 0}
    with pytest.raises(InvalidRequest) as caught:
        token_counts({"prompt": "Hi", "max_tokens": 0}, 64)
    assert caught.value.param == "max_tokens" and "echo" in str(caught.value)
