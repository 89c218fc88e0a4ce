"""What every drafter takes and gives: anything that proposes the target's next tokens as token ids
of the target's vocabulary. The kinds live in llama_server.py, text.py and ngram.py beside this
file; guard.py makes any of them fail soft. Exactness never depends on a drafter: the engine
verifies every token."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from tightwad.errors import TightwadError
from tightwad.proxy.detok import Vocabulary
from tightwad.verify_api import Sampling


class DrafterError(TightwadError):
    """The drafter could not propose (down, slow, or an answer we cannot read)."""


@dataclass(frozen=True)
class DraftRequest:
    """Propose up to `k` tokens that follow `history` (the prompt and everything generated so far)."""

    history: tuple[int, ...]
    k: int
    sampling: Sampling = field(default_factory=Sampling)
    vocabulary: Vocabulary | None = None  # the target's, for drafters that work on text
    # The request's decoding constraint (tightwad.openai.constraint_of), on the history from
    # `generation_start` on: drafters that can take it draft under it, the others ignore it.
    grammar: dict[str, Any] | None = None
    generation_start: int = 0

    @cached_property
    def text(self) -> str:
        """The history as text, special tokens spelled out (text drafters continue it)."""
        if self.vocabulary is None:
            raise DrafterError("this drafter needs the target's vocabulary to render the history as text")
        return self.vocabulary.text(self.history, special=True)


@dataclass(frozen=True)
class Proposal:
    """Draft token ids, and per token the drafter's sampling distribution when it has one, as sparse
    rows {"ids": [...], "p": [...]} (the verify API's form). None: greedy, text or n-gram drafts."""

    tokens: tuple[int, ...]
    probs: tuple[dict[str, Any], ...] | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"tokens": list(self.tokens)}
        if self.probs is not None:
            body["probs"] = list(self.probs)
        return body

    def head(self, n: int) -> Proposal:
        probs = self.probs[:n] if self.probs is not None else None
        return Proposal(self.tokens[:n], probs)

    def tail(self, start: int) -> Proposal:
        probs = self.probs[start:] if self.probs is not None else None
        return Proposal(self.tokens[start:], probs)


class Drafter(Protocol):
    name: str
    kind: str

    async def propose(self, request: DraftRequest) -> Proposal: ...

    async def close(self) -> None: ...
