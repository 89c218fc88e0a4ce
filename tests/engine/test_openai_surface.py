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


# echo + logprobs: the prompt scored, as eval harnesses ask ------------------------------------
STORY = [{"role": "user", "content": "Write a short story about a cat who likes boxes."}]


def _legacy(logprobs: object) -> tuple[list[str], list[float | None], list[object], list[int]]:
    lp = logprobs  # the SDK's Logprobs: tokens, token_logprobs, top_logprobs, text_offset
    return list(lp.tokens), list(lp.token_logprobs), list(lp.top_logprobs), list(lp.text_offset)  # type: ignore[attr-defined]


def test_echo_with_logprobs_scores_the_prompt_then_the_reply(
    client: openai.OpenAI, served: str, local_engine: EngineProcess
) -> None:
    prompt = local_engine.post("/tokenize", {"messages": STORY}).json()["tokens"]
    text = local_engine.post("/detokenize", {"tokens": prompt}).json()["content"]
    chat = client.chat.completions.create(
        model=served, messages=STORY, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content is not None
    said = chat.choices[0].logprobs.content
    echoed = client.completions.create(
        model=served,
        prompt=prompt,
        echo=True,
        logprobs=2,
        max_tokens=8,
        temperature=0,
        extra_body={"return_tokens": True},
    ).choices[0]
    reply = echoed.model_extra["tokens"]  # type: ignore[index]
    assert echoed.text.startswith(text) and echoed.text[len(text) :] == chat.choices[0].message.content
    tokens, values, tops, offsets = _legacy(echoed.logprobs)
    assert len(tokens) == len(prompt) + len(said)
    assert "".join(tokens) == echoed.text
    assert values[0] is None and tops[0] is None  # nothing comes before the first token
    assert all(isinstance(v, float) and v <= 0 for v in values[1:])
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    # the reply's part: the chat's own logprobs, token for token (to float noise: this engine runs
    # stock kernels, and the two prompts were prefilled into different KV cells)
    assert tokens[len(prompt) :] == [e.token for e in said]
    for value, top, entry in zip(values[len(prompt) :], tops[len(prompt) :], said, strict=True):
        assert value == pytest.approx(entry.logprob, abs=1e-4)
        assert list(top) == [t.token for t in entry.top_logprobs]  # type: ignore[arg-type]
    # max_tokens 0: the text scored alone. Its tail is the reply, scored in prompt batches rather
    # than one token per decode: the same numbers (this engine's kernels are batch-invariant).
    scored = client.completions.create(
        model=served, prompt=prompt + reply, echo=True, logprobs=2, max_tokens=0
    )
    only = scored.choices[0]
    assert only.text == echoed.text and only.finish_reason == "length"
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    s_tokens, s_values, s_tops, s_offsets = _legacy(only.logprobs)
    assert (s_tokens, s_offsets) == (tokens, offsets) and s_values[0] is None
    for a, b in zip(s_values[1:], values[1:], strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    assert [list(t) for t in s_tops[1:]] == [list(t) for t in tops[1:]]  # type: ignore[arg-type]


def test_echo_with_logprobs_streams_the_prompt_first(client: openai.OpenAI, served: str) -> None:
    kw = {
        "model": served,
        "prompt": "The capital of France is",
        "echo": True,
        "logprobs": 1,
        "temperature": 0,
    }
    whole = client.completions.create(max_tokens=4, **kw).choices[0]  # type: ignore[call-overload]
    text, tokens, values = "", [], []
    for chunk in client.completions.create(max_tokens=4, stream=True, **kw):  # type: ignore[call-overload]
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                values += choice.logprobs.token_logprobs
    assert text == whole.text and text.startswith("The capital of France is")
    assert tokens == whole.logprobs.tokens and values == whole.logprobs.token_logprobs


def test_max_tokens_zero_needs_echo(client: openai.OpenAI, served: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=served, prompt="Hi there", max_tokens=0)
    assert caught.value.param == "max_tokens" and "echo" in caught.value.message
    alone = client.completions.create(model=served, prompt="Hi there", max_tokens=0, echo=True)
    assert alone.choices[0].text == "Hi there" and alone.choices[0].logprobs is None


def test_a_text_longer_than_a_batch_is_scored_in_several_decodes(
    client: openai.OpenAI, served: str, local_engine: EngineProcess
) -> None:
    """The engine here decodes 128 rows at a time: a 240-token reply, scored after its prompt,
    spans three decodes; each position's logprob is the one the reply was generated with."""
    prompt = local_engine.post("/tokenize", {"messages": STORY}).json()["tokens"]
    reply = client.completions.create(
        model=served,
        prompt=prompt,
        max_tokens=240,
        temperature=0,
        logprobs=1,
        extra_body={"return_tokens": True},  # not ignore_eos: it renormalizes without the end
    ).choices[0]
    tokens = reply.model_extra["tokens"]  # type: ignore[index]
    said = reply.logprobs.token_logprobs  # type: ignore[union-attr]
    assert len(tokens) == len(said) == 240 and len(prompt) + 240 > 2 * 128
    scored = client.completions.create(
        model=served, prompt=prompt + tokens, echo=True, logprobs=1, max_tokens=0
    ).choices[0]
    values = scored.logprobs.token_logprobs  # type: ignore[union-attr]
    assert len(values) == len(prompt) + 240 and values[0] is None
    assert values[len(prompt) :] == pytest.approx(said, abs=1e-4)
