"""engine/grammar.py against real libllama and a real vocabulary (SmolLM2 Q4_1, in this process):
constraints compile to grammars llama.cpp parses, a state walks over text that follows them, refuses
text that does not, allows the end of generation only once the text is complete, and a clone
advances without moving the state it came from."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tightwad import models
from tightwad.engine import libllama
from tightwad.engine.errors import BadRequest
from tightwad.engine.grammar import GrammarState, compile_constraint
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA = {
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "p",
            "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
        },
    }
}


@pytest.fixture(scope="module")
def model(toolchain: Toolchain) -> Iterator[libllama.Model]:
    loaded = libllama.Model(models.resolve("smollm2-135m-q4_1"))
    yield loaded
    loaded.close()


def _walk(model: libllama.Model, constraint: dict, text: str) -> GrammarState:  # type: ignore[type-arg]
    state = GrammarState.start(model, compile_constraint(constraint))
    state.advance_over(model.tokenize(text, add_special=False, parse_special=False), "text")
    return state


def test_a_schema_state_walks_its_text_and_ends_only_when_complete(model: libllama.Model) -> None:
    eos = model.eos
    half = _walk(model, SCHEMA, '{"n": 1')
    assert not half.allows(eos)  # not complete: the end of generation is masked
    assert not half.allows(model.tokenize("x", add_special=False)[0])
    done = _walk(model, SCHEMA, '{"n": 12}')
    assert done.allows(eos)
    allowed = half.allowed()
    assert allowed.shape == (model.n_vocab,) and 0 < allowed.sum() < model.n_vocab
    with pytest.raises(BadRequest, match="does not follow the grammar"):
        _walk(model, SCHEMA, '{"m": 1}')


def test_a_clone_advances_alone(model: libllama.Model) -> None:
    state = _walk(model, SCHEMA, '{"n": ')
    brace = model.tokenize("}", add_special=False)[0]
    assert not state.allows(brace)
    digit = model.tokenize("7", add_special=False)[0]
    after = state.advanced(digit)
    assert after is not None and after.allows(brace)
    assert not state.allows(brace)  # the original did not move
    assert state.advanced(brace) is None


@pytest.mark.parametrize(
    ("family", "text"),
    [
        ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
        ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
        ("llama3", '{"name": "get_weather", "arguments": {"city": "Paris"}}'),
    ],
)
def test_a_required_call_grammar_per_family(model: libllama.Model, family: str, text: str) -> None:
    constraint = {
        "tools": [WEATHER],
        "tool_choice": "required",
        "family": family,
        "parallel_tool_calls": False,
    }
    assert _walk(model, constraint, text).allows(model.eos)
    with pytest.raises(BadRequest):
        _walk(model, constraint, "Sure! " + text)  # nothing but the call
    with pytest.raises(BadRequest):
        _walk(model, constraint, text.replace("get_weather", "get_time"))  # only the given functions


def test_json_object_refuses_prose(model: libllama.Model) -> None:
    assert _walk(model, {"response_format": {"type": "json_object"}}, '{"a": [1, 2]}').allows(model.eos)
    with pytest.raises(BadRequest):
        _walk(model, {"response_format": {"type": "json_object"}}, "Here is")


def test_a_grammar_llama_cpp_cannot_parse_is_a_400(model: libllama.Model) -> None:
    with pytest.raises(BadRequest) as info:
        GrammarState.start(model, compile_constraint({"gbnf": "root ::= undefined-rule"}))
    assert info.value.param == "grammar"


def test_grammars_that_could_exhaust_llama_cpps_stack_are_refused(model: libllama.Model) -> None:
    """Lengths, counts and pattern repetitions become nested repetitions in GBNF, and llama.cpp
    parses and walks grammars recursively: past the bounds a 400, never a crashed engine."""

    def schema(value: dict) -> dict:  # type: ignore[type-arg]
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": value}}}

    for bad in (
        {"type": "string", "maxLength": 10**6},
        {"type": "array", "minItems": 10**9},
        {"type": "string", "pattern": "^a{0,100000}$"},
    ):
        with pytest.raises(BadRequest) as info:
            compile_constraint(schema(bad))
        assert info.value.param == "response_format.json_schema.schema", bad
    for gbnf in ("root ::= " + "(" * 5000 + '"a"' + ")" * 5000, 'root ::= "a"{0,100000}'):
        with pytest.raises(BadRequest):
            compile_constraint({"gbnf": gbnf})
    within = compile_constraint(schema({"type": "string", "maxLength": 1000}))
    assert GrammarState.start(model, within).allows(model.tokenize('"', add_special=False)[0])


def test_the_verify_api_carries_the_grammar() -> None:
    """The proxy's encoding and the engine's decoding of `grammar` (tightwad.verify_api)."""
    from tightwad.verify_api import VerifyRequest, decode_request, encode_request

    constraint = {"response_format": {"type": "json_object"}}
    request = VerifyRequest("c", [1, 2], generation_start=2, grammar=constraint)
    body = encode_request(request)
    assert body["grammar"] == constraint
    assert decode_request(body).grammar == constraint
    assert "grammar" not in encode_request(VerifyRequest("c", [1]))
    with pytest.raises(Exception, match="grammar"):
        decode_request({**body, "grammar": "json"})
