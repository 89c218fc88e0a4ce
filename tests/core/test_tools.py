"""Tool calling's pure parts (tightwad.tools): request checks, the family a template teaches, tool
calls parsed out of replies per family, the streamed-reply splitter, and the shape of the grammar
of a required call."""

from __future__ import annotations

import json

import pytest

from tightwad import tools
from tightwad.openai import InvalidRequest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
NAMES = ("get_weather", "get_time")


# requests ----------------------------------------------------------------------------------------
def test_tools_are_checked_entry_by_entry() -> None:
    assert tools.check_tools([WEATHER])[0]["name"] == "get_weather"
    no_params = tools.check_tools([{"type": "function", "function": {"name": "ping"}}])[0]
    assert no_params["parameters"] == {"type": "object", "properties": {}}
    for bad, where in (
        ("nope", "tools"),
        ([{"type": "retrieval"}], "tools[0]"),
        ([WEATHER, {"type": "function", "function": {}}], "tools[1]"),
        ([{"type": "function", "function": {"name": "has space"}}], "tools[0]"),
        ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "tools[0]"),
        ([WEATHER, WEATHER], "tools"),
    ):
        with pytest.raises(InvalidRequest) as info:
            tools.check_tools(bad)
        assert info.value.param == where, bad


def test_tool_choice() -> None:
    functions = tools.check_tools([WEATHER])
    assert tools.choice_of(None, functions) == "auto"
    assert tools.choice_of(None, []) == "none"
    assert tools.choice_of("required", functions) == "required"
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert tools.choice_of(named, functions) == "get_weather"
    for bad in ("always", {"type": "function", "function": {"name": "other"}}, {"type": "function"}):
        with pytest.raises(InvalidRequest) as info:
            tools.choice_of(bad, functions)
        assert info.value.param == "tool_choice"
    with pytest.raises(InvalidRequest):
        tools.choice_of("required", [])
    assert [f["name"] for f in tools.required_calls([WEATHER], named)] == ["get_weather"]
    with pytest.raises(InvalidRequest):
        tools.required_calls([WEATHER], "auto")


def test_the_family_a_template_teaches() -> None:
    assert tools.family_of(None) is None
    assert tools.family_of("{{ messages }}") is None  # SmolLM2-like: no `tools`
    assert tools.family_of("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert tools.family_of("{% if tools %}[TOOL_CALLS]{% endif %}") == "mistral"
    assert tools.family_of("{% if tools %}<|python_tag|>{% endif %}") == "llama3"


def test_engines_that_say_and_do_not_say() -> None:
    def body(meta: dict) -> dict:  # type: ignore[type-arg]
        return {"data": [{"id": "m", "meta": meta}]}

    assert tools.engine_takes_tools(body({"tools": "hermes"})) is True
    assert tools.engine_takes_tools(body({"tools": None})) is False
    assert tools.engine_takes_tools(body({})) is None
    assert tools.unsupported().param == "tools"


# parsing replies --------------------------------------------------------------------------------
def _calls(text: str, family: str) -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    _, calls = tools.parse(text, family, NAMES)
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_calls() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = tools.parse(text, "hermes", NAMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    two = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    )
    assert _calls(two, "hermes") == [("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "CET"})]
    unfinished = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'  # cut at max_tokens
    assert _calls(unfinished, "hermes") == [("get_weather", {"city": "Oslo"})]
    broken = '<tool_call>\n{"name": "get_weather", "argum'
    assert tools.parse(broken, "hermes", NAMES) == (broken, [])


def test_a_bare_call_counts_only_for_the_requests_functions() -> None:
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert _calls(bare, "hermes") == [("get_weather", {"city": "Paris"})]
    assert _calls(f"```json\n{bare}\n```", "hermes") == [("get_weather", {"city": "Paris"})]
    content = '{"name": "Ann", "arguments": "none"}'  # JSON content that is not a call of ours
    assert tools.parse(content, "hermes", NAMES) == (content, [])
    assert tools.parse("Hello there.", "hermes", NAMES) == ("Hello there.", [])


def test_llama3_calls() -> None:
    text = '{"name": "get_weather", "parameters": {"city": "Rome"}}'
    assert _calls(text, "llama3") == [("get_weather", {"city": "Rome"})]
    assert _calls(f"<|python_tag|>{text}", "llama3") == [("get_weather", {"city": "Rome"})]
    assert tools.parse("The weather is fine.", "llama3", NAMES) == ("The weather is fine.", [])


def test_mistral_calls() -> None:
    text = (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lyon"}}, '
        '{"name": "get_time", "arguments": {"zone": "UTC"}}]'
    )
    assert _calls(text, "mistral") == [("get_weather", {"city": "Lyon"}), ("get_time", {"zone": "UTC"})]
    assert tools.parse("[TOOL_CALLS] nonsense", "mistral", NAMES)[1] == []


def test_a_call_in_openai_shape() -> None:
    call = tools.ToolCall("get_weather", '{"city": "Paris"}')
    shaped = call.to_json(index=0)
    assert shaped["type"] == "function" and shaped["index"] == 0 and shaped["id"].startswith("call_")
    assert shaped["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert (
        tools.parse('{"name": "get_weather", "arguments": "{\\"city\\": 1}"}', "hermes", NAMES)[1][
            0
        ].arguments
        == '{"city": 1}'
    )


# streaming ------------------------------------------------------------------------------------------
def _stream(pieces: list[str], family: str) -> tuple[str, str, list[tools.ToolCall]]:
    stream = tools.ToolStream(family, NAMES)
    live = "".join(stream.feed(p) for p in pieces)
    rest, calls = stream.finish()
    return live, rest, calls


def test_the_stream_sends_text_and_holds_calls() -> None:
    text = 'Checking now. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]  # the tag arrives split
    live, rest, calls = _stream(pieces, "hermes")
    assert live == "Checking now. " and rest == "" and [c.name for c in calls] == ["get_weather"]
    assert "<" not in live  # never a piece of the tag


def test_the_stream_of_plain_text_is_all_sent() -> None:
    text = "Paris is sunny today, with a light breeze < 10 km/h."
    live, rest, calls = _stream(list(text), "hermes")
    assert live + rest == text and calls == []
    assert len(live) > len(text) // 2  # most of it went out as it came


def test_a_bare_call_is_held_and_json_content_released() -> None:
    bare = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    live, rest, calls = _stream(list(bare), "hermes")
    assert live == "" and rest == "" and [c.name for c in calls] == ["get_weather"]
    content = '{"color": "blue"}'
    live, rest, calls = _stream(list(content), "llama3")
    assert live + rest == content and calls == []


# grammars ----------------------------------------------------------------------------------------
def test_the_grammar_of_required_calls() -> None:
    functions = tools.check_tools([WEATHER])
    schema = tools.calls_schema(functions)
    assert schema["properties"]["name"] == {"const": "get_weather"}
    call = 'root ::= "{" space\nspace ::= " "?'
    one = tools.wrap_gbnf(call, "hermes", parallel=False)
    assert one.splitlines()[0] == 'root ::= "<tool_call>\\n" tightwad-call "\\n</tool_call>"'
    assert "tightwad-call ::=" in one and '\nroot ::= "{"' not in one
    assert tools.wrap_gbnf(call, "hermes", parallel=True).splitlines()[0].endswith(")*")
    assert (
        tools.wrap_gbnf(call, "mistral", parallel=False).splitlines()[0].startswith('root ::= "[TOOL_CALLS]"')
    )
    assert tools.wrap_gbnf(call, "llama3").splitlines()[0] == "root ::= tightwad-call"
