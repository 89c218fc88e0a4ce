"""Target tokens -> the text of an OpenAI reply: stop sequences, max_tokens, finish_reason, usage.

Tokens are taken one at a time even when a round brings several, so a stop sequence is found at
the exact token that completes it (usage counts up to that token, as the target alone would), and
nothing after it is ever sent. End-of-generation tokens count as generated but produce no text,
and no logprobs entry (as the engine alone answers); every other token taken gets its entry.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from tightwad.proxy.detok import TextStream, Vocabulary
from tightwad.proxy.speculate import Step
from tightwad.verify_api import TokenLogprob


@dataclass(frozen=True)
class ReplyDelta:
    """The next piece of a reply: text that may be sent now and the token ids it came from."""

    text: str
    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None  # the rendered tokens' entries, when the reply asked


class TextReply:
    def __init__(
        self,
        steps: AsyncIterator[Step],
        vocabulary: Vocabulary,
        stops: Sequence[str],
        eog_tokens: set[int],
    ) -> None:
        self.steps = steps
        self.stream = TextStream(vocabulary, stops)
        self.eog_tokens = eog_tokens  # learnt from the engine's verdicts: never rendered
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._last: int | None = None

    async def deltas(self) -> AsyncIterator[ReplyDelta]:
        """Text deltas (non-empty, or carrying tokens), then `finish_reason` is set."""
        try:
            async for step in self.steps:
                text: list[str] = []
                tokens: list[int] = []
                entries: list[TokenLogprob] | None = [] if step.logprobs is not None else None
                for i, token in enumerate(step.tokens):
                    self.completion_tokens += 1
                    tokens.append(token)
                    last = i == len(step.tokens) - 1
                    if step.eog and last:
                        self.eog_tokens.add(token)
                    if token in self.eog_tokens:
                        continue
                    if entries is not None and step.logprobs is not None:
                        entries.append(step.logprobs[i])
                    text.append(self.stream.feed(token))
                    if self.stream.stopped:
                        self.finish_reason = "stop"
                        break
                if text or tokens:
                    yield ReplyDelta("".join(text), tokens, entries)
                if self.finish_reason is not None:
                    return
                if step.eog:
                    if not step.tokens and self._last is not None:
                        self.eog_tokens.add(self._last)
                    self.finish_reason = "stop"
                    break
                if step.tokens:
                    self._last = step.tokens[-1]
            else:
                self.finish_reason = "length"  # max_tokens, or the context is full
            rest = self.stream.finish()
            if rest:
                yield ReplyDelta(rest, [])
        finally:
            with contextlib.suppress(Exception):
                await self.steps.aclose()  # type: ignore[attr-defined]
