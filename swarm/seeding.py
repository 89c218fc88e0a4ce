"""Initial seeding ("super-seeding"): while some pieces of a file have never left the origin, the origin
offers only those, so its scarce upload carries each piece into the swarm once and the peers
spread it among themselves. Measured without it (4 peers, equal uplinks): the origin uploaded
1.56x the file because peers asked it for the same pieces at once, and the whole swarm waited on that.

A piece is hidden while an upload of it is running, and during initial seeding also for `hold`
seconds after one finished; once every piece has left the origin at least once only the running
uploads are hidden, so a peer that lost a piece (or died with it) can never stall the others for
long. Pure: the caller passes the clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tightwad.swarm.bitfield import Bitfield

DEFAULT_HOLD = 20.0


class UploadLedger:
    def __init__(
        self, count: int, hold: float = DEFAULT_HOLD, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.count = count
        self.hold = hold
        self._clock = clock
        self._running: dict[int, int] = {}  # piece -> uploads in progress
        self._finished_at: dict[int, float] = {}  # piece -> when an upload of it last completed
        self._sent_once = Bitfield(count)

    def begin(self, pieces: range) -> None:
        for piece in pieces:
            self._running[piece] = self._running.get(piece, 0) + 1

    def end(self, pieces: range, complete: bool) -> None:
        now = self._clock()
        for piece in pieces:
            left = self._running.get(piece, 0) - 1
            if left > 0:
                self._running[piece] = left
            else:
                self._running.pop(piece, None)
            if complete:
                self._finished_at[piece] = now
                self._sent_once.add(piece)

    @property
    def initial(self) -> bool:
        """True while some piece has never been uploaded completely."""
        return not self._sent_once.complete

    def offer(self, have: Bitfield) -> Bitfield:
        """The have-map to show peers: `have` minus the pieces being sent right now (the receiver will
        pass them on sooner than a second copy from here would arrive), and during initial seeding
        minus those sent in the last `hold` seconds too."""
        hidden = list(self._running)
        if self.initial:
            now = self._clock()
            hidden += [piece for piece, at in self._finished_at.items() if now - at < self.hold]
        if not hidden:
            return have
        offered = have.copy()
        for piece in hidden:
            offered.discard(piece)
        # Empty only while every piece not yet sent is being sent right now: that ends by itself.
        return offered
