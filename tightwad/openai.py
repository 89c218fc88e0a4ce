"""OpenAI API shapes shared by Tightwad's HTTP servers: errors, request fields, replies. Pure, no I/O.

Every error a client sees is `{"error": {"message", "type", "param", "code"}}` with a real HTTP
status, the way OpenAI answers; a streamed reply that fails after its first byte ends with one SSE
event of that same shape (never with silence). `tightwad.http` turns exceptions into that body.

A completion is shaped here once (`ReplyShape`), for the engine's own decoding and for the proxy's
speculative one alike: the same choices, chunks and usage, so a client cannot tell which answered.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from tightwad.errors import TightwadError


def error_body(
    message: str, type_: str = "server_error", code: str = "internal_error", param: str | None = None
) -> dict[str, Any]:
    """The one error shape every Tightwad server answers with."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_message(body: Any) -> str:
    """The message of an error body of ours (or of anything else, as best we can)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return str(error if error is not None else body)


class OpenAIError(TightwadError):
    """An error that knows its HTTP status and its OpenAI `type`/`code`."""

    status = 500
    type = "server_error"
    code = "internal_error"
    param: str | None = None
    retry_after: int | None = None  # seconds; sent as the Retry-After header (503/429)

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        type_: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        if retry_after is not None:
            self.retry_after = max(1, int(retry_after))
        if status is not None:
            self.status = status
            if type_ is None and type(self) is OpenAIError:
                # A plain error with a 4xx status is the client's to fix: say so in its type.
                self.type = "invalid_request_error" if status < 500 else "server_error"
        if code is not None:
            self.code = code
        if type_ is not None:
            self.type = type_
        if param is not None:
            self.param = param

    def to_json(self) -> dict[str, Any]:
        return error_body(str(self), self.type, self.code, self.param)

    def headers(self) -> dict[str, str]:
        """HTTP headers that go with it: Retry-After when the server says when to come back (the
        openai SDK and most HTTP clients wait that long before retrying a 503 or 429)."""
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class InvalidRequest(OpenAIError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(OpenAIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(OpenAIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(OpenAIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class Unavailable(OpenAIError):
    """A backend the request needs is down or not ready: retrying later can work."""

    status = 503
    type = "server_error"
    code = "service_unavailable"


def parse_retry_after(value: str | None) -> int | None:
    """A Retry-After header in seconds (the HTTP-date form is not used by Tightwad's servers)."""
    try:
        return max(1, int(float(value))) if value else None
    except ValueError:
        return None


class UpstreamError(OpenAIError):
    """A backend answered with something we cannot use."""

    status = 502
    type = "server_error"
    code = "bad_gateway"


def from_upstream(status: int, body: Any, fallback: str) -> OpenAIError:
    """An error a backend answered with, kept as it said it (message, type, code, status)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        type_ = str(error.get("type") or ("invalid_request_error" if status < 500 else "server_error"))
        code = str(error.get("code") or "upstream_error")
        param = error.get("param") if isinstance(error.get("param"), str) else None
        return OpenAIError(error["message"], status=status, code=code, type_=type_, param=param)
    return UpstreamError(f"{fallback} (HTTP {status})", status=502 if status < 500 else status)


# request fields --------------------------------------------------------------------------------
_MISSING: Any = object()


def get_field(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """`body[key]` checked against `kind` (an int is a float; a boolean is only a bool), or `default`
    when absent or null; InvalidRequest names the field otherwise. No default: the field is required."""
    value = body.get(key)
    if value is None:
        if default is _MISSING:
            raise InvalidRequest(f"`{key}` is required", param=key)
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and kind is not bool:
        raise InvalidRequest(f"`{key}` must be {getattr(kind, '__name__', kind)}, not a boolean", param=key)
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InvalidRequest(f"`{key}` must be {name}, got {type(value).__name__}", param=key)
    return value


def token_list(value: Any, where: str) -> list[int]:
    """A JSON list of token ids, or InvalidRequest naming `where`."""
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidRequest(f"`{where}` must be a list of token ids (integers)")
    return value


# the parameter table ---------------------------------------------------------------------------
# Every request parameter is honoured, refused with a 400 that names it, or ignored because it
# cannot change a reply. One the table does not know is refused too: a new OpenAI option must never
# go silently unheeded. The engine and the proxy both check bodies with `check_params`.
Treatment = Literal["honoured", "refused", "ignored"]
CHAT, COMPLETIONS = "chat", "completions"
ROUTE_PATHS = {CHAT: "/v1/chat/completions", COMPLETIONS: "/v1/completions"}


@dataclass(frozen=True)
class Param:
    """How this server treats one request parameter."""

    treatment: Treatment
    note: str  # honoured: what it does here; refused: why, and what to do; ignored: why it is harmless
    routes: tuple[str, ...] = (CHAT, COMPLETIONS)
    neutral: tuple[Any, ...] = ()  # values that ask for nothing: accepted even when refused (null always)
    speculated: bool = True  # False: the proxy passes a request with a non-neutral value to the engine


def _honoured(note: str, *, speculated: bool, **kw: Any) -> Param:
    # `speculated` has no default: whoever makes a parameter honoured says whether the proxy's loop
    # serves it too, or the request must pass through to the engine.
    return Param("honoured", note, speculated=speculated, **kw)


def _refused(note: str, neutral: tuple[Any, ...], **kw: Any) -> Param:
    return Param("refused", note, neutral=neutral, speculated=False, **kw)


def _ignored(note: str, **kw: Any) -> Param:
    return Param("ignored", note, **kw)


_NOT_YET = "is not supported by this server yet"
_LEGACY_FUNCTIONS = "the deprecated function-calling API: send `tools` and `tool_choice` instead"

PARAMS: dict[str, Param] = {
    # what a request is
    "model": _honoured(
        "the served model or one of its aliases (else 404 model_not_found); absent: the served model",
        speculated=True,
    ),
    "messages": _honoured(
        "rendered with the model's own chat template; text content only", routes=(CHAT,), speculated=True
    ),
    "prompt": _honoured(
        "a string, a list of strings (one choice each, in order), a list of token ids, or a list of lists",
        routes=(COMPLETIONS,),
        speculated=True,  # a list of several prompts passes through (request_parsing.passthrough_reason)
    ),
    # how much, how, and how many
    "max_tokens": _honoured("tokens to generate at most", speculated=True),
    "max_completion_tokens": _honoured("the same as max_tokens (OpenAI's newer name)", speculated=True),
    "temperature": _honoured("0 is greedy", speculated=True),
    "top_p": _honoured("nucleus sampling", speculated=True),
    "seed": _honoured("a reproducible random stream (any 64-bit integer)", speculated=True),
    "stop": _honoured("up to 16 sequences; the text ends before the first one", speculated=True),
    "stream": _honoured("server-sent events, `[DONE]` last", speculated=True),
    "stream_options": _honoured("`include_usage`: a last chunk with the token counts", speculated=True),
    "n": _honoured(
        "several choices; sampled ones use distinct seeds derived from `seed`, greedy ones are identical",
        neutral=(1,),
        speculated=False,
    ),
    "response_format": _honoured(
        "`text`; `json_object` (a JSON object) and `json_schema` (that schema, `strict` or not) are "
        "enforced by a grammar on the target's distribution, speculated exactly",
        neutral=({"type": "text"},),
        speculated=True,
    ),
    # tools: rendered by the model's own chat template, calls parsed out of its reply
    "tools": _honoured(
        "function tools, given to the model's chat template; its calls come back in `tool_calls` "
        "(Hermes/Qwen, Llama 3, Mistral formats); a template without tools is a 400",
        routes=(CHAT,),
        neutral=([],),
        speculated=True,
    ),
    "tool_choice": _honoured(
        "`none`, `auto`, `required` or a named function; required and named are enforced by a grammar",
        routes=(CHAT,),
        neutral=("none", "auto"),
        speculated=True,
    ),
    "parallel_tool_calls": _honoured(
        "false: at most one call per reply", routes=(CHAT,), neutral=(True,), speculated=True
    ),
    # Tightwad's and llama.cpp's extensions
    "top_k": _honoured("extension: sample among the k likeliest tokens (0: off)", speculated=True),
    "ignore_eos": _honoured(
        "extension: keep generating past end-of-generation", neutral=(False,), speculated=False
    ),
    "return_tokens": _honoured(
        "extension: the generated token ids beside the text in each choice", speculated=True
    ),
    "grammar": _honoured(
        "extension: a decoding constraint in the verify API's form (`response_format`, a required "
        "call's `tools` / `tool_choice` / `family`, or `gbnf`); the proxy's target-alone decoding "
        "sends a required call's grammar this way",
        routes=(COMPLETIONS,),
        speculated=False,
    ),
    "generated_tokens": _honoured(
        "extension: how many of the prompt's last tokens were generated (penalties count them)",
        speculated=False,
    ),
    "conversation": _honoured(
        "extension: decode on this named conversation's KV sequence (its common prefix reused, kept "
        "afterwards for the verify API) instead of an anonymous one; the proxy's target-alone decoding",
        routes=(COMPLETIONS,),
        speculated=False,
    ),
    # shaping and logprobs: the target's, identical with and without speculation (engine/verify.py)
    "frequency_penalty": _honoured(
        "OpenAI's: minus the penalty per occurrence in the generated text", speculated=True
    ),
    "presence_penalty": _honoured(
        "OpenAI's: minus the penalty once for a token in the generated text", speculated=True
    ),
    "logit_bias": _honoured("{token id: -100..100} added to the logits", speculated=True),
    "logprobs": _honoured(
        "chat: true for choices[].logprobs.content; completions: 0..20 alternatives (with echo, the "
        "prompt's tokens too)",
        speculated=True,
    ),
    "top_logprobs": _honoured(
        "chat: 0..20 alternatives per token, with logprobs: true", routes=(CHAT,), speculated=True
    ),
    "echo": _honoured(
        "the prompt's text before the reply's; with logprobs the prompt is scored (its first token "
        "null); max_tokens 0 with it: the prompt alone",
        neutral=(False,),
        speculated=False,
        routes=(COMPLETIONS,),
    ),
    # refused: they would change the output if ignored
    "suffix": _refused(
        f"{_NOT_YET} (no fill-in-the-middle): leave it out", neutral=("",), routes=(COMPLETIONS,)
    ),
    "best_of": _refused(f"{_NOT_YET}: use n instead, and pick yourself", neutral=(1,), routes=(COMPLETIONS,)),
    "functions": _refused(_LEGACY_FUNCTIONS, neutral=([],), routes=(CHAT,)),
    "function_call": _refused(_LEGACY_FUNCTIONS, neutral=("none", "auto"), routes=(CHAT,)),
    "modalities": _refused('only text is generated: send ["text"] or leave it out', neutral=(["text"],)),
    "audio": _refused("only text is generated: leave `audio` out", neutral=()),
    "reasoning_effort": _refused("this model has no reasoning modes: leave it out", neutral=()),
    "verbosity": _refused(f"{_NOT_YET}: ask for the length in the prompt", neutral=()),
    "web_search_options": _refused("this server cannot search the web: leave it out", neutral=()),
    # ignored: they cannot change the reply
    "user": _ignored("an end-user id for abuse monitoring; no effect on the reply"),
    "safety_identifier": _ignored("an end-user id for abuse monitoring; no effect on the reply"),
    "store": _ignored("nothing is stored; the reply is the same"),
    "metadata": _ignored("tags for stored completions; nothing is stored"),
    "service_tier": _ignored("this server has one tier"),
    "prediction": _ignored("OpenAI uses a predicted output only to answer faster; the reply is the same"),
    "prompt_cache_key": _ignored("a caching hint; the engine keeps each conversation's KV cache anyway"),
    "prompt_cache_retention": _ignored(
        "a caching hint; the engine keeps each conversation's KV cache anyway"
    ),
}

_FORMATS = ("text", "json_object", "json_schema")


def is_neutral(param: Param, value: Any) -> bool:
    """Whether `value` asks for nothing beyond the default (null always does)."""
    return value is None or any(_same(value, n) for n in param.neutral)


def _same(value: Any, neutral: Any) -> bool:
    # A boolean is not a number here: `logprobs: true` must not pass for the neutral 1 of `n`.
    if isinstance(value, bool) != isinstance(neutral, bool):
        return False
    return bool(value == neutral)


def check_params(body: dict[str, Any], route: str) -> None:
    """Refuse, with a 400 naming the field, any parameter this server would not heed: one it does
    not know, one of the other route, or a refused one with a value that asks for something."""
    for key, value in body.items():
        param = PARAMS.get(key)
        if param is None:
            raise InvalidRequest(
                f"unknown parameter `{key}` for {ROUTE_PATHS[route]}: this server does not know what it "
                "asks for and will not ignore it; remove it",
                param=key,
                code="unknown_parameter",
            )
        if route not in param.routes:
            other = ROUTE_PATHS[param.routes[0]]
            raise InvalidRequest(
                f"`{key}` is a parameter of {other}, not of {ROUTE_PATHS[route]}",
                param=key,
                code="unknown_parameter",
            )
        if key == "response_format":
            _check_response_format(value)
        elif key == "grammar" and value is not None and not isinstance(value, dict):
            raise InvalidRequest(
                '`grammar` here is an object in the verify API\'s form (`{"gbnf": "..."}` for GBNF), '
                "not llama.cpp's string",
                param="grammar",
            )
        elif param.treatment == "refused" and not is_neutral(param, value):
            raise InvalidRequest(f"`{key}` {_refusal(param.note)}", param=key, code="unsupported_parameter")


def _refusal(note: str) -> str:
    return note if note.startswith(_NOT_YET) else f"is refused: {note}"


def _check_response_format(value: Any) -> None:
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in _FORMATS:
        raise InvalidRequest(
            f"`response_format` must be an object whose `type` is one of {', '.join(_FORMATS)}, "
            f"got {json.dumps(value)[:60]}",
            param="response_format",
        )
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidRequest(
                "`response_format.json_schema` must be an object with a string `name` and a `schema`",
                param="response_format.json_schema",
            )
        if not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequest(
                "`response_format.json_schema.schema` must be a JSON Schema object",
                param="response_format.json_schema.schema",
            )
        if not isinstance(spec.get("strict", False), bool | None):
            raise InvalidRequest(
                "`response_format.json_schema.strict` must be true or false",
                param="response_format.json_schema.strict",
            )


def constraint_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """The decoding constraint a request asks for (the verify API's `grammar`): a JSON
    `response_format`, or None. (A required tool call adds its own, where tools are rendered.)"""
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        return {"response_format": response_format}
    grammar = body.get("grammar")  # the extension (/v1/completions): already in the verify API's form
    if grammar is not None:
        if not isinstance(grammar, dict):
            raise InvalidRequest("`grammar` must be an object, as the verify API takes it", param="grammar")
        return grammar
    return None


def serves_grammar(models_body: Any) -> bool:
    """Whether an engine's `/v1/models` says it takes the verify API's `grammar`."""
    data = models_body.get("data") if isinstance(models_body, dict) else None
    meta = data[0].get("meta") if isinstance(data, list) and data and isinstance(data[0], dict) else None
    return isinstance(meta, dict) and meta.get("grammar") is True


def passthrough_keys() -> tuple[str, ...]:
    """Parameters the proxy's speculation loop does not serve: a request with another value than
    their neutral one goes to the engine, which honours or refuses it."""
    return tuple(k for k, p in PARAMS.items() if not p.speculated)


# model names -----------------------------------------------------------------------------------
class ModelNotFound(NotFound):
    code = "model_not_found"
    param = "model"


def served_names(models_body: Any) -> tuple[str, ...]:
    """The names a `/v1/models` answer of ours serves: every entry's id and its `meta.aliases`."""
    names: list[str] = []
    for entry in models_body.get("data", []) if isinstance(models_body, dict) else []:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            names.append(entry["id"])
            meta = entry.get("meta")
            if isinstance(meta, dict) and isinstance(meta.get("aliases"), list):
                names += [a for a in meta["aliases"] if isinstance(a, str)]
    return tuple(dict.fromkeys(names))


def check_model(body: dict[str, Any], names: tuple[str, ...]) -> None:
    """404 model_not_found unless `model` is absent or one of `names` (the served model first)."""
    model = body.get("model")
    if model is None or model in names:
        return
    if not isinstance(model, str):
        raise InvalidRequest("`model` must be a string", param="model")
    raise ModelNotFound(
        f"The model `{model}` does not exist here: this server serves {', '.join(names)} "
        "(send one of those, leave `model` out, or add the name to spec.target.aliases)"
    )


# replies ---------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    """`chatcmpl-...` / `cmpl-...`: unique per response."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class ReplyShape:
    """One completion's identity (id, created, model) and kind (chat or text); it makes the reply's
    body, or its stream chunks. `tokens`, when given, is Tightwad's `return_tokens` extension."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=now)

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", new_id("chatcmpl" if self.chat else "cmpl"))

    @property
    def base(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model}

    def body(
        self, text: str, finish_reason: str | None, usage: dict[str, int], tokens: list[int] | None = None
    ) -> dict[str, Any]:
        """The whole reply, not streamed."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update({"text": text, "logprobs": None})
        if tokens is not None:
            choice["tokens"] = tokens
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self.base, "object": obj, "choices": [choice], "usage": usage}

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        *,
        role: bool = False,
        tokens: list[int] | None = None,
        with_usage: bool = False,
        usage: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """One stream event. A chat's first chunk carries the role; `text` None adds no content (a
        chat's final chunk). `with_usage` puts `usage` (null until the end) on the chunk."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice.update({"text": text or "", "logprobs": None})
        if tokens is not None:
            choice["tokens"] = tokens
        out: dict[str, Any] = {**self.base, "object": self._chunk_object, "choices": [choice]}
        if with_usage:
            out["usage"] = usage
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        """The stream's last event when the client asked for usage: no choices, only the counts."""
        return {**self.base, "object": self._chunk_object, "choices": [], "usage": usage}

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"
