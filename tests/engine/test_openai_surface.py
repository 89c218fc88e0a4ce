"""The engine's OpenAI surface through the official `openai` SDK, the client real apps use: model
objects, unknown models, prompt lists, n > 1, and every parameter honoured or refused by name."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from support.engines import EngineProcess

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def client(local_engine: EngineProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{local_engine.url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def served(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_the_served_model_has_a_model_object(client: openai.OpenAI, served: str) -> None:
    model = client.models.retrieve(served)
    assert model.id == served and model.object == "model" and model.owned_by == "tightwad"


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    error = caught.value
    assert (error.code, error.param, error.type) == ("model_not_found", "model", "invalid_request_error")


def test_a_list_of_prompts_gives_one_choice_each(client: openai.OpenAI, served: str) -> None:
    prompts = ["The capital of France is", "One, two, three,"]
    reply = client.completions.create(model=served, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    for prompt, choice in zip(prompts, reply.choices, strict=True):
        alone = client.completions.create(model=served, prompt=prompt, max_tokens=6, temperature=0)
        assert choice.text == alone.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens == 12


def test_token_id_prompts(client: openai.OpenAI, served: str) -> None:
    one = client.completions.create(model=served, prompt=[1, 504, 3458], max_tokens=4, temperature=0)
    several = client.completions.create(
        model=served, prompt=[[1, 504, 3458], [1, 2000]], max_tokens=4, temperature=0
    )
    assert len(several.choices) == 2 and several.choices[0].text == one.choices[0].text


def test_n_greedy_choices_are_identical(client: openai.OpenAI, served: str) -> None:
    reply = client.chat.completions.create(model=served, messages=HELLO, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content == reply.choices[1].message.content
    assert reply.usage is not None and reply.usage.prompt_tokens < reply.usage.completion_tokens * 2 + 40


def test_n_sampled_choices_differ(client: openai.OpenAI, served: str) -> None:
    story = [{"role": "user", "content": "Write a short story about a cat."}]
    reply = client.chat.completions.create(
        model=served, messages=story, max_tokens=16, temperature=1.5, n=3, seed=11
    )
    texts = [c.message.content for c in reply.choices]
    assert len(set(texts)) == 3, texts


def test_n_streams_with_an_index_per_chunk(client: openai.OpenAI, served: str) -> None:
    stream = client.completions.create(
        model=served,
        prompt=["Once upon a time", "The weather today"],
        max_tokens=5,
        temperature=0,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {}
    finished: set[int] = set()
    usage = None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished.add(choice.index)
        usage = chunk.usage or usage
    assert finished == {0, 1, 2, 3} and texts[0] == texts[1] and texts[2] == texts[3]
    assert usage is not None and usage.completion_tokens == 20


def test_context_exceeded(client: openai.OpenAI, served: str) -> None:
    long = "hello " * 5000
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=served, messages=[{"role": "user", "content": long}], max_tokens=2
        )
    error = caught.value
    assert (error.type, error.code, error.param) == (
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=served, prompt=long, max_tokens=2)
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "prompt")


def test_an_unknown_response_format_is_refused_not_ignored(client: openai.OpenAI, served: str) -> None:
    # json_object and json_schema are served by a grammar: tests/engine/test_grammar.py
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=served, messages=HELLO, max_tokens=2, response_format={"type": "bogus"}
        )
    assert caught.value.param == "response_format"
    text = client.chat.completions.create(
        model=served, messages=HELLO, max_tokens=2, response_format={"type": "text"}
    )
    assert text.choices[0].message.content is not None


def test_tools_are_refused_by_name(client: openai.OpenAI, served: str) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=served, messages=HELLO, max_tokens=2, tools=[tool])  # type: ignore[list-item]
    # SmolLM2's template takes no tools (tests/proxy/test_openai_tools.py has a model that does)
    assert caught.value.param == "tools" and "chat template has no tool support" in caught.value.message


def test_an_unknown_parameter_is_refused_by_name(client: openai.OpenAI, served: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=served, messages=HELLO, max_tokens=2, extra_body={"mirostat": 2})
    assert caught.value.param == "mirostat" and caught.value.code == "unknown_parameter"


def test_harmless_parameters_are_accepted(client: openai.OpenAI, served: str) -> None:
    reply = client.chat.completions.create(
        model=served,
        messages=HELLO,
        max_tokens=2,
        temperature=0,
        user="u-1",
        store=False,
        metadata={"a": "b"},
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
