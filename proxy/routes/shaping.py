"""A generated reply written the OpenAI way: one `text_completion` / `chat.completion` body, or the
chunks of a stream (`text_completion` / `chat.completion.chunk`), with `usage` and, when the
request asked for `return_tokens`, the token ids beside the text. The shapes themselves are
tightwad.openai.ReplyShape, the engine's too; this adds what the request asked to see.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tightwad import openai
from tightwad.proxy.replies import ReplyDelta
from tightwad.proxy.request_parsing import Params


@dataclass(frozen=True)
class ReplyShape:
    """One reply's shared fields (tightwad.openai.ReplyShape), and what the request asked to see."""

    reply: openai.ReplyShape
    return_tokens: bool
    include_usage: bool

    @staticmethod
    def of(params: Params, model: str, chat: bool) -> ReplyShape:
        return ReplyShape(openai.ReplyShape(chat, model), params.return_tokens, params.include_usage)

    @property
    def chat(self) -> bool:
        return self.reply.chat

    def body(
        self, text: str, tokens: list[int], finish: str | None, n_prompt: int, n_completion: int
    ) -> dict[str, Any]:
        """The whole reply, not streamed."""
        returned = tokens if self.return_tokens else None
        return self.reply.body(text, finish, openai.usage(n_prompt, n_completion), returned)

    def chunk(self, delta: ReplyDelta | None, finish: str | None, role: bool = False) -> str:
        """One stream event: a delta, the role announcement (chat) or the finish reason. With
        stream_options.include_usage every chunk carries `usage: null` until the last one."""
        text = delta.text if delta is not None else ("" if role else None)
        tokens = (delta.tokens if delta else []) if self.return_tokens else None
        out = self.reply.chunk(text, finish, role=role, tokens=tokens, with_usage=self.include_usage)
        return json.dumps(out)

    def usage_chunk(self, n_prompt: int, n_completion: int) -> str:
        """The last event before [DONE] when the request asked for stream_options.include_usage."""
        return json.dumps(self.reply.usage_chunk(openai.usage(n_prompt, n_completion)))
