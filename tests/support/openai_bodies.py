"""OpenAI request bodies and calls that the engine and proxy tests share: structured-output
formats, the verify API's `grammar` form, schemas every server must refuse, and a completion that
returns the reply's token ids (Tightwad's `return_tokens` extension)."""

from __future__ import annotations

from typing import Any

from support.engines import EngineProcess

JSON_OBJECT: dict[str, Any] = {"type": "json_object"}
BAD_SCHEMA_PARAM = "response_format.json_schema.schema"  # the `param` of a refused schema's 400
# Schemas that cannot constrain a reply: each is a 400 naming BAD_SCHEMA_PARAM, never ignored.
BAD_SCHEMAS: list[dict[str, Any]] = [
    {"type": "bogus"},  # not a JSON Schema type
    {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},  # cannot be resolved
    {"type": "object", "required": "name"},  # `required` must be a list
]


def schema_format(schema: dict[str, Any], name: str = "person", strict: bool | None = None) -> dict[str, Any]:
    """A `response_format` asking for `schema` (`strict` only when given)."""
    inner: dict[str, Any] = {"name": name, "schema": schema}
    if strict is not None:
        inner["strict"] = strict
    return {"type": "json_schema", "json_schema": inner}


def grammar(response_format: dict[str, Any]) -> dict[str, Any]:
    """The verify API's `grammar` (and /v1/completions' extension) for a `response_format`."""
    return {"response_format": response_format}


def complete(engine: EngineProcess, prompt: Any, **body: Any) -> dict[str, Any]:
    """POST /v1/completions to the engine; its first choice, with the reply's `tokens`."""
    response = engine.post("/v1/completions", {"prompt": prompt, "return_tokens": True, **body})
    assert response.status_code == 200, response.text
    return dict(response.json()["choices"][0])
