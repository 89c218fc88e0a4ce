"""A generated reply written the OpenAI way: one `text_completion` / `chat.completion` body, or the
chunks of a stream (`text_completion` / `chat.completion.chunk`), with `usage` and, when the
request asked for `return_tokens`, the token ids beside the text. Pure: JSON in, JSON out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tightwad.openai import new_id, now, usage
from tightwad.proxy.replies import ReplyDelta
from tightwad.proxy.request_parsing import Params


@dataclass(frozen=True)
class ReplyShape:
    """The fields every body and chunk of one reply share, and what the request asked to see."""

    chat: bool
    base: dict[str, Any]  # id, created, model
    return_tokens: bool
    include_usage: bool

    @staticmethod
    def of(params: Params, model: str, chat: bool) -> ReplyShape:
        base = {"id": new_id("chatcmpl" if chat else "cmpl"), "created": now(), "model": model}
        return ReplyShape(chat, base, params.return_tokens, params.include_usage)

    def body(
        self, text: str, tokens: list[int], finish: str | None, n_prompt: int, n_completion: int
    ) -> dict[str, Any]:
        """The whole reply, not streamed."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update({"text": text, "logprobs": None})
        if self.return_tokens:
            choice["tokens"] = tokens
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self.base, "object": obj, "choices": [choice], "usage": usage(n_prompt, n_completion)}

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def chunk(self, delta: ReplyDelta | None, finish: str | None, role: bool = False) -> str:
        """One stream event: a delta, the role announcement (chat) or the finish reason."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if self.chat:
            body: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if delta is not None:
                body["content"] = delta.text
            choice["delta"] = body
        else:
            choice.update({"text": delta.text if delta else "", "logprobs": None})
        if self.return_tokens:
            choice["tokens"] = delta.tokens if delta else []
        out = {**self.base, "object": self.chunk_object, "choices": [choice]}
        if self.include_usage:
            out["usage"] = None  # OpenAI's stream_options.include_usage: null until the last chunk
        return json.dumps(out)

    def usage_chunk(self, n_prompt: int, n_completion: int) -> str:
        """The last event before [DONE] when the request asked for stream_options.include_usage."""
        out = {
            **self.base,
            "object": self.chunk_object,
            "choices": [],
            "usage": usage(n_prompt, n_completion),
        }
        return json.dumps(out)
