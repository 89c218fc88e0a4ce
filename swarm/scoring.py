"""How much a peer is trusted and how fast it is. Pure: the caller passes the clock.

- A failed request (refused, reset, timed out) backs the peer off exponentially: it may be
  restarting, and hammering it helps no one. A success clears the streak.
- A corrupt piece is worse than a failure: that peer is never asked for that piece again, and after
  `corrupt_limit` corrupt pieces it is banned for the rest of the download.
- Throughput is an exponentially weighted average of bytes/s per piece, used to rank peers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
RATE_WEIGHT = 0.3  # weight of the newest sample in the moving average


@dataclass
class PeerScore:
    corrupt_limit: int = 2
    rate: float = 0.0  # bytes/s, moving average
    bytes_received: int = 0
    pieces_ok: int = 0
    failures: int = 0  # consecutive
    total_failures: int = 0
    corrupt: int = 0
    backoff_until: float = 0.0
    banned: bool = False
    excluded: set[int] = field(default_factory=set)  # pieces this peer served corrupt

    def usable(self, now: float) -> bool:
        return not self.banned and now >= self.backoff_until

    def on_success(self, nbytes: int, seconds: float) -> None:
        self.bytes_received += nbytes
        self.pieces_ok += 1
        self.failures = 0
        sample = nbytes / max(seconds, 1e-6)
        self.rate = sample if self.rate == 0.0 else (1 - RATE_WEIGHT) * self.rate + RATE_WEIGHT * sample

    def on_failure(self, now: float) -> None:
        self.failures += 1
        self.total_failures += 1
        self.backoff_until = now + min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1))

    def on_corrupt(self, piece: int, now: float) -> None:
        self.corrupt += 1
        self.excluded.add(piece)
        if self.corrupt >= self.corrupt_limit:
            self.banned = True
        else:
            self.on_failure(now)

    def rank(self) -> float:
        """Higher is better: fast peers are offered work first. Unknown peers rank as average."""
        return self.rate / (1 + self.failures + 4 * self.corrupt)
