"""Which engine conversation a request uses, and who waits for one: pure bookkeeping, no I/O.

The engine keeps one KV sequence per conversation id and, when a request resends a conversation
whole (`reset`), keeps the longest common prefix. So the proxy keeps a pool of ids (as many as the
engine keeps sequences) and gives each request the idle id whose last token list shares the
longest prefix with the new prompt: the next turn of a chat, or another request with the same
system prompt, evaluates only what is new. Ids are per proxy process (`prefix`), never shared.

A speculated request holds its id for its whole reply, though the engine's sequence sits idle
between its verify calls. A request beyond the pool therefore waits for an id, first come first
served, instead of taking a throwaway one: the engine would evict another conversation's idle
sequence for it, and the two would keep evicting each other (ConversationEvicted, the prompt
evaluated again) exactly when the machine is busiest. The wait is bounded twice, as the engine's own
queue is: at most `queue_limit` waiters (beyond: 503 queue_full) and at most `queue_timeout`
seconds each (past it: 503 queue_timeout), both with a Retry-After estimated from how long recent
requests held their id. Times are passed in (`now`), so every rule is testable without a clock.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from tightwad.openai import Unavailable
from tightwad.tokens import common_prefix

DEFAULT_QUEUE_LIMIT = 16  # the engine's own defaults, until its stats say otherwise
DEFAULT_QUEUE_TIMEOUT = 30.0
RECENT_SERVICE = 32  # leases whose hold times estimate Retry-After
MAX_RETRY_AFTER = 600  # seconds: past this a client should rather try another server


@dataclass
class Lease:
    conversation: str
    shared: int  # prompt tokens the engine probably still holds for it
    history: list[int] = field(default_factory=list)
    since: float = 0.0  # when it was granted (the service time starts)


@dataclass(eq=False)  # compared and hashed by identity: each waiter is its own
class Ticket:
    """A request waiting for a conversation; `lease` is set when one is handed to it."""

    prompt: list[int]
    since: float
    lease: Lease | None = None


@dataclass
class _Entry:
    conversation: str
    history: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: int = 0
    since: float = 0.0


class ConversationPool:
    def __init__(
        self,
        size: int,
        prefix: str | None = None,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        queue_timeout: float = DEFAULT_QUEUE_TIMEOUT,
    ) -> None:
        self.prefix = prefix or f"proxy-{uuid.uuid4().hex[:8]}"
        self.entries: list[_Entry] = []
        self.size = 0
        self._made = 0
        self._clock = 0
        self.queue_limit = queue_limit
        self.queue_timeout = queue_timeout
        self.waiting: deque[Ticket] = deque()
        self.service: deque[float] = deque(maxlen=RECENT_SERVICE)
        self.resize(size)

    # sizing -------------------------------------------------------------------------------------
    def resize(self, size: int, queue_limit: int | None = None, queue_timeout: float | None = None) -> None:
        """Follow the engine's figures (learnt again when it changes). Busy ids beyond the new size
        are dropped when released; waiters keep their place (`grant` hands them new ids)."""
        self.size = max(size, 1)
        if queue_limit is not None:
            self.queue_limit = max(queue_limit, 0)
        if queue_timeout is not None:
            self.queue_timeout = queue_timeout
        self.entries = [e for e in self.entries if e.busy] + [e for e in self.entries if not e.busy]
        while len(self.entries) > self.size and not self.entries[-1].busy:
            self.entries.pop()
        while len(self.entries) < self.size:
            self.entries.append(_Entry(f"{self.prefix}-{self._made}"))
            self._made += 1

    def grant(self, now: float) -> list[Ticket]:
        """Hand idle ids to the oldest waiters; returns those that got one, oldest first."""
        granted: list[Ticket] = []
        while self.waiting:
            lease = self._take(self.waiting[0].prompt, now)
            if lease is None:
                break
            ticket = self.waiting.popleft()
            ticket.lease = lease
            granted.append(ticket)
        return granted

    # leases -------------------------------------------------------------------------------------
    def acquire(self, prompt: Sequence[int], now: float = 0.0) -> Lease | None:
        """The best idle id for `prompt`, or None when every id is busy or others wait first."""
        if self.waiting:
            return None
        return self._take(prompt, now)

    def join(self, prompt: Sequence[int], now: float) -> Lease | Ticket:
        """A lease at once, or a place at the back of the queue; Unavailable (503 queue_full,
        with Retry-After) when `queue_limit` requests already wait."""
        lease = self.acquire(prompt, now)
        if lease is not None:
            return lease
        if len(self.waiting) >= self.queue_limit:
            raise self._refusal(
                "queue_full",
                f"the proxy is busy: its {self.size} conversation(s) are in use and "
                f"{len(self.waiting)} request(s) already wait (proxy --queue {self.queue_limit})",
                now,
            )
        ticket = Ticket(list(prompt), now)
        self.waiting.append(ticket)
        return ticket

    def release(self, lease: Lease, history: Sequence[int] | None, now: float) -> list[Ticket]:
        """The request is over; the engine's conversation now holds (a prefix of) `history` ([]:
        unknown, a request that failed; None: unchanged, a lease never used). Returns the waiters
        that got an id, oldest first."""
        for entry in self.entries:
            if entry.conversation == lease.conversation and entry.busy:
                if history is not None:
                    entry.history = list(history)
                    self.service.append(max(0.0, now - entry.since))
                entry.busy = False
        if len(self.entries) > self.size:  # shrunk while it was busy
            self.entries = [e for e in self.entries if e.busy] + [e for e in self.entries if not e.busy]
            del self.entries[self.size :]
        return self.grant(now)

    def leave(self, ticket: Ticket) -> None:
        """A waiter gives up its place (its client left, or it timed out)."""
        if ticket in self.waiting:
            self.waiting.remove(ticket)

    def expired(self, ticket: Ticket, now: float) -> Unavailable | None:
        """503 queue_timeout when `ticket` waited past `queue_timeout` without an id (it leaves)."""
        if ticket.lease is not None or now - ticket.since < self.queue_timeout:
            return None
        self.leave(ticket)
        return self._refusal(
            "queue_timeout",
            f"this request waited {now - ticket.since:.0f} s for one of the proxy's {self.size} "
            f"conversation(s) (proxy --queue-timeout {self.queue_timeout:g}) and never started",
            now,
        )

    def _refusal(self, code: str, why: str, now: float) -> Unavailable:
        """A 503 that says why, when to come back (Retry-After) and what would make room."""
        wait = self.retry_after(len(self.waiting), now)
        return Unavailable(
            f"{why}; retry after {wait} s, or give the engine more conversations (--parallel, --ctx)",
            code=code,
            retry_after=wait,
        )

    def retry_after(self, ahead: int, now: float) -> int:
        """Seconds a refused client should wait: the requests ahead of it (and itself) served
        `size` at a time, each taking the mean recent hold time; before any finished, the age of
        the oldest running one. At least 1, at most MAX_RETRY_AFTER."""
        if self.service:
            mean = sum(self.service) / len(self.service)
        else:
            mean = max((now - e.since for e in self.entries if e.busy), default=1.0)
        estimate = mean * math.ceil((max(0, ahead) + 1) / self.size)
        return int(min(MAX_RETRY_AFTER, max(1, math.ceil(estimate))))

    def busy(self) -> int:
        return sum(1 for e in self.entries if e.busy)

    def _take(self, prompt: Sequence[int], now: float) -> Lease | None:
        idle = [e for e in self.entries if not e.busy]
        if not idle:
            return None
        best = max(idle, key=lambda e: (common_prefix(e.history, prompt), -e.last_used))
        shared = common_prefix(best.history, prompt)
        if shared == 0:
            best = min(idle, key=lambda e: e.last_used)
        best.busy = True
        best.since = now
        self._clock += 1
        best.last_used = self._clock
        return Lease(best.conversation, shared, since=now)
