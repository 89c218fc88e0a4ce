"""What one pull has moved so far: bytes and pieces by origin, the bytes of requests still running,
when it last made progress, and how long a piece request takes. Pure: callers pass the time."""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class Tally:
    bytes_fetched: int = 0  # received from peers, including failed and duplicate requests
    bytes_local: int = 0  # rebuilt from local files (delta) instead of fetched
    pieces_fetched: int = 0
    pieces_local: int = 0
    pieces_resumed: int = 0
    piece_seconds: float = 0.0  # moving average of one successful piece request
    last_progress: float = field(default_factory=time.monotonic)
    receiving: dict[Hashable, int] = field(default_factory=dict)  # request -> bytes it received so far

    def received(self, request: Hashable, chunk: int, so_far: int) -> None:
        """`request` received `chunk` more bytes, `so_far` in all."""
        self.bytes_fetched += chunk
        self.receiving[request] = so_far

    def request_ended(self, request: Hashable) -> None:
        self.receiving.pop(request, None)

    @property
    def in_progress(self) -> int:
        """Bytes received by requests that have not ended (not yet counted as held)."""
        return sum(self.receiving.values())

    def local_piece(self, length: int, now: float) -> None:
        self.bytes_local += length
        self.pieces_local += 1
        self.last_progress = now

    def fetched_piece(self, local_bytes: int, now: float) -> None:
        """A fetched piece was committed; `local_bytes` of it came from local files (a delta plan)."""
        self.bytes_local += local_bytes
        self.pieces_fetched += 1
        self.last_progress = now

    def request_took(self, seconds: float) -> None:
        """A successful request's duration: the endgame waits about two of these before racing."""
        self.piece_seconds = seconds if not self.piece_seconds else 0.8 * self.piece_seconds + 0.2 * seconds

    def idle(self, now: float) -> float:
        """Seconds since the last piece was added."""
        return now - self.last_progress
