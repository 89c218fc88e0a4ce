"""Make any drafter fail soft: a deadline per call, sanitised answers, and backoff after failures.

`propose` never raises. A drafter that is down, slow, or answers nonsense gives `None` (the round
goes ahead with the target alone) and is left alone for a backoff that doubles with each failure
in a row (BASE_BACKOFF .. MAX_BACKOFF), then tried again. Token ids outside the target's vocabulary
cut the draft short; malformed probabilities are dropped (the engine's rule without them is still
exact); a draft longer than asked for is trimmed.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tightwad.proxy.drafters.base import Drafter, DraftRequest, Proposal

BASE_BACKOFF = 0.5
MAX_BACKOFF = 30.0


@dataclass
class DrafterHealth:
    calls: int = 0
    failures: int = 0
    timeouts: int = 0
    failures_in_a_row: int = 0
    retry_at: float = 0.0
    last_error: str = ""


class GuardedDrafter:
    def __init__(
        self,
        drafter: Drafter,
        n_vocab: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.drafter = drafter
        self.n_vocab = n_vocab
        self.clock = clock
        self.health = DrafterHealth()

    @property
    def name(self) -> str:
        return self.drafter.name

    @property
    def kind(self) -> str:
        return self.drafter.kind

    def available(self) -> bool:
        return self.clock() >= self.health.retry_at

    def seconds_until_retry(self) -> float:
        return max(0.0, self.health.retry_at - self.clock())

    async def propose(self, request: DraftRequest, deadline: float) -> Proposal | None:
        """A sanitised proposal, or None when the drafter failed, was too slow, or is backing off."""
        if request.k <= 0 or not self.available():
            return None
        self.health.calls += 1
        try:
            proposal = await asyncio.wait_for(self.drafter.propose(request), timeout=deadline)
        except TimeoutError:
            self.health.timeouts += 1
            self._failed(f"no draft within {deadline * 1e3:.0f} ms")
            return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of any drafter: the round goes on without it
            self._failed(f"{type(exc).__name__}: {exc}")
            return None
        self.health.failures_in_a_row = 0
        return sanitise(proposal, request.k, self.n_vocab())

    def _failed(self, why: str) -> None:
        h = self.health
        h.failures += 1
        h.failures_in_a_row += 1
        h.last_error = why
        h.retry_at = self.clock() + min(BASE_BACKOFF * 2 ** (h.failures_in_a_row - 1), MAX_BACKOFF)

    async def close(self) -> None:
        await self.drafter.close()

    def snapshot(self) -> dict[str, Any]:
        h = self.health
        return {
            "name": self.name,
            "kind": self.kind,
            "calls": h.calls,
            "failures": h.failures,
            "timeouts": h.timeouts,
            "available": self.available(),
            "retry_in_s": round(self.seconds_until_retry(), 2),
            "last_error": h.last_error,
        }


def _valid_row(row: Any, n_vocab: int) -> bool:
    if not isinstance(row, dict):
        return False
    ids, p = row.get("ids"), row.get("p")
    if not isinstance(ids, list) or not isinstance(p, list) or len(ids) != len(p) or not ids:
        return False
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in ids):
        return False
    if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in p):
        return False
    return all(x >= 0 for x in p) and sum(p) > 0


def sanitise(proposal: Any, k: int, n_vocab: int) -> Proposal | None:
    """Keep the longest usable prefix of a drafter's answer (None if it is not a proposal at all)."""
    if not isinstance(proposal, Proposal):
        return None
    tokens: list[int] = []
    for t in list(proposal.tokens)[:k]:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < n_vocab:
            break
        tokens.append(t)
    probs = proposal.probs
    if probs is not None:
        rows = list(probs)[: len(tokens)]
        probs = (
            tuple(rows) if len(rows) == len(tokens) and all(_valid_row(r, n_vocab) for r in rows) else None
        )
    return Proposal(tuple(tokens), probs)
