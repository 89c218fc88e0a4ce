"""POST /tightwad/v1/gate/chat/completions: the quality gate (../gate.py) as an OpenAI chat route.

An agent answers, the reviewer approves, corrects or rejects; the answer is whole before the first
byte, so a streamed reply is that answer in small chunks. Same token, body limit and max_tokens
limit as every route; the verdict is in the `X-Tightwad-Gate-Verdict` header and `tightwad_gate`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tightwad.openai import OpenAIError, new_id, now
from tightwad.proxy.request_parsing import parse_messages, read_body, token_counts
from tightwad.proxy.state import Proxy

GATE_PARAMS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed")
PIECE_CHARS = 16  # characters per streamed chunk of a gated answer


class GateRoutes:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def gate_chat(self, request: Request) -> Response:
        proxy = self.proxy
        if proxy.gate is None:
            raise OpenAIError(
                "the quality gate is not configured: enable spec.gate in the manifest", status=404
            )
        _, body = await read_body(request, proxy.config.max_body_bytes)
        messages = parse_messages(body)
        params = {k: body[k] for k in GATE_PARAMS if body.get(k) is not None}
        # Both token-count fields, typed and under the limit; none named: the limit caps the answer.
        limit = proxy.config.max_tokens
        if not token_counts(body, limit) and limit is not None:
            params["max_tokens"] = limit
        proxy.telemetry.request("gate", "gate")
        proxy.remember("gate", "gate", len(messages), params.get("max_tokens"))
        try:
            answer = await proxy.gate.answer(messages, params)
        except OpenAIError as exc:
            proxy.telemetry.error(exc.code)
            raise
        meta = {"verdict": answer.verdict, "agent": answer.agent, "cached": answer.cached}
        headers = {"X-Tightwad-Gate-Verdict": answer.verdict}
        base = {"id": new_id("chatcmpl"), "created": now(), "model": "tightwad-gate", "tightwad_gate": meta}
        if body.get("stream"):

            async def events() -> AsyncIterator[str]:
                chunk = {**base, "object": "chat.completion.chunk"}
                yield json.dumps(
                    {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
                )
                for piece in _pieces(answer.text):
                    yield json.dumps({**chunk, "choices": [{"index": 0, "delta": {"content": piece}}]})
                yield json.dumps({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                yield "[DONE]"

            return EventSourceResponse(events(), ping=15, headers=headers)
        message = {"role": "assistant", "content": answer.text}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return JSONResponse({**base, "object": "chat.completion", "choices": [choice]}, headers=headers)


def _pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """The reviewed answer in small pieces for streaming (it is whole before the first byte)."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]
