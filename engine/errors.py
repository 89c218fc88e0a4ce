"""Errors the engine answers with: OpenAI-shaped (tightwad.openai), each with its status and code.

The verify API's own errors (ConversationEvicted) belong to its contract, tightwad.verify_api."""

from __future__ import annotations

from tightwad.openai import InvalidRequest, OpenAIError, Unavailable


class EngineError(OpenAIError):
    code = "engine_error"


class BadRequest(EngineError, InvalidRequest):
    code = "invalid_request"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class Overloaded(EngineError, Unavailable):
    """No room in the KV cache right now (too many long conversations at once)."""

    code = "kv_cache_full"


class PoolFailure(EngineError, Unavailable):
    """An rpc worker is gone (or libggml hit a fatal error): the engine cannot compute any more."""

    code = "worker_lost"


class EngineStopped(EngineError, Unavailable):
    code = "engine_stopped"


class QueueFull(EngineError, Unavailable):
    """Every conversation sequence is busy and the waiting queue is full: come back after
    Retry-After seconds (the openai SDK does so by itself)."""

    code = "queue_full"


class QueueTimeout(EngineError, Unavailable):
    """A request waited longer than --queue-timeout for a conversation sequence and never started."""

    code = "queue_timeout"
