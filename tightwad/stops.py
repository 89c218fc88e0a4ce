"""Stop sequences over a text stream that arrives in pieces: pure, no I/O.

A stop sequence can span any number of pieces (tokens, rounds). Text is released as soon as it
can no longer be the start of a stop; only the tail that is still a possible prefix of one is held
back. Nothing at or past a stop is ever released.

Requests are bounded (`parse_stops`): at most MAX_STOPS sequences of at most MAX_STOP_CHARS
characters each, so matching costs microseconds per piece. OpenAI allows 4 stops; 16 is what the
proxy already accepts for its speculation path, and the engine serves what the proxy passes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tightwad.openai import InvalidRequest

MAX_STOPS = 16
MAX_STOP_CHARS = 512


def parse_stops(value: Any, field: str = "stop") -> list[str]:
    """An OpenAI `stop` (a string, a list of strings, or null) as a list without empty strings;
    InvalidRequest naming the field when it is of another kind or over the bounds."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest(f"`{field}` must be a string or a list of strings", param=field)
    if len(stops) > MAX_STOPS:
        raise InvalidRequest(
            f"`{field}` has {len(stops)} sequences; at most {MAX_STOPS} are allowed", param=field
        )
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_CHARS:
        raise InvalidRequest(
            f"`{field}` holds a sequence of {longest} characters; at most {MAX_STOP_CHARS} are allowed",
            param=field,
        )
    return [s for s in stops if s]


class StopMatcher:
    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        # Per stop, the prefix lengths n whose last character is c, longest first: a held suffix
        # ending in c can only match those, so most pieces check nothing at all.
        self._ends: list[dict[str, list[int]]] = []
        for stop in self.stops:
            ends: dict[str, list[int]] = {}
            for n in range(len(stop) - 1, 0, -1):
                ends.setdefault(stop[n - 1], []).append(n)
            self._ends.append(ends)
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
        if not text:
            return 0
        best = 0
        last, size = text[-1], len(text)
        for stop, ends in zip(self.stops, self._ends, strict=True):
            for n in ends.get(last, ()):
                if n <= best:
                    break
                if n <= size and text.startswith(stop[: n - 1], size - n):
                    best = n
                    break
        return best
