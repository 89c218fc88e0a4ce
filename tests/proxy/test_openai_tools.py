"""Tool calling with the official `openai` SDK against real engines and the real proxy.

SmolLM2's chat template does not take `tools`: the engine and the proxy answer the same clear 400.
Qwen2.5-Coder 0.5B Instruct (opt-in in the catalog: `tightwad models fetch
qwen2.5-coder-0.5b-q4_k_m`) really calls tools: auto, required, named, streamed, and a `role: tool`
reply sent back; its tests are skipped, saying so, when the model is not fetched. Requests with
tools pass through the proxy to the engine (the speculation loop does not serve them).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from support.engines import EngineProcess, start_engine
from support.procs import Processes
from support.proxies import TOKEN, ProxyProcess, start_proxy

from tightwad import models
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
    return client.chat.completions.create(model=model, temperature=0, max_tokens=120, **kw).choices[0]


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
