"""The one table of OpenAI request parameters (tightwad.openai.PARAMS), model names and aliases:
pure, no server. The real engine and proxy are checked with the official SDK in
tests/engine/test_openai_surface.py and tests/proxy/test_openai_surface.py."""

from __future__ import annotations

from typing import Any

import pytest
from support.plans import manifest_data

from tightwad.manifest import manifest_from_dict
from tightwad.openai import (
    CHAT,
    COMPLETIONS,
    PARAMS,
    InvalidRequest,
    ModelNotFound,
    check_model,
    check_params,
    passthrough_keys,
    served_names,
)
from tightwad.operator.commands import Binaries, command
from tightwad.operator.desired import desired_state
from tightwad.proxy.request_parsing import passthrough_reason


def refusal(body: dict[str, Any], route: str = CHAT) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        check_params(body, route)
    return caught.value


def test_every_row_says_what_it_does() -> None:
    for key, param in PARAMS.items():
        assert param.treatment in ("honoured", "refused", "ignored"), key
        assert param.note and param.routes, key
        # A refused parameter never reaches the speculation loop: the loop could not ignore it safely.
        assert param.treatment != "refused" or not param.speculated, key


def test_an_unknown_parameter_is_refused_by_name() -> None:
    error = refusal({"messages": [], "frobnicate": 1})
    assert error.param == "frobnicate" and error.status == 400 and error.code == "unknown_parameter"
    assert "remove it" in str(error)
    # llama.cpp's own extensions are not silently dropped either
    assert refusal({"prompt": "x", "grammar": "root ::= x"}, COMPLETIONS).param == "grammar"


def test_a_parameter_of_the_other_route_is_named() -> None:
    error = refusal({"prompt": "x"}, CHAT)
    assert error.param == "prompt" and "/v1/completions" in str(error)
    assert refusal({"messages": []}, COMPLETIONS).param == "messages"


def test_neutral_values_of_refused_parameters_pass() -> None:
    check_params({"tools": [], "tool_choice": "none", "response_format": {"type": "text"}}, CHAT)
    check_params({"n": 1, "user": "u", "store": False, "metadata": {"a": "b"}, "service_tier": "auto"}, CHAT)
    check_params({"suffix": "", "best_of": 1, "seed": 3, "stop": None}, COMPLETIONS)


def test_tools_are_honoured_and_the_deprecated_functions_refused() -> None:
    check_params(
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, CHAT
    )
    assert refusal({"tools": [{"type": "function"}]}, COMPLETIONS).param == "tools"  # chat only
    error = refusal({"functions": [{"name": "f"}]})
    assert error.param == "functions" and "`tools`" in str(error)
    check_params({"function_call": "auto", "functions": []}, CHAT)  # neutral: asks for nothing


def test_response_format() -> None:
    check_params({"response_format": {"type": "json_object"}}, CHAT)
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "p", "schema": {"type": "object"}, "strict": True},
    }
    check_params({"response_format": schema}, CHAT)
    nameless = refusal({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}})
    assert nameless.param == "response_format.json_schema"
    not_a_schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": "object"}}
    assert refusal({"response_format": not_a_schema}).param == "response_format.json_schema.schema"
    bogus = refusal({"response_format": {"type": "bogus"}})
    assert bogus.param == "response_format" and "one of text, json_object, json_schema" in str(bogus)
    assert refusal({"response_format": "json"}).param == "response_format"


def test_a_boolean_is_not_a_neutral_number() -> None:
    assert refusal({"best_of": True}, COMPLETIONS).param == "best_of"


def test_the_proxy_passes_through_what_the_loop_does_not_serve() -> None:
    assert "n" in passthrough_keys() and "ignore_eos" in passthrough_keys()
    assert "temperature" not in passthrough_keys() and "user" not in passthrough_keys()
    assert passthrough_reason({"messages": [], "n": 2}) == "n > 1"
    assert passthrough_reason({"messages": [], "n": 1, "response_format": {"type": "text"}}) is None
    assert passthrough_reason({"prompt": ["a", "b"]}) == "several prompts"
    assert passthrough_reason({"prompt": [[1, 2]]}) is None


def test_model_names() -> None:
    body = {"data": [{"id": "smol", "meta": {"aliases": ["gpt-4o-mini"]}}, {"id": "gpt-4o-mini"}]}
    names = served_names(body)
    assert names == ("smol", "gpt-4o-mini")
    for model in ("smol", "gpt-4o-mini", None):
        check_model({"model": model}, names)
    with pytest.raises(ModelNotFound) as caught:
        check_model({"model": "gpt-5"}, names)
    error = caught.value.to_json()["error"]
    assert caught.value.status == 404
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["type"] == "invalid_request_error" and "spec.target.aliases" in error["message"]


def test_aliases_reach_the_engine_command_line() -> None:
    data = manifest_data(target__aliases=["gpt-4o-mini", "my-app"])
    manifest = manifest_from_dict(data)
    assert manifest.target.aliases == ("gpt-4o-mini", "my-app")
    engine = desired_state(manifest).stacks["a"].engine
    argv = command(engine, Binaries(python=("py", "-m"), rpc_server="rpc", llama_server="ls"), {"big": "/m"})
    names = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--alias"]
    assert names == ["big", "gpt-4o-mini", "my-app"]
    # No aliases: the engine's spec, and so its hash, is what it always was.
    plain = desired_state(manifest_from_dict(manifest_data())).stacks["a"].engine
    assert "aliases" not in plain.spec and plain.name != engine.name
