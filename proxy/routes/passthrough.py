"""A request sent to the engine unchanged: whatever speculation cannot serve (tools, n > 1,
logprobs, ...: see ../request_parsing.py), and everything in mode passthrough.

Sent unchanged but for one thing: under limits.maxTokens a request that names no token count gets
the limit as `max_tokens`. The engine's status, headers and body come back as they arrive. An
engine that breaks mid-reply ends a streamed reply with one `data: {"error": ...}` event instead of
going silent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tightwad.openai import OpenAIError, error_body
from tightwad.proxy.request_parsing import token_counts
from tightwad.proxy.state import Proxy


async def pass_through(
    proxy: Proxy, request: Request, raw: bytes, body: dict[str, Any], route: str
) -> Response:
    """Forward `request` (its body already read: `raw`, parsed: `body`) to the same path on the
    engine. Under limits.maxTokens the token counts are checked here too (a passed-through request
    must not generate more than a sped-up one), and a request that names none gets the limit."""
    limit = proxy.config.max_tokens
    if limit is not None and not token_counts(body, limit):
        raw = json.dumps({**body, "max_tokens": limit}).encode()
    proxy.telemetry.request(route, "passthrough")
    proxy.remember(route, "passthrough", 0, None)
    try:
        head, chunks = await proxy.engine.forward(
            request.method, request.url.path, raw, dict(request.headers)
        )
    except OpenAIError as exc:
        proxy.engine_failed(exc)
        raise
    media = head.headers.get("content-type", "application/json")

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as exc:  # the engine broke mid-reply: say so, never go silent
            if "event-stream" in media:
                message = f"the engine stopped mid-reply: {type(exc).__name__}: {exc}"
                event = json.dumps(error_body(message, "server_error", "engine_failed"))
                yield f"data: {event}\n\n".encode()

    return StreamingResponse(relay(), status_code=head.status_code, media_type=media)
