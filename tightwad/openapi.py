"""OpenAPI 3.1 documents of Tightwad's HTTP servers: engine, proxy, engine router, agent API and swarm
peer. Pure functions that return plain dicts; each server serves its own with `route(document)`.

Every server answers `GET /openapi.json` without a token (the router: `GET /_tightwad/openapi.json`,
since it forwards every other path, /openapi.json included, to the engine behind it). A document
holds shapes only, never an address, a token or a model path, so it is safe to leave open.

The OpenAI request bodies are generated from the one parameter table, tightwad.openai.PARAMS: each
row becomes a property with its note as the description and its treatment as `x-tightwad-treatment`;
a refused parameter accepts only its neutral values (and null), and a parameter the table does not
know is refused (`additionalProperties: false`), as the servers do. A row added to the table appears
here by itself. The verify API's body is built from tightwad.verify_api's constants, and a test
checks its keys against `encode_request`. Each server's test checks that its document's paths and
methods are exactly the routes it serves (`operations` against `app_operations`), so a new route
without a document fails.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tightwad.openai import CHAT, COMPLETIONS, PARAMS, ROUTE_PATHS
from tightwad.stops import MAX_STOP_CHARS, MAX_STOPS
from tightwad.verify_api import (
    MAX_BIAS,
    MAX_BIASED_TOKENS,
    MAX_PENALTY,
    MAX_TOP_LOGPROBS,
    STATS_PATH,
    VERIFY_PATH,
)

OPENAPI_PATH = "/openapi.json"
ROUTER_OPENAPI_PATH = "/_tightwad/openapi.json"
VERSION = "3.1.0"
_METHODS = ("get", "put", "post", "delete", "patch", "options", "head")

Schema = dict[str, Any]


# building blocks -------------------------------------------------------------------------------
ERROR: Schema = {
    "type": "object",
    "description": "The one error shape of every Tightwad server (tightwad.openai.error_body).",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "string"},
            },
        }
    },
}
_ANY_OBJECT: Schema = {"type": "object"}
_TOKENS: Schema = {"type": "array", "items": {"type": "integer", "minimum": 0}}


def _json(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _op(
    summary: str,
    *,
    body: Schema | None = None,
    reply: Schema | None = None,
    media: str = "application/json",
    open_: bool = False,
    params: Iterable[str] = (),
    statuses: Iterable[int] = (),
) -> dict[str, Any]:
    """One operation: its summary, body, a 200 and the error statuses it can answer with."""
    ok: dict[str, Any] = {"description": "success"}
    if media == "application/json":
        ok["content"] = _json(reply or _ANY_OBJECT)
    else:
        ok["content"] = {media: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {"200": ok}
    error = {
        "description": "an error, in the one shape",
        "content": _json({"$ref": "#/components/schemas/Error"}),
    }
    for status in sorted({*statuses, *(() if open_ else (401,))}):
        responses[str(status)] = error
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(body)}
    if open_:
        op["security"] = []
    if params:
        op["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in params
        ]
    return op


def _document(
    title: str, description: str, paths: dict[str, dict[str, Any]], *, token: str
) -> dict[str, Any]:
    """A whole document; `token` says when the bearer token is needed (for `security`)."""
    return {
        "openapi": VERSION,
        "info": {"title": title, "version": "1", "description": description},
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": token}},
        },
        "security": [{"bearer": []}],
    }


def _openapi_op() -> dict[str, Any]:
    return _op("this document (open: shapes only, no secrets)", open_=True)


# the OpenAI request bodies, from the parameter table -------------------------------------------
_TEXT_PART: Schema = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
_MESSAGE: Schema = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string"},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]},
        "name": {"type": "string"},
    },
}
_PENALTY: Schema = {"type": "number", "minimum": -MAX_PENALTY, "maximum": MAX_PENALTY}
_LOGIT_BIAS: Schema = {
    "type": "object",
    "description": '{"token id": bias}',
    "maxProperties": MAX_BIASED_TOKENS,
    "propertyNames": {"pattern": "^[0-9]+$"},
    "additionalProperties": {"type": "number", "minimum": -MAX_BIAS, "maximum": MAX_BIAS},
}
_STOP: Schema = {
    "anyOf": [
        {"type": "string", "maxLength": MAX_STOP_CHARS},
        {"type": "array", "maxItems": MAX_STOPS, "items": {"type": "string", "maxLength": MAX_STOP_CHARS}},
    ]
}
_PROMPT: Schema = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
        {
            "type": "array",
            "minItems": 1,
            "items": {"type": "array", "minItems": 1, "items": {"type": "integer"}},
        },
    ]
}
_TOP_LOGPROBS: Schema = {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS}
_STRING, _BOOL, _INT, _OBJECT = (
    {"type": "string"},
    {"type": "boolean"},
    {"type": "integer"},
    {"type": "object"},
)
_TOOL_CHOICE: Schema = {"anyOf": [{"type": "string"}, {"type": "object"}]}

# The JSON type of each parameter (the table says how it is treated, this says what it looks like).
# A row the table gains without an entry here is documented with its note and no type constraint.
_TYPES: dict[str, Schema] = {
    "model": _STRING,
    "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
    "prompt": _PROMPT,
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "seed": {"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1},
    "stop": _STOP,
    "stream": _BOOL,
    "stream_options": {"type": "object", "properties": {"include_usage": _BOOL}},
    "n": {"type": "integer", "minimum": 1},
    "response_format": {"type": "object", "required": ["type"], "properties": {"type": _STRING}},
    "top_k": {"type": "integer", "minimum": 0},
    "ignore_eos": _BOOL,
    "return_tokens": _BOOL,
    "generated_tokens": {"type": "integer", "minimum": 0},
    "conversation": {"type": "string", "minLength": 1},
    "frequency_penalty": _PENALTY,
    "presence_penalty": _PENALTY,
    "logit_bias": _LOGIT_BIAS,
    "top_logprobs": _TOP_LOGPROBS,
    "echo": _BOOL,
    "suffix": _STRING,
    "best_of": _INT,
    "tools": {"type": "array", "items": _OBJECT},
    "tool_choice": _TOOL_CHOICE,
    "functions": {"type": "array", "items": _OBJECT},
    "function_call": _TOOL_CHOICE,
    "modalities": {"type": "array", "items": _STRING},
    "audio": _OBJECT,
    "reasoning_effort": _STRING,
    "verbosity": _STRING,
    "web_search_options": _OBJECT,
    "user": _STRING,
    "safety_identifier": _STRING,
    "store": _BOOL,
    "metadata": {"type": "object", "additionalProperties": _STRING},
    "service_tier": _STRING,
    "parallel_tool_calls": _BOOL,
    "prediction": _OBJECT,
    "prompt_cache_key": _STRING,
    "prompt_cache_retention": _STRING,
}
# `logprobs` differs by route: chat asks with a boolean, completions with a count.
_ROUTE_TYPES: dict[tuple[str, str], Schema] = {
    ("logprobs", CHAT): _BOOL,
    ("logprobs", COMPLETIONS): _TOP_LOGPROBS,
    # 0 scores the prompt alone, with `echo` (refused without it, saying so)
    ("max_tokens", COMPLETIONS): {"type": "integer", "minimum": 0},
}


def param_schema(key: str, route: str) -> Schema:
    """One row of the parameter table as a JSON schema property."""
    param = PARAMS[key]
    schema: Schema = dict(_ROUTE_TYPES.get((key, route), _TYPES.get(key, {})))
    schema["description"] = param.note
    schema["x-tightwad-treatment"] = param.treatment
    if param.treatment == "refused":
        # Accepted only when it asks for nothing: its neutral values, or null.
        schema = {"description": param.note, "x-tightwad-treatment": "refused"}
        schema["enum"] = [*param.neutral, None]
    return schema


def openai_request_schema(route: str) -> Schema:
    """The body of POST /v1/chat/completions (route "chat") or /v1/completions ("completions")."""
    keys = [key for key, param in PARAMS.items() if route in param.routes]
    return {
        "type": "object",
        "description": f"{ROUTE_PATHS[route]}: every parameter of the table (tightwad.openai.PARAMS); "
        "an unknown one is refused with a 400 that names it",
        "required": ["messages"] if route == CHAT else ["prompt"],
        "properties": {key: param_schema(key, route) for key in keys},
        "additionalProperties": False,
    }


_COMPLETION_REPLY: Schema = {
    "type": "object",
    "description": "the reply (or, with `stream`, server-sent events of chunks ending with [DONE])",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": _STRING,
        "object": _STRING,
        "created": _INT,
        "model": _STRING,
        "choices": {"type": "array", "items": _OBJECT},
        "usage": _OBJECT,
    },
}


def _openai_op(route: str, summary: str, statuses: Iterable[int]) -> dict[str, Any]:
    op = _op(summary, body=openai_request_schema(route), reply=_COMPLETION_REPLY, statuses=statuses)
    op["responses"]["200"]["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    return op


# the verify API ---------------------------------------------------------------------------------
_SAMPLING: Schema = {
    "type": "object",
    "description": "greedy when absent (tightwad.verify_api.Sampling)",
    "properties": {
        "temperature": _TYPES["temperature"],
        "top_k": _TYPES["top_k"],
        "top_p": _TYPES["top_p"],
        "seed": _TYPES["seed"],
        "presence_penalty": _PENALTY,
        "frequency_penalty": _PENALTY,
        "logit_bias": _LOGIT_BIAS,
    },
}
_PROB_ROW: Schema = {
    "anyOf": [
        {"type": "array", "description": "dense: n_vocab floats", "items": {"type": "number", "minimum": 0}},
        {
            "type": "object",
            "description": "sparse: token ids and their probabilities (zero elsewhere)",
            "required": ["ids", "p"],
            "properties": {"ids": _TOKENS, "p": {"type": "array", "items": {"type": "number", "minimum": 0}}},
        },
    ]
}


def verify_request_schema() -> Schema:
    """The body of POST /tightwad/v1/verify (tightwad.verify_api.encode_request)."""
    draft = {
        "type": "object",
        "required": ["tokens"],
        "properties": {"tokens": _TOKENS, "probs": {"type": "array", "items": _PROB_ROW}},
    }
    return {
        "type": "object",
        "description": "one round of speculative decoding: drafts scored in one decode (tightwad.verify_api)",
        "properties": {
            "conversation": _STRING,
            "tokens": _TOKENS,
            "reset": _BOOL,
            "drafts": {"type": "array", "items": draft},
            "sampling": _SAMPLING,
            "generation_start": {"type": "integer", "minimum": 0},
            "logprobs": _TOP_LOGPROBS,
            "grammar": {
                "type": "object",
                "description": "a decoding constraint on the generated text: response_format, tools with "
                "tool_choice and family, or gbnf (tightwad.verify_api)",
            },
        },
    }


VERIFY_REPLY: Schema = {
    "type": "object",
    "required": ["object", "version", "tokens", "n_accepted", "eog", "n_past", "pieces"],
    "properties": {
        "object": {"const": "tightwad.verify"},
        "version": _INT,
        "tokens": _TOKENS,
        "n_accepted": _INT,
        "draft_index": _INT,
        "accepted_per_draft": {"type": "array", "items": _INT},
        "n_past": _INT,
        "eog": _BOOL,
        "pieces": {"type": "array", "items": _STRING},
        "logprobs": {"type": "array", "items": _OBJECT},
    },
}


# the servers -----------------------------------------------------------------------------------
_HEALTH = "open: ok, or a bare error code (503); no details"
_DETAILS = "health with its details, behind the token"
_OPTIONAL_TOKEN = "needed on every route but the open ones when the server has a token (beyond loopback)"


def _generation_paths(statuses: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    return {
        "/v1/models": {"get": _op("the served model, then its aliases")},
        "/v1/models/{model}": {
            "get": _op("one served model or alias", params=["model"], statuses=(404,)),
        },
        "/v1/completions": {"post": _openai_op(COMPLETIONS, "a text completion", statuses)},
        "/v1/chat/completions": {"post": _openai_op(CHAT, "a chat completion", statuses)},
    }


def engine_document() -> dict[str, Any]:
    """The engine (engine/api.py)."""
    statuses = (400, 404, 413, 503)
    tokenize = {
        "type": "object",
        "properties": {
            "content": _STRING,
            "messages": _TYPES["messages"],
            "tools": _TYPES["tools"],  # with messages: shown to the template as the chat would
            "add_special": _BOOL,
            "parse_special": _BOOL,
            "with_pieces": _BOOL,
        },
    }
    detokenize = {
        "type": "object",
        "required": ["tokens"],
        "properties": {"tokens": _TOKENS, "special": _BOOL},
    }
    paths: dict[str, dict[str, Any]] = {
        OPENAPI_PATH: {"get": _openapi_op()},
        "/health": {"get": _op(_HEALTH, open_=True, statuses=(503,))},
        "/ready": {"get": _op("open: 200 once the model serves, else 503", open_=True, statuses=(503,))},
        "/tightwad/v1/health": {"get": _op(_DETAILS, statuses=(503,))},
        **_generation_paths(statuses),
        VERIFY_PATH: {
            "post": _op(
                "score drafts against the target",
                body=verify_request_schema(),
                reply=VERIFY_REPLY,
                statuses=(400, 409, 413, 503),
            )
        },
        STATS_PATH: {"get": _op("counters: decodes, requests per decode, acceptance")},
        "/tokenize": {"post": _op("text or a chat as token ids", body=tokenize, statuses=(400, 413))},
        "/detokenize": {
            "post": _op("token ids as text and base64 pieces", body=detokenize, statuses=(400, 413))
        },
    }
    return _document(
        "Tightwad engine",
        "OpenAI-compatible generation on the target model, and the verify API the proxy speculates with.",
        paths,
        token=_OPTIONAL_TOKEN,
    )


def proxy_document() -> dict[str, Any]:
    """The proxy (proxy/app.py, proxy/routes/)."""
    statuses = (400, 404, 413, 502, 503)
    paths: dict[str, dict[str, Any]] = {
        OPENAPI_PATH: {"get": _openapi_op()},
        "/health": {"get": _op(_HEALTH, open_=True, statuses=(503,))},
        "/ready": {"get": _op("open: 200 once the engine answers, else 503", open_=True, statuses=(503,))},
        "/tightwad/v1/health": {"get": _op(_DETAILS, statuses=(503,))},
        **_generation_paths(statuses),
        "/tightwad/v1/gate/chat/completions": {
            "post": _openai_op(CHAT, "the quality gate: an agent's answer, checked by a reviewer", statuses)
        },
        "/tightwad/v1/stats": {"get": _op("live numbers for `tightwad proxy status`")},
        "/tightwad/v1/events": {"get": _op("the stats once a second (SSE)", media="text/event-stream")},
        "/dashboard": {"get": _op("open: the dashboard page (no data in it)", open_=True, media="text/html")},
        "/metrics": {"get": _op("Prometheus metrics", media="text/plain")},
    }
    return _document(
        "Tightwad proxy",
        "The OpenAI endpoint apps talk to: speculative decoding against the engine, exact output.",
        paths,
        token=_OPTIONAL_TOKEN,
    )


def router_document() -> dict[str, Any]:
    """The engine router (operator/router.py)."""
    route_body = {
        "type": "object",
        "required": ["backend"],
        "properties": {"backend": {"type": "string", "format": "uri"}, "unit": _STRING},
    }
    forward = {
        method: _op(
            "forwarded unchanged to the current engine (whose document is at /openapi.json)",
            open_=True,
            params=["path"],
            statuses=(413, 502, 503),
        )
        for method in ("get", "post", "put", "delete", "patch", "options")
    }
    paths: dict[str, dict[str, Any]] = {
        ROUTER_OPENAPI_PATH: {"get": _openapi_op()},
        "/_tightwad/route": {
            "get": _op("where the router points"),
            "put": _op("re-point the router", body=route_body, statuses=(400, 413)),
        },
        "/_tightwad/health": {"get": _op("open: up, and the open requests per engine unit", open_=True)},
        "/{path}": forward,
    }
    return _document(
        "Tightwad engine router",
        "A stable address in front of an engine that the operator can swap.",
        paths,
        token="needed for /_tightwad/route when TIGHTWAD_TOKEN is set; forwarded requests carry the engine's",
    )


def agent_document() -> dict[str, Any]:
    """The operator's agent API (operator/agent_api.py)."""
    report = {
        "type": "object",
        "properties": {
            "units": {"type": "array", "items": _OBJECT},
            "models": {"type": "array", "items": _OBJECT},
        },
    }
    paths: dict[str, dict[str, Any]] = {
        OPENAPI_PATH: {"get": _openapi_op()},
        "/v1/manifest": {"get": _op("the manifest in force", statuses=(503,))},
        "/v1/observed": {"get": _op("every unit and model check of the last pass")},
        "/v1/hosts/{host}/report": {
            "post": _op(
                "an agent's units and model checks", body=report, params=["host"], statuses=(400, 404)
            )
        },
    }
    return _document(
        "Tightwad agent API",
        "What `tightwad agent` reads from the operator and reports back to it.",
        paths,
        token="always needed (the manifest is served here)",
    )


