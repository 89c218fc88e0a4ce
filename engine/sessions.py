"""Which KV sequence holds which conversation, and which tokens it holds: pure bookkeeping.

The engine's context has `n_seq` conversation sequences. A conversation keeps its sequence between
requests, so a follow-up evaluates only what is new. A request that brings a full token list (a
completion, a verify with `reset`) keeps the longest common prefix of what the sequence holds and
drops the rest. When every sequence is taken, the least recently used idle one is evicted.
Anonymous requests (plain completions) take the idle anonymous sequence that shares the longest
prefix with their prompt (when that prefix is at least half of what it holds, like llama-server's
slot similarity), else a free or least recently used one.

Nothing here touches libllama: `acquire` returns a plan (sequence id, how many held tokens to keep)
and the engine carries it out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from tightwad.tokens import common_prefix

ANONYMOUS_PREFIX = "_anon:"


@dataclass
class Slot:
    """One KV sequence."""

    seq: int
    conversation: str | None = None
    tokens: list[int] = field(default_factory=list)  # exactly what the KV holds, positions 0..n-1
    tail: list[int] = field(default_factory=list)  # the conversation's tokens after those, not yet evaluated
    last_used: int = 0
    busy: bool = False
    state: object = None  # opaque per-conversation state kept by the engine (its random stream)

    @property
    def history(self) -> list[int]:
        """The conversation's whole token list: what the KV holds, then the tail."""
        return self.tokens + self.tail

    @property
    def anonymous(self) -> bool:
        return self.conversation is None or self.conversation.startswith(ANONYMOUS_PREFIX)


@dataclass(frozen=True)
class Plan:
    """What to do with the KV before a request runs: keep `keep` tokens of `slot`, drop the rest."""

    slot: Slot
    keep: int
    evicted: str | None = None  # the conversation that lost its sequence to this request


class SessionTable:
    """Conversation id -> KV sequence, with prefix reuse and LRU eviction."""

    def __init__(self, n_seq: int, remember_evicted: int = 1024) -> None:
        if n_seq < 1:
            raise ValueError("need at least one sequence")
        self.slots = [Slot(seq=i) for i in range(n_seq)]
        self._clock = 0
        self._evicted: OrderedDict[str, None] = OrderedDict()
        self._remember = remember_evicted

    # queries ----------------------------------------------------------------------------------
    def find(self, conversation: str) -> Slot | None:
        return next((s for s in self.slots if s.conversation == conversation), None)

    def was_evicted(self, conversation: str) -> bool:
        return conversation in self._evicted

    def held_tokens(self) -> int:
        """KV cells in use by conversations (each held position is one cell)."""
        return sum(len(s.tokens) for s in self.slots)

    def idle_by_age(self) -> list[Slot]:
        """Idle slots holding something, least recently used first (eviction candidates)."""
        return sorted((s for s in self.slots if not s.busy and s.tokens), key=lambda s: s.last_used)

    # planning ---------------------------------------------------------------------------------
    def acquire(self, conversation: str, tokens: Sequence[int], min_pending: int = 0) -> Plan | None:
        """Reserve the sequence for `conversation`, whose full token list is now `tokens`.

        Keeps the common prefix of what the sequence holds, but leaves at least `min_pending`
        tokens to evaluate. None when the conversation's sequence is busy or every sequence is.
        """
        limit = max(0, len(tokens) - min_pending)
        slot = self.find(conversation)
        if slot is not None:
            if slot.busy:
                return None
            return self._take(slot, conversation, min(common_prefix(slot.tokens, tokens), limit))
        if conversation.startswith(ANONYMOUS_PREFIX):
            slot = self._best_anonymous(tokens)
            if slot is not None:
                return self._take(slot, conversation, min(common_prefix(slot.tokens, tokens), limit))
        slot = self._free_or_lru()
        if slot is None:
            return None
        evicted = slot.conversation if slot.conversation and not slot.anonymous else None
        if evicted:
            self._remember_evicted(evicted)
        self._evicted.pop(conversation, None)
        return Plan(self._take(slot, conversation, 0).slot, 0, evicted)

    def release(self, slot: Slot, tokens: Sequence[int], tail: Sequence[int] = ()) -> None:
        """The request is done; the sequence now holds exactly `tokens`, and `tail` follows them."""
        slot.tokens = list(tokens)
        slot.tail = list(tail)
        slot.busy = False
        self._clock += 1
        slot.last_used = self._clock

    def forget(self, slot: Slot, evicted: bool = False) -> None:
        """The sequence was cleared (eviction for space, or a failed request)."""
        if evicted and slot.conversation and not slot.anonymous:
            self._remember_evicted(slot.conversation)
        slot.conversation = None
        slot.tokens = []
        slot.tail = []
        slot.busy = False
        slot.state = None

    # internals --------------------------------------------------------------------------------
    def _take(self, slot: Slot, conversation: str, keep: int) -> Plan:
        if slot.conversation != conversation:
            slot.state = None
        slot.conversation = conversation
        slot.tokens = slot.tokens[:keep]
        slot.tail = []
        slot.busy = True
        self._clock += 1
        slot.last_used = self._clock
        return Plan(slot, keep)

    def _best_anonymous(self, tokens: Sequence[int]) -> Slot | None:
        best: Slot | None = None
        best_len = 0
        for slot in self.slots:
            if slot.busy or not slot.anonymous or not slot.tokens:
                continue
            n = common_prefix(slot.tokens, tokens)
            if 2 * n < len(slot.tokens):
                continue  # mostly unrelated: do not destroy that cache for a short shared prefix
            if n > best_len or (n == best_len and best is not None and slot.last_used < best.last_used):
                best, best_len = slot, n
        return best if best_len > 0 else None

    def _free_or_lru(self) -> Slot | None:
        free = [s for s in self.slots if s.conversation is None and not s.busy]
        if free:
            return free[0]
        idle = [s for s in self.slots if not s.busy]
        if not idle:
            return None
        # Anonymous (prompt-cache) sequences go before named conversations, each oldest first.
        return min(idle, key=lambda s: (not s.anonymous, s.last_used))

    def _remember_evicted(self, conversation: str) -> None:
        self._evicted[conversation] = None
        self._evicted.move_to_end(conversation)
        while len(self._evicted) > self._remember:
            self._evicted.popitem(last=False)
