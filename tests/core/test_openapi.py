"""The OpenAPI documents (tightwad.openapi): built from the parameter table and the verify API, valid
OpenAPI that Schemathesis loads, and free of anything secret. Each server's document is checked
against the routes it really serves in tests/packaging/test_openapi_servers.py."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import pytest
import schemathesis
from starlette.routing import Route

from tightwad import openai, openapi
from tightwad.openai import CHAT, COMPLETIONS, PARAMS, Param
from tightwad.verify_api import Draft, Sampling, VerifyRequest, encode_request

DOCUMENTS = {
    "engine": openapi.engine_document,
    "proxy": openapi.proxy_document,
    "router": openapi.router_document,
    "agent": openapi.agent_document,
    "swarm": openapi.swarm_document,
}


def _valid(schema: dict[str, Any], body: dict[str, Any]) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(body)


def _accepted(body: dict[str, Any], route: str) -> bool:
    try:
        openai.check_params(body, route)
    except openai.InvalidRequest:
        return False
    return True


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS])
def test_the_openai_bodies_hold_every_row_of_the_parameter_table_for_their_route(route: str) -> None:
    schema = openapi.openai_request_schema(route)
    expected = {key for key, param in PARAMS.items() if route in param.routes}
    assert set(schema["properties"]) == expected
    assert schema["additionalProperties"] is False  # an unknown parameter is refused, as the servers do
    for key in expected:
        assert schema["properties"][key]["x-tightwad-treatment"] == PARAMS[key].treatment
        assert schema["properties"][key]["description"] == PARAMS[key].note


def test_a_row_added_to_the_table_appears_in_the_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PARAMS, "brand_new", Param("refused", "a new option: leave it out", neutral=(0,)))
    chat = openapi.engine_document()["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["brand_new"] == {
        "description": "a new option: leave it out",
        "x-tightwad-treatment": "refused",
        "enum": [0, None],
    }


def test_the_schema_agrees_with_the_servers_check_on_refused_and_unknown_parameters() -> None:
    schema = openapi.openai_request_schema(CHAT)
    messages = [{"role": "user", "content": "hi"}]
    cases = [
        {"messages": messages},
        {"messages": messages, "tools": []},  # neutral: asks for nothing
        {"messages": messages, "tools": [{"type": "function"}]},
        {"messages": messages, "tool_choice": "auto"},
        {"messages": messages, "tool_choice": "required"},
        {"messages": messages, "response_format": {"type": "text"}},
        {"messages": messages, "audio": None},
        {"messages": messages, "audio": {"voice": "x"}},
        {"messages": messages, "no_such_option": 1},
        {"messages": messages, "prompt": "completions only"},
        {"messages": messages, "user": "someone"},
    ]
    for body in cases:
        assert _valid(schema, body) == _accepted(body, CHAT), body


def test_typed_parameters_are_checked_by_the_schema() -> None:
    schema = openapi.openai_request_schema(COMPLETIONS)
    assert _valid(schema, {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "logprobs": 2})
    assert not _valid(schema, {"prompt": "x", "logprobs": True})  # completions: a count, not a flag
    assert _valid(openapi.openai_request_schema(CHAT), {"messages": [{"role": "user"}], "logprobs": True})
    assert not _valid(schema, {"prompt": "x", "stop": ["s"] * 17})
    assert not _valid(schema, {"prompt": "x", "presence_penalty": 3})
    assert not _valid(schema, {"max_tokens": 4})  # prompt is required


def test_the_verify_body_has_every_field_the_client_encodes() -> None:
    full = VerifyRequest(
        conversation="c",
        tokens=[1, 2],
        drafts=[Draft((3, 4), ({"ids": [3], "p": [1.0]}, [0.5, 0.5]))],
        sampling=Sampling(
            temperature=0.7,
            top_k=5,
            top_p=0.9,
            seed=7,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            logit_bias=((3, 1.0),),
        ),
        reset=True,
        generation_start=1,
        logprobs=2,
        grammar={"response_format": {"type": "json_object"}},
    )
    body = encode_request(full)
    schema = openapi.verify_request_schema()
    assert set(body) == set(schema["properties"])
    assert set(body["sampling"]) == set(schema["properties"]["sampling"]["properties"])
    assert _valid(schema, body)
    assert not _valid(schema, {**body, "logprobs": 21})


def test_app_operations_read_a_route_table_in_the_documents_spelling() -> None:
    async def nothing(request: Any) -> None:
        return None

    routes = [
        Route("/a/{model:path}", nothing, methods=["GET"]),
        Route("/b", nothing, methods=["POST", "PUT"]),
        Route("/c", nothing),
    ]
    assert openapi.app_operations(routes) == {
        ("/a/{model}", "GET"),
        ("/b", "POST"),
        ("/b", "PUT"),
        ("/c", "GET"),
    }


@pytest.mark.parametrize("name", DOCUMENTS)
def test_each_document_is_openapi_that_schemathesis_loads(name: str) -> None:
    document = DOCUMENTS[name]()
    assert document["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(document)
    loaded = {(op.path, op.method.upper()) for op in (result.ok() for result in schema.get_all_operations())}
    assert loaded == openapi.operations(document)


@pytest.mark.parametrize("name", DOCUMENTS)
def test_each_document_declares_its_path_parameters_and_serves_itself_openly(name: str) -> None:
    document = DOCUMENTS[name]()
    path = openapi.ROUTER_OPENAPI_PATH if name == "router" else openapi.OPENAPI_PATH
    assert document["paths"][path]["get"]["security"] == []
    for where, item in document["paths"].items():
        for method, op in item.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", where)), (method, where)
            assert "200" in op["responses"]


@pytest.mark.parametrize("name", DOCUMENTS)
def test_no_document_holds_an_address_or_a_secret(name: str) -> None:
    text = json.dumps(DOCUMENTS[name]())
    for secret_like in ("127.0.0.1", "localhost", "Bearer ", "/root", "/home", 'token": "'):
        assert secret_like not in text
