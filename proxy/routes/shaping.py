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
from tightwad.logprobs import LogprobShape, Piece, attach
from tightwad.proxy.replies import ReplyDelta
from tightwad.proxy.request_parsing import Params
from tightwad.verify_api import TokenLogprob


@dataclass(frozen=True)
class ReplyShape:
    """One reply's shared fields (tightwad.openai.ReplyShape), and what the request asked to see."""

    reply: openai.ReplyShape
    return_tokens: bool
    include_usage: bool
    logprobs: LogprobShape | None = None  # when the request asked for logprobs

    @staticmethod
    def of(params: Params, model: str, chat: bool, piece: Piece | None = None) -> ReplyShape:
        shaper = LogprobShape(chat, piece) if params.logprobs is not None and piece is not None else None
        return ReplyShape(openai.ReplyShape(chat, model), params.return_tokens, params.include_usage, shaper)

    @property
    def chat(self) -> bool:
        return self.reply.chat

    def body(
        self,
        text: str,
        tokens: list[int],
        finish: str | None,
        n_prompt: int,
        n_completion: int,
        logprobs: list[TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        """The whole reply, not streamed."""
        returned = tokens if self.return_tokens else None
        body = self.reply.body(text, finish, openai.usage(n_prompt, n_completion), returned)
        return self._with_logprobs(body, logprobs or [])

    def _with_logprobs(self, reply: dict[str, Any], entries: list[TokenLogprob]) -> dict[str, Any]:
        return attach(reply, self.logprobs.shape(entries)) if self.logprobs is not None else reply

    def chunk(self, delta: ReplyDelta | None, finish: str | None, role: bool = False) -> str:
        """One stream event: a delta, the role announcement (chat) or the finish reason. With
        stream_options.include_usage every chunk carries `usage: null` until the last one."""
        text = delta.text if delta is not None else ("" if role else None)
        tokens = (delta.tokens if delta else []) if self.return_tokens else None
        out = self.reply.chunk(text, finish, role=role, tokens=tokens, with_usage=self.include_usage)
        if delta is not None:
            out = self._with_logprobs(out, delta.logprobs or [])
        return json.dumps(out)

    def usage_chunk(self, n_prompt: int, n_completion: int) -> str:
        """The last event before [DONE] when the request asked for stream_options.include_usage."""
        return json.dumps(self.reply.usage_chunk(openai.usage(n_prompt, n_completion)))
