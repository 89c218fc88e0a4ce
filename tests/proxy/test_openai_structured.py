"""Structured output through the proxy WITH speculation, against the engine alone, with the official
`openai` SDK as the client: a real engine (F32 SmolLM2, the batch-invariant configuration), a real
llama-server drafter (its Q4_1 build, drafting under the same schema; drafts that break the grammar
would be rejected by verify) and the real proxy.

Golden: greedy output under a JSON schema through the proxy equals the engine alone's, token for
token; the drafter, given the schema and the text so far, drafts what the schema allows from there;
`.parse()` with a Pydantic model and `json_object` work through the proxy as on the engine;
a seeded sampled reply under a schema is the engine's own.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from openai import BadRequestError, OpenAI
from pydantic import BaseModel, Field
from support.engines import EngineProcess
from support.openai_bodies import BAD_SCHEMA_PARAM, BAD_SCHEMAS, JSON_OBJECT, grammar, schema_format
from support.procs import Processes
from support.proxies import TOKEN, ProxyProcess, start_drafter, start_proxy

from tightwad.proxy.drafters.base import DraftRequest
from tightwad.proxy.drafters.llama_server import LlamaServerDrafter
from tightwad.proxy.upstream import EngineClient
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3},  # a tiny model loops
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = schema_format(PERSON, strict=True)
ASK = [{"role": "user", "content": "Describe a person called Ann, aged 31, and her three hobbies."}]


class Person(BaseModel):
    name: str
    age: int
    hobbies: list[str] = Field(max_length=3)


@pytest.fixture(scope="module")
def drafter_url(toolchain: Toolchain, module_processes: Processes) -> str:
    return start_drafter(module_processes, toolchain)[0]


@pytest.fixture(scope="module")
def proxy(local_engine: EngineProcess, drafter_url: str, module_processes: Processes) -> ProxyProcess:
    return start_proxy(module_processes, local_engine.url, draft=drafter_url)


@pytest.fixture(scope="module")
def clients(local_engine: EngineProcess, proxy: ProxyProcess) -> Iterator[tuple[OpenAI, OpenAI, str]]:
    engine = OpenAI(base_url=f"{local_engine.url}/v1", api_key="unused", max_retries=0, timeout=120)
    front = OpenAI(base_url=f"{proxy.url}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    yield engine, front, engine.models.list().data[0].id
    engine.close()
    front.close()


def _tokens(client: OpenAI, model: str, **kw: Any) -> tuple[str, list[int]]:
    reply = client.chat.completions.create(
        model=model, messages=ASK, extra_body={"return_tokens": True}, **kw
    )  # type: ignore[arg-type, call-overload]
    choice = reply.choices[0]
    return choice.message.content or "", list(choice.model_dump()["tokens"])


def test_greedy_under_a_schema_through_the_proxy_is_the_engines_token_for_token(
    clients: tuple[OpenAI, OpenAI, str], proxy: ProxyProcess
) -> None:
    engine, front, model = clients
    kw = {"max_tokens": 120, "temperature": 0, "response_format": SCHEMA_FORMAT}
    text, tokens = _tokens(engine, model, **kw)
    jsonschema.validate(json.loads(text), PERSON)
    before = proxy.stats()["requests"].get("speculate", 0)
    got_text, got = _tokens(front, model, **kw)
    assert got == tokens and got_text == text
    assert proxy.stats()["requests"]["speculate"] == before + 1  # the loop served it, not passthrough


def test_a_seeded_reply_under_a_schema_is_the_engines(clients: tuple[OpenAI, OpenAI, str]) -> None:
    engine, front, model = clients
    kw = {"max_tokens": 120, "temperature": 0.9, "seed": 42, "response_format": SCHEMA_FORMAT}
    assert _tokens(front, model, **kw) == _tokens(engine, model, **kw)


def test_parse_with_a_pydantic_model_through_the_proxy(clients: tuple[OpenAI, OpenAI, str]) -> None:
    _, front, model = clients
    reply = front.chat.completions.parse(
        model=model,
        messages=ASK,  # type: ignore[arg-type]
        response_format=Person,
        max_tokens=150,
        temperature=0,
    )
    assert isinstance(reply.choices[0].message.parsed, Person), reply.choices[0].message.content


def test_json_object_streamed_through_the_proxy(clients: tuple[OpenAI, OpenAI, str]) -> None:
    _, front, model = clients
    stream = front.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "List three fruits."}],
        max_tokens=150,
        temperature=0,
        stream=True,
        response_format=JSON_OBJECT,  # type: ignore[arg-type]
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict), text


def test_a_bad_schema_is_a_400_naming_it_through_the_proxy(clients: tuple[OpenAI, OpenAI, str]) -> None:
    _, front, model = clients
    with pytest.raises(BadRequestError) as info:
        front.chat.completions.create(
            model=model,
            messages=ASK,  # type: ignore[arg-type]
            response_format=schema_format(BAD_SCHEMAS[-1], name="x"),  # type: ignore[arg-type]
        )
    assert info.value.body["param"] == BAD_SCHEMA_PARAM  # type: ignore[index]


def test_the_llama_server_drafter_drafts_under_the_schema_from_where_the_reply_is(
    local_engine: EngineProcess, drafter_url: str
) -> None:
    """Midway through a reply, the drafter continues in the grammar's state after the text so far:
    a value only the schema allows (no model would guess it), and nothing once the object is done."""
    schema = {
        "type": "object",
        "properties": {"code": {"enum": ["zq-17-vx"]}, "n": {"type": "integer"}},
        "required": ["code", "n"],
        "additionalProperties": False,
    }
    constraint = grammar(schema_format(schema, name="c"))

    async def draft(so_far: str, constrained: bool) -> str:
        engine = EngineClient(local_engine.url)
        vocabulary = await engine.vocabulary((await engine.info()).n_vocab)
        prompt = await engine.chat_tokens([{"role": "user", "content": "Give the code."}])
        generated = await engine.tokenize(so_far, add_special=False)
        await engine.close()
        assert prompt is not None
        drafter = LlamaServerDrafter(drafter_url)
        request = DraftRequest(
            (*prompt, *generated),
            12,
            vocabulary=vocabulary,
            grammar=constraint if constrained else None,
            generation_start=len(prompt),
        )
        proposal = await drafter.propose(request)
        await drafter.close()
        return vocabulary.text(proposal.tokens)

    assert not asyncio.run(draft('{"code": "', constrained=False)).startswith("zq-17-vx")  # the control
    assert asyncio.run(draft('{"code": "', constrained=True)).startswith("zq-17-vx")
    rest = asyncio.run(draft('{"code": "zq-17-vx", "n": 4', constrained=True))
    assert re.fullmatch(r"\d*\s*(\}\s*)?", rest), rest
