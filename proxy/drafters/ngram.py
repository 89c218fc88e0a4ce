"""Prompt lookup: draft by copying what followed the last occurrence of the newest n-gram.

No model at all. It shines where replies repeat their context (code edits, quoting, summaries,
structured output) and proposes nothing where they do not, which costs one empty round at most.
"""

from __future__ import annotations

from collections.abc import Sequence

from tightwad.proxy.drafters.base import DraftRequest, Proposal


def prompt_lookup(history: Sequence[int], k: int, n_max: int = 3, n_min: int = 1) -> list[int]:
    """The up-to-k tokens that followed the most recent earlier occurrence of the history's last n
    tokens, trying the longest n first (a longer match predicts better)."""
    size = len(history)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        pattern = list(history[size - n :])
        first = pattern[0]
        # Newest occurrence first, never the suffix itself; it must be followed by something.
        for start in range(size - n - 1, -1, -1):
            if history[start] == first and list(history[start : start + n]) == pattern:
                return list(history[start + n : start + n + k])
    return []


class NgramDrafter:
    kind = "ngram"

    def __init__(self, n: int = 3, name: str = "ngram") -> None:
        self.n = n
        self.name = name

    async def propose(self, request: DraftRequest) -> Proposal:
        return Proposal(tuple(prompt_lookup(request.history, request.k, self.n)))

    async def close(self) -> None:
        return None
