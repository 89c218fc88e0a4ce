"""Turn a stream of token bytes into text that is safe to send: pure, no I/O.

Two things make this more than `b"".join(...).decode()`:

- one character may be split across tokens (UTF-8 continuation bytes), so bytes are decoded
  incrementally and an incomplete character is held back until it completes;
- a stop sequence may span several tokens, so text that could still become the start of a stop
  sequence is held back until it is clear either way. Nothing past a stop is ever emitted.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextAssembler:
    """Feed token bytes; get back the text that may be emitted now."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stopped = False  # a stop sequence was found; the text ends before it
        self.text = ""  # everything emitted so far

    def feed(self, data: bytes) -> str:
        """The newly safe text after these bytes ("" once stopped)."""
        if self.stopped:
            return ""
        return self._advance(self._decoder.decode(data, final=False))

    def finish(self) -> str:
        """End of generation: flush whatever is held (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        out = self._advance(self._decoder.decode(b"", final=True))
        rest, self._held = self._held, ""
        self.text += rest
        return out + rest

    def _advance(self, new: str) -> str:
        pending = self._held + new
        cut = self._first_stop(pending)
        if cut is not None:
            self.stopped = True
            self._held = ""
            self.text += pending[:cut]
            return pending[:cut]
        hold = self._longest_stop_prefix_suffix(pending)
        ready = pending[: len(pending) - hold]
        self._held = pending[len(pending) - hold :]
        self.text += ready
        return ready

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop sequence."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
