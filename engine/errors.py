"""Errors the engine answers with: each knows its HTTP status and OpenAI error type/code."""

from __future__ import annotations

from tightwad.errors import TightwadError


class EngineError(TightwadError):
    status = 500
    type = "server_error"
    code = "engine_error"

    def to_json(self) -> dict[str, object]:
        return {"error": {"message": str(self), "type": self.type, "code": self.code}}


class BadRequest(EngineError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class ConversationEvicted(EngineError):
    status = 409
    type = "invalid_request_error"
    code = "conversation_evicted"


class Overloaded(EngineError):
    """No room in the KV cache right now (too many long conversations at once)."""

    status = 503
    code = "kv_cache_full"


class PoolFailure(EngineError):
    """An rpc worker is gone (or libggml hit a fatal error): the engine cannot compute any more."""

    status = 503
    code = "worker_lost"


class EngineStopped(EngineError):
    status = 503
    code = "engine_stopped"
