"""OpenAI API shapes shared by Tightwad's HTTP servers: errors, request fields, replies. Pure, no I/O.

Every error a client sees is `{"error": {"message", "type", "param", "code"}}` with a real HTTP
status, the way OpenAI answers; a streamed reply that fails after its first byte ends with one SSE
event of that same shape (never with silence). `tightwad.http` turns exceptions into that body.

A completion is shaped here once (`ReplyShape`), for the engine's own decoding and for the proxy's
speculative one alike: the same choices, chunks and usage, so a client cannot tell which answered.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

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

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        type_: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
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
