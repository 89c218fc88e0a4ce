"""Structured output on the engine alone and through its verify API (the real F32 SmolLM2 target in
the batch-invariant configuration, the official `openai` SDK as the client where it applies).

The grammar masks the target's distribution at every position, so: a `json_object` reply parses as
a JSON object, a `json_schema` reply validates against its schema (the SDK's `.parse()` gives the
Pydantic object), and verify calls with ANY drafts (right for a while, then junk that breaks the
grammar) give exactly the engine's own constrained reply, greedy and seeded.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import numpy as np
import pytest
from openai import BadRequestError, OpenAI
from pydantic import BaseModel
from support.engines import EngineProcess, chat_prompt, tokenize, verify
from support.openai_bodies import BAD_SCHEMA_PARAM, BAD_SCHEMAS, JSON_OBJECT, complete, grammar, schema_format

pytestmark = pytest.mark.integration

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "likes_boxes": {"type": "boolean"},
    },
    "required": ["name", "age", "likes_boxes"],
    "additionalProperties": False,
}
SCHEMA_FORMAT = schema_format(PERSON, strict=True)
PROMPT = chat_prompt("Describe a cat called Tom, aged 3, who likes boxes, as JSON.")


class Person(BaseModel):
    name: str
    age: int
    likes_boxes: bool


@pytest.fixture(scope="module")
def client(local_engine: EngineProcess) -> Any:
    with OpenAI(base_url=f"{local_engine.url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def _model(client: OpenAI) -> str:
    return client.models.list().data[0].id


def _complete(engine: EngineProcess, **body: Any) -> dict[str, Any]:
    return complete(engine, body.pop("prompt", PROMPT), **body)


def test_json_object_gives_a_json_object(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colors."}]
    plain = client.chat.completions.create(
        model=_model(client), messages=messages, max_tokens=60, temperature=0
    )  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # the model alone answers prose
        json.loads(plain.choices[0].message.content or "")
    reply = client.chat.completions.create(
        model=_model(client),
        messages=messages,  # type: ignore[arg-type]
        max_tokens=200,
        temperature=0,
        response_format=JSON_OBJECT,  # type: ignore[arg-type]
    )
    assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_parse_with_a_pydantic_model(client: OpenAI) -> None:
    messages = [{"role": "user", "content": "Describe a cat called Tom, aged 3, who likes boxes."}]
    for temperature in (0.0, 0.8):
        reply = client.chat.completions.parse(
            model=_model(client),
            messages=messages,  # type: ignore[arg-type]
            response_format=Person,
            max_tokens=200,
            temperature=temperature,
            seed=3,
        )
        person = reply.choices[0].message.parsed
        assert isinstance(person, Person), reply.choices[0].message.content


def test_a_schema_is_followed_when_streamed_and_sampled(local_engine: EngineProcess) -> None:
    for seed in (1, 2, 3):
        text = _complete(
            local_engine, max_tokens=200, temperature=1.0, seed=seed, response_format=SCHEMA_FORMAT
        )["text"]
        jsonschema.validate(json.loads(text), PERSON)


def test_bad_schemas_are_a_400_naming_the_schema(local_engine: EngineProcess) -> None:
    for schema in BAD_SCHEMAS:
        body = schema_format(schema, name="x")
        response = local_engine.post("/v1/completions", {"prompt": PROMPT, "response_format": body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == BAD_SCHEMA_PARAM, error
        assert BAD_SCHEMA_PARAM in error["message"]
    response = local_engine.post("/v1/completions", {"prompt": PROMPT, "response_format": {"type": "bogus"}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


def test_sdk_sees_a_bad_schema_as_bad_request(client: OpenAI) -> None:
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(
            model=_model(client),
            messages=[{"role": "user", "content": "hi"}],
            response_format=schema_format({"type": 3}, name="x"),  # type: ignore[arg-type]
        )
    assert info.value.body["param"] == BAD_SCHEMA_PARAM  # type: ignore[index]


def _verify_loop(
    engine: EngineProcess, alone: list[int], sampling: dict[str, Any], name: str, seed: int
) -> list[int]:
    """Verify calls with drafts that are right for a while, then junk (which the grammar refuses)."""
    prompt = tokenize(engine, PROMPT)
    rng = np.random.default_rng(seed)
    out: list[int] = []
    first = True
    while len(out) < len(alone):
        k = int(rng.integers(0, 6))
        draft = [int(t) for t in rng.integers(0, 2000, size=k)]
        good = int(rng.integers(0, k + 1))
        draft[:good] = alone[len(out) : len(out) + good]
        body = {
            "conversation": name,
            "tokens": prompt if first else [],
            "reset": first,
            "drafts": [{"tokens": draft}] if draft else [],
            "sampling": sampling,
            "generation_start": len(prompt),
            "grammar": grammar(SCHEMA_FORMAT),
        }
        reply = verify(engine, body)
        out += reply["tokens"]
        first = False
        if reply["eog"]:
            break
    return out[: len(alone)]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.9, "top_p": 0.95, "seed": 7}])
def test_verify_under_a_schema_gives_the_engines_own_reply(
    local_engine: EngineProcess, sampling: dict[str, Any]
) -> None:
    alone = _complete(local_engine, max_tokens=80, response_format=SCHEMA_FORMAT, **sampling)["tokens"]
    assert len(alone) > 10
    got = _verify_loop(local_engine, alone, sampling, f"grammar-{len(sampling)}", seed=len(sampling))
    assert got == alone


def test_a_continued_reply_must_follow_the_grammar(local_engine: EngineProcess) -> None:
    """`generated_tokens` (the proxy's fallback continuing a reply) is checked against the grammar,
    and a reply continued from its middle goes on exactly as the whole reply did."""
    prompt = tokenize(local_engine, PROMPT)
    whole = _complete(local_engine, max_tokens=40, temperature=0, response_format=SCHEMA_FORMAT)["tokens"]
    half = _complete(
        local_engine,
        prompt=prompt + whole[:15],
        generated_tokens=15,
        max_tokens=25,
        temperature=0,
        response_format=SCHEMA_FORMAT,
    )["tokens"]
    assert whole[:15] + half == whole
    junk = tokenize(local_engine, "hello")
    response = local_engine.post(
        "/v1/completions",
        {"prompt": prompt + junk, "generated_tokens": len(junk), "response_format": SCHEMA_FORMAT},
    )
    assert response.status_code == 400, response.text
    assert "grammar" in response.json()["error"]["message"]
