"""OpenAI API shapes shared by Tightwad's HTTP servers: errors, ids, and usage. Pure, no I/O.

Every error a client sees is `{"error": {"message", "type", "code"}}` with a real HTTP status, the
way OpenAI answers; a streamed reply that fails after its first byte ends with one SSE event of that
same shape (never with silence).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from tightwad.errors import TightwadError


def error_body(message: str, type_: str = "server_error", code: str = "internal_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


class OpenAIError(TightwadError):
    """An error that knows its HTTP status and its OpenAI `type`/`code`."""

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code

    def to_json(self) -> dict[str, Any]:
        return error_body(str(self), self.type, self.code)


class InvalidRequest(OpenAIError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(OpenAIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


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
        exc = OpenAIError(error["message"], status=status, code=str(error.get("code") or "upstream_error"))
        exc.type = str(error.get("type") or ("invalid_request_error" if status < 500 else "server_error"))
        return exc
    return UpstreamError(f"{fallback} (HTTP {status})", status=502 if status < 500 else status)


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
