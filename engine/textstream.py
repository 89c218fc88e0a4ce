"""Turn a stream of token bytes into text that is safe to send: pure, no I/O.

Two things make this more than `b"".join(...).decode()`:

- one character may be split across tokens (UTF-8 continuation bytes), so bytes are decoded
  incrementally and an incomplete character is held back until it completes;
- a stop sequence may span several tokens, so text that could still become the start of a stop
  sequence is held back until it is clear either way (tightwad.stops). Nothing past a stop is
  ever emitted.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from tightwad.stops import StopMatcher


class TextAssembler:
    """Feed token bytes; get back the text that may be emitted now."""

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = StopMatcher(stops)
        self.text = ""  # everything emitted so far

    @property
    def stopped(self) -> bool:
        """A stop sequence was found; the text ends before it."""
        return self._stops.stopped

    def feed(self, data: bytes) -> str:
        """The newly safe text after these bytes ("" once stopped)."""
        if self.stopped:
            return ""
        return self._emit(self._stops.feed(self._decoder.decode(data, final=False)))

    def finish(self) -> str:
        """End of generation: flush whatever is held (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        out = self._stops.feed(self._decoder.decode(b"", final=True))
        return self._emit(out + self._stops.flush())

    def _emit(self, text: str) -> str:
        self.text += text
        return text
