"""Tool calling with the official `openai` SDK against real engines and the real proxy.

SmolLM2's chat template does not take `tools`: the engine and the proxy answer the same clear 400.
Qwen2.5-Coder 0.5B Instruct (opt-in in the catalog: `tightwad models fetch
qwen2.5-coder-0.5b-q4_k_m`) really calls tools: auto, required, named, streamed, and a `role: tool`
reply sent back; its tests are skipped, saying so, when the model is not fetched.

The proxy speculates tool requests: the engine renders the prompt with the tools, a required or
named call's grammar goes into every verify call, and the calls are parsed out of the reply as the
engine does. Golden: the same request (auto, required, named; streamed and not) gives the same reply
through the speculating proxy as from the engine alone, on SmolLM2 with a hand-written Hermes-style
template in every run, and on the Qwen2.5-Coder 0.5B/1.5B pair when fetched.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from support.engines import EngineProcess, start_engine
from support.procs import Processes
from support.proxies import TOKEN, ProxyProcess, start_drafter, start_proxy

from tightwad import models
from tightwad.proxy.detok import Vocabulary
from tightwad.proxy.drafters.base import DraftRequest
from tightwad.proxy.drafters.llama_server import grammar_fields
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city's name"}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def test_a_template_without_tools_is_a_clear_400(
    local_engine: EngineProcess, module_processes: Processes
) -> None:
    proxy = start_proxy(module_processes, local_engine.url, "--draft-kind", "ngram")
    for url, key in ((f"{local_engine.url}/v1", "unused"), (f"{proxy.url}/v1", TOKEN)):
        with OpenAI(base_url=url, api_key=key, max_retries=0) as client:
            model = client.models.list().data[0].id
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], max_tokens=4)  # type: ignore[arg-type, list-item]
            assert caught.value.param == "tools"
            assert "chat template has no tool support" in caught.value.message
            # tool_choice "none" without tools, or an empty list, asks for nothing
            ok = client.chat.completions.create(model=model, messages=ASK, tools=[], max_tokens=2)  # type: ignore[arg-type]
            assert ok.choices[0].message.content is not None


# Qwen2.5-Coder 0.5B: a model that really calls tools ---------------------------------------------
QWEN = "qwen2.5-coder-0.5b-q4_k_m"


def _qwen_path() -> Path:
    try:
        path = models.resolve(QWEN)
    except Exception as exc:  # not in this catalog, or not fetched
        pytest.skip(f"{QWEN} is not available ({exc}); `tightwad models fetch {QWEN}` to run this test")
    if not path.is_file():
        pytest.skip(f"{QWEN} is not fetched: `tightwad models fetch {QWEN}` to run this test")
    return path


@pytest.fixture(scope="module")
def qwen(toolchain: Toolchain, module_processes: Processes) -> Iterator[tuple[OpenAI, OpenAI, str]]:
    path = _qwen_path()
    engine = start_engine(module_processes, path, parallel=2, ctx=4096, name="qwen-engine")
    proxy: ProxyProcess = start_proxy(module_processes, engine.url, "--draft-kind", "ngram")
    direct = OpenAI(base_url=f"{engine.url}/v1", api_key="unused", max_retries=0, timeout=300)
    front = OpenAI(base_url=f"{proxy.url}/v1", api_key=TOKEN, max_retries=0, timeout=300)
    yield direct, front, direct.models.list().data[0].id
    direct.close()
    front.close()


def _call(client: OpenAI, model: str, **kw: Any) -> Any:
    kw = {"temperature": 0, "max_tokens": 120, **kw}
    return client.chat.completions.create(model=model, **kw).choices[0]


def test_auto_tool_call_and_the_tool_reply_sent_back(qwen: tuple[OpenAI, OpenAI, str]) -> None:
    direct, front, model = qwen
    choice = _call(front, model, messages=ASK, tools=[WEATHER, TIME])
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert "paris" in json.loads(call.function.arguments)["city"].lower()
    assert (
        _call(direct, model, messages=ASK, tools=[WEATHER, TIME]).message.tool_calls[0].function
        == call.function
    )
    # The call and the tool's answer go back; the model answers in words.
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "sunny"}'},
    ]
    answer = _call(front, model, messages=messages, tools=[WEATHER, TIME])
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert "18" in (answer.message.content or ""), answer.message.content


def test_required_and_named_calls_are_enforced(qwen: tuple[OpenAI, OpenAI, str]) -> None:
    _, front, model = qwen
    chat = [{"role": "user", "content": "Say hello to me."}]  # a model left alone would just answer
    required = _call(front, model, messages=chat, tools=[WEATHER, TIME], tool_choice="required")
    assert required.finish_reason == "tool_calls"
    assert required.message.tool_calls[0].function.name in ("get_weather", "get_time")
    named = _call(
        front,
        model,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    assert [c.function.name for c in named.message.tool_calls] == ["get_time"]
    json.loads(named.message.tool_calls[0].function.arguments)
    none = _call(front, model, messages=ASK, tools=[WEATHER], tool_choice="none")
    assert none.finish_reason in ("stop", "length") and not none.message.tool_calls


def test_a_streamed_tool_call_assembles_in_the_sdk(qwen: tuple[OpenAI, OpenAI, str]) -> None:
    _, front, model = qwen
    kw = {"messages": ASK, "tools": [WEATHER], "temperature": 0, "max_tokens": 120}
    with front.beta.chat.completions.stream(model=model, **kw) as stream:  # type: ignore[arg-type]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].function.name == "get_weather"
    unstreamed = _call(front, model, messages=ASK, tools=[WEATHER])
    assert (
        choice.message.tool_calls[0].function.arguments == unstreamed.message.tool_calls[0].function.arguments
    )


# SmolLM2 with a hand-written Hermes/Qwen-style template: the round trip in every run ------------
# SmolLM2's own template takes no tools, and a 135M model would rarely call one by itself; with a
# Hermes-style template written here and `tool_choice` required or named (a grammar), it must. This
# is an honest end-to-end test of rendering, the grammar, parsing, streaming and the tool reply,
# not of the model's judgement (the Qwen tests above are).
HERMES = """{%- if tools %}<|im_start|>system
You can call these functions:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}To call one, reply with <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.tool_calls %}<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@contextlib.contextmanager
def _hermes_engine(parallel: int) -> Iterator[str]:
    """A real engine (SmolLM2 Q4_1, the Hermes template above) served over HTTP from this process;
    its URL."""
    from tightwad.engine import libllama
    from tightwad.engine.api import create_app
    from tightwad.engine.chat import ChatFormatter
    from tightwad.engine.core import Engine
    from tightwad.http import Server

    model = libllama.Model(models.resolve("smollm2-135m-q4_1"))
    # Exact kernels (read once, when the context makes its CPU backend): the golden test below
    # compares speculated replies with this engine's, and stock kernels can flip a near-tie.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GGML_CPU_EXACT", "1")
        engine = Engine(model, n_ctx=2048, parallel=parallel, n_batch=128).start()
    app = create_app(engine, "smol-hermes", formatter=ChatFormatter(model, template=HERMES))
    server = Server(app, "127.0.0.1", 0)
    server.start_thread()
    try:
        yield server.url
    finally:
        server.stop_thread()
        engine.stop()