def swarm_document() -> dict[str, Any]:
    """The swarm peer (swarm/server.py)."""
    api = "/swarm/v1"
    sha = ["sha256"]
    announce = {
        "type": "object",
        "required": ["sha256", "url"],
        "properties": {"sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}, "url": _STRING},
    }
    data = _op(
        "the bytes; `Range: bytes=A-B` for pieces (206)",
        media="application/octet-stream",
        params=sha,
        statuses=(404, 416),
    )
    data["parameters"].append({"name": "Range", "in": "header", "required": False, "schema": _STRING})
    paths: dict[str, dict[str, Any]] = {
        OPENAPI_PATH: {"get": _openapi_op()},
        f"{api}/health": {"get": _op("open: the node is up", open_=True)},
        f"{api}/files": {"get": _op("what this node holds or is fetching")},
        f"{api}/files/{{sha256}}/manifest": {"get": _op("the piece manifest", params=sha, statuses=(404,))},
        f"{api}/files/{{sha256}}/have": {
            "get": _op("which pieces this node offers", params=sha, statuses=(404,))
        },
        f"{api}/files/{{sha256}}/data": {"get": data},
        f"{api}/files/{{sha256}}/peers": {"get": _op("tracker: peers that announced the file", params=sha)},
        f"{api}/announce": {"post": _op("tracker: a peer holds a file", body=announce, statuses=(400, 404))},
        f"{api}/status": {"get": _op("what the node is doing")},
    }
    return _document(
        "Tightwad swarm peer",
        "Model files by SHA-256 between peers: manifests, have-maps, piece bytes, and a tracker.",
        paths,
        token="needed on every route but health when the node has one",
    )


# serving and checking ---------------------------------------------------------------------------
def route(document: dict[str, Any], path: str = OPENAPI_PATH) -> Route:
    """GET `path`: the document (built once; it never changes while the server runs)."""

    async def serve(request: Request) -> Response:
        return JSONResponse(document)

    return Route(path, serve, methods=["GET"])


def operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(path, METHOD) of every operation the document describes."""
    return {
        (path, method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method in _METHODS
    }


_CONVERTER = re.compile(r"\{(\w+):\w+\}")


def app_operations(routes: Iterable[BaseRoute]) -> set[tuple[str, str]]:
    """(path, METHOD) of every route a Starlette app serves, in the document's spelling: converters
    dropped (`{model:path}` is `{model}`), and HEAD left out where Starlette adds it to a GET."""
    found: set[tuple[str, str]] = set()
    for item in routes:
        if not isinstance(item, Route):
            raise TypeError(f"{item!r}: only plain routes are documented")
        methods = set(item.methods or {"GET"})
        if "GET" in methods:
            methods.discard("HEAD")
        found |= {(_CONVERTER.sub(r"{\1}", item.path), method) for method in methods}
    return found
