"""Log-probabilities in OpenAI's shapes, for the engine's own replies and the proxy's alike. Pure.

What a request asks for (`requested`):
  chat          `logprobs: true` (+ `top_logprobs: 0..20`) -> choices[].logprobs.content[], one entry per
                token: {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}
  completions   `logprobs: 0..20` (legacy) -> choices[].logprobs: {tokens, token_logprobs,
                top_logprobs: [{token: logprob}], text_offset}
The count is how many alternatives each token lists beside its own logprob.

The numbers are the target's, at each emitted token: log-softmax of its logits after `logit_bias`
and the penalties, at temperature 1, before top-k/top-p (so greedy replies get useful numbers too);
see tightwad/verify_api.py. End-of-generation tokens produce no text and get no entry, as OpenAI.
`echo` with logprobs also scores the prompt: its tokens come first, the first with a null logprob
(the engine's, engine/api.py; the proxy passes such requests through).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tightwad.openai import InvalidRequest
from tightwad.verify_api import MAX_TOP_LOGPROBS, TokenLogprob, check_top_logprobs

Piece = Callable[[int], bytes]  # a token id -> its bytes


def _int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"`{key}` must be an integer from 0 to {MAX_TOP_LOGPROBS}", param=key)
    return check_top_logprobs(value, key)


def requested(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives per token the request asks for; None: no logprobs. InvalidRequest
    names the field that is wrong."""
    if chat:
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise InvalidRequest("`logprobs` must be true or false on /v1/chat/completions", param="logprobs")
        top = _int(body, "top_logprobs")
        if not wanted:
            if top:
                raise InvalidRequest("`top_logprobs` needs `logprobs: true`", param="top_logprobs")
            return None
        return top or 0
    return _int(body, "logprobs")


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", "replace")


class LogprobShape:
    """Shapes the entries of one reply, delta by delta (a completion's `text_offset` runs on)."""

    def __init__(self, chat: bool, piece: Piece, offset: int = 0) -> None:
        self.chat = chat
        self.piece = piece
        self.offset = offset  # characters of the reply's text before the next token

    def shape(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        if self.chat:
            return {"content": [self._chat_entry(e) for e in entries], "refusal": None}
        tokens, offsets = [], []
        for e in entries:
            text = _text(self.piece(e.token))
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_text(self.piece(t)): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def _one(self, token: int, logprob: float) -> dict[str, Any]:
        piece = self.piece(token)
        return {"token": _text(piece), "logprob": logprob, "bytes": list(piece)}

    def _chat_entry(self, entry: TokenLogprob) -> dict[str, Any]:
        return {
            **self._one(entry.token, entry.logprob),
            "top_logprobs": [self._one(t, lp) for t, lp in entry.top],
        }


def attach(reply: dict[str, Any], logprobs: dict[str, Any] | None) -> dict[str, Any]:
    """A body or chunk of tightwad.openai.ReplyShape with its choice's `logprobs` filled in."""
    if logprobs is not None:
        for choice in reply.get("choices", []):
            choice["logprobs"] = logprobs
    return reply
