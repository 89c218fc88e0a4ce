"""An upload cap shared by all of a server's responses (a token bucket), so a seeder can leave
bandwidth for the host's real work. The clock and the sleep are injectable for tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError("the rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(rate / 10, 256 * 1024)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, amount: int) -> None:
        """Wait until `amount` bytes may be sent. Debt is allowed (chunks larger than the burst still
        pass), and later callers wait for it to be repaid, so the long-run rate holds."""
        self._refill()
        self._tokens -= amount
        if self._tokens < 0:
            await self._sleep(-self._tokens / self.rate)