@pytest.fixture(scope="module")
def hermes_smol(toolchain: Toolchain, module_processes: Processes) -> Iterator[tuple[str, ProxyProcess]]:
    """The Hermes-template engine (two conversations at once), and a real proxy process in front."""
    with _hermes_engine(parallel=2) as url:
        yield url, start_proxy(module_processes, url, "--draft-kind", "ngram")


def test_required_call_with_a_hermes_template(hermes_smol: tuple[str, ProxyProcess]) -> None:
    url, _ = hermes_smol
    with OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        choice = _call(client, "smol-hermes", messages=ASK, tools=[WEATHER, TIME], tool_choice="required")
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert call.id.startswith("call_") and call.function.name in ("get_weather", "get_time")
        assert isinstance(json.loads(call.function.arguments), dict)
        one = _call(
            client,
            "smol-hermes",
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=False,
        )
        assert len(one.message.tool_calls) == 1
        named = _call(
            client,
            "smol-hermes",
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        names = [c.function.name for c in named.message.tool_calls]
        assert names and set(names) == {"get_weather"}  # parallel calls allowed: all of the named one
        assert "city" in json.loads(named.message.tool_calls[0].function.arguments)  # its required key


def test_a_streamed_call_and_the_tool_reply_through_the_proxy(hermes_smol: tuple[str, ProxyProcess]) -> None:
    url, proxy = hermes_smol
    named = {"type": "function", "function": {"name": "get_weather"}}
    # A short city (a 135M model may loop inside a string) and one call: the reply ends in time.
    short = json.loads(json.dumps(WEATHER))
    short["function"]["parameters"]["properties"]["city"]["maxLength"] = 20
    with OpenAI(base_url=f"{proxy.url}/v1", api_key=TOKEN, max_retries=0, timeout=120) as front:
        kw = {
            "messages": ASK,
            "tools": [short],
            "tool_choice": named,
            "parallel_tool_calls": False,
            "temperature": 0,
            "max_tokens": 80,
        }
        with front.beta.chat.completions.stream(model="smol-hermes", **kw) as stream:  # type: ignore[arg-type]
            final = stream.get_final_completion()
        choice = final.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        plain = _call(front, "smol-hermes", **kw)
        same = plain.message.tool_calls[0].function
        assert (call.function.name, call.function.arguments) == (same.name, same.arguments)  # as unstreamed
        messages = [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18}'},
        ]
        answer = _call(front, "smol-hermes", messages=messages, tools=[short], max_tokens=8)
        assert answer.finish_reason in ("stop", "length", "tool_calls")
    # The call and the tool's answer were rendered back into the prompt the model read.
    import httpx

    tokens = httpx.post(f"{url}/tokenize", json={"messages": messages}, timeout=60).json()["tokens"]
    text = httpx.post(f"{url}/detokenize", json={"tokens": tokens, "special": True}, timeout=60).json()[
        "content"
    ]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {' in text
    assert '<tool_response>\n{"temperature_c": 18}\n</tool_response>' in text


# Golden: speculated tool requests are the engine's own replies --------------------------------
CHOICES: list[Any] = ["auto", "required", {"type": "function", "function": {"name": "get_weather"}}]


def _reply(client: OpenAI, model: str, stream: bool, **kw: Any) -> tuple[Any, ...]:
    """What a user reads of a reply: content, calls (name, arguments), finish reason."""
    kw = {"temperature": 0, "max_tokens": 80, **kw}
    if stream:  # assembled as the SDKs do (their stream helper refuses a reply cut by max_tokens)
        content, calls, finish = "", {}, None
        for chunk in client.chat.completions.create(model=model, stream=True, **kw):
            if not chunk.choices:
                continue
            delta, finish = chunk.choices[0].delta, chunk.choices[0].finish_reason or finish
            content += delta.content or ""
            for call in delta.tool_calls or []:
                name, args = calls.get(call.index, ("", ""))
                function = call.function
                calls[call.index] = (name + (function.name or ""), args + (function.arguments or ""))
        return content or None, [calls[i] for i in sorted(calls)], finish
    else:
        choice = client.chat.completions.create(model=model, **kw).choices[0]
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    return choice.message.content or None, calls, choice.finish_reason


def _same_through_the_proxy(direct: OpenAI, front: OpenAI, proxy: ProxyProcess, model: str) -> None:
    short = json.loads(json.dumps(WEATHER))
    short["function"]["parameters"]["properties"]["city"]["maxLength"] = 20  # a small model may loop
    called, replies = 0, []
    for choice in CHOICES:
        for stream in (False, True):
            kw = {
                "messages": ASK,
                "tools": [short, TIME],
                "tool_choice": choice,
                "parallel_tool_calls": False,
            }
            before = proxy.stats()["requests"].get("speculate", 0)
            got = _reply(front, model, stream, **kw)
            assert got == _reply(direct, model, stream, **kw), (choice, stream)
            assert proxy.stats()["requests"]["speculate"] == before + 1  # the loop served it
            called += got[2] == "tool_calls"
            replies.append(got)
    assert called >= 4, replies  # required and named must call, streamed or not


@pytest.fixture
def hermes_golden(toolchain: Toolchain, module_processes: Processes) -> Iterator[tuple[str, ProxyProcess]]:
    """A fresh Hermes-template engine with ONE conversation sequence, and a proxy speculating with a
    real llama-server drafter in front of it.

    Why one sequence, and fresh: exact mode makes a position's logits independent of the batch,
    not of where its K/V sit in the KV cache. Attention (flash or not) sums over the cache's cells
    in cell order, so a conversation whose later tokens llama.cpp placed in cells BELOW its earlier
    ones (the unified cache refills the hole another conversation left, when that hole lies under
    its search head) gets other bits than the same tokens in position order: measured on this model
    in exact mode, up to 0.5 in a logit (and bit-identical when only the cells' place changes, not
    their order). With two conversations interleaved over earlier tests' cells, that flipped the
    near-tie 'the highest recorded' / 'the average temperature' now and then in full runs of this
    module. With one sequence from an empty cache, every trim frees the sequence's tail and
    llama.cpp's search head moves back to it, so cells stay in position order for both paths (one
    drafter: no multi-draft trees, whose winner's cells would sit above the loser's freed ones)."""
    with _hermes_engine(parallel=1) as url:
        drafter = start_drafter(module_processes, toolchain)[0]
        yield url, start_proxy(module_processes, url, draft=drafter)


def test_speculated_tool_requests_are_the_engines_replies_hermes(
    hermes_golden: tuple[str, ProxyProcess],
) -> None:
    url, proxy = hermes_golden
    with (
        OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as direct,
        OpenAI(base_url=f"{proxy.url}/v1", api_key=TOKEN, max_retries=0, timeout=120) as front,
    ):
        _same_through_the_proxy(direct, front, proxy, "smol-hermes")


def test_speculated_tool_requests_are_the_engines_replies_qwen(
    toolchain: Toolchain, module_processes: Processes
) -> None:
    path = _qwen_path()
    try:
        target = models.resolve("qwen2.5-coder-1.5b-q4_k_m")
    except Exception as exc:
        pytest.skip(f"the Qwen2.5-Coder 1.5B target is not available ({exc})")
    if not target.is_file():
        pytest.skip(
            "qwen2.5-coder-1.5b-q4_k_m is not fetched: `tightwad models fetch qwen2.5-coder-1.5b-q4_k_m`"
        )
    from tightwad.launch import free_port, llama_server_command, wait_for_http

    # Exact kernels: a verify block scores each token as decoding it alone does (no near-tie flips).
    engine = start_engine(
        module_processes, target, parallel=2, ctx=4096, extra=["--exact", "on"], name="qwen-target"
    )
    port = free_port()
    cmd = llama_server_command(toolchain, path, port, threads=1, ctx_size=4096)
    process, log = module_processes.start(f"qwen-drafter-{port}", cmd)
    wait_for_http(f"http://127.0.0.1:{port}/health", timeout=120, process=process, log=log)
    proxy = start_proxy(module_processes, engine.url, draft=f"http://127.0.0.1:{port}")
    with (
        OpenAI(base_url=f"{engine.url}/v1", api_key="unused", max_retries=0, timeout=300) as direct,
        OpenAI(base_url=f"{proxy.url}/v1", api_key=TOKEN, max_retries=0, timeout=300) as front,
    ):
        _same_through_the_proxy(direct, front, proxy, direct.models.list().data[0].id)


def test_the_llama_server_drafter_drafts_a_required_hermes_call_under_its_schema_inside_the_call() -> None:
    """The grammar of a required call reaches the drafter as the call's JSON Schema, with the call's
    text so far, only while a `<tool_call>` block is open (its tags are drafted unconstrained)."""
    vocabulary = Vocabulary([b"<tool_call>\n", b'{"name": "get_weather", ', b"\n</tool_call>", b"hi"])
    grammar = {"tools": [WEATHER, TIME], "tool_choice": "required", "family": "hermes"}

    def fields(*generated: int) -> dict[str, Any]:
        request = DraftRequest((3, *generated), 4, vocabulary=vocabulary, grammar=grammar, generation_start=1)
        return grammar_fields(request)

    assert fields() == {} and fields(3) == {}  # no call open yet
    inside = fields(0, 1)
    assert inside["generation_prompt"] == '{"name": "get_weather", '
    names = {o["properties"]["name"]["const"] for o in inside["json_schema"]["anyOf"]}
    assert names == {"get_weather", "get_time"}
    assert fields(0, 1, 2) == {}  # the block is closed
    assert fields(0, 1, 2, 0)["generation_prompt"] == ""  # a second call opens
