"""Stop sequences over a text stream that arrives in pieces: pure, no I/O.

A stop sequence can span any number of pieces (tokens, rounds). Text is released as soon as it
can no longer be the start of a stop; only the tail that is still a possible prefix of one is held
back. Nothing at or past a stop is ever released.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of the text so far that is now safe to emit ("" once stopped)."""
        if self.stopped:
            return ""
        pending = self._held + text
        cut = self._first_stop(pending)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return pending[:cut]
        hold = self._held_length(pending)
        self._held = pending[len(pending) - hold :]
        return pending[: len(pending) - hold]

    def flush(self) -> str:
        """The generation ended without a stop: what was held back is plain text after all."""
        rest, self._held = ("" if self.stopped else self._held), ""
        return rest

    @property
    def held(self) -> str:
        return self._held

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _held_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
