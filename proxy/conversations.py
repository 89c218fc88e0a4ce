"""Which engine conversation a request uses, so follow-ups reuse the engine's KV cache: pure.

The engine keeps one KV sequence per conversation id and, when a request resends a conversation
whole (`reset`), keeps the longest common prefix. So the proxy keeps a small pool of ids (as many
as the engine keeps sequences) and gives each request the idle id whose last token list shares
the longest prefix with the new prompt: the next turn of a chat, or another request with the same
system prompt, evaluates only what is new. Ids are per proxy process (`prefix`), never shared.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from tightwad.tokens import common_prefix


@dataclass
class Lease:
    conversation: str
    shared: int  # prompt tokens the engine probably still holds for it
    pooled: bool
    history: list[int] = field(default_factory=list)


@dataclass
class _Entry:
    conversation: str
    history: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: int = 0


class ConversationPool:
    def __init__(self, size: int, prefix: str | None = None) -> None:
        self.prefix = prefix or f"proxy-{uuid.uuid4().hex[:8]}"
        self.entries = [_Entry(f"{self.prefix}-{i}") for i in range(max(size, 1))]
        self._clock = 0

    def acquire(self, prompt: Sequence[int]) -> Lease:
        idle = [e for e in self.entries if not e.busy]
        if not idle:  # more requests than sequences: a throwaway id (the engine evicts as needed)
            return Lease(f"{self.prefix}-x{uuid.uuid4().hex[:8]}", 0, pooled=False)
        best = max(idle, key=lambda e: (common_prefix(e.history, prompt), -e.last_used))
        shared = common_prefix(best.history, prompt)
        if shared == 0:
            best = min(idle, key=lambda e: e.last_used)
        best.busy = True
        self._clock += 1
        best.last_used = self._clock
        return Lease(best.conversation, shared, pooled=True)

    def release(self, lease: Lease, history: Sequence[int]) -> None:
        """The request is over; the engine's conversation now holds (a prefix of) `history`."""
        for entry in self.entries:
            if entry.conversation == lease.conversation:
                entry.history = list(history)
                entry.busy = False

    def forget(self, lease: Lease) -> None:
        """Its history is unknown (a request that failed): nothing to reuse."""
        self.release(lease, [])
