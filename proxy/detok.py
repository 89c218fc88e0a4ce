"""Token ids -> text, incrementally and UTF-8 safe: pure, no I/O.

The target's vocabulary is fetched once from the engine as raw bytes per token (one token may hold
only part of a multibyte character). Bytes are decoded incrementally, so a character split across
tokens (or across rounds) is released only once it is complete; stop sequences are matched on the
decoded text (tightwad/stops.py), so the emitted text never splits a character and never passes a stop.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Mapping, Sequence

from tightwad.stops import StopMatcher


class Vocabulary:
    """The target's tokens as bytes. Replies render control tokens as nothing (as the engine does);
    `special=True` spells them out (`<|im_start|>`), for drafters that continue the text."""

    def __init__(self, pieces: Sequence[bytes], special: Mapping[int, bytes] | None = None) -> None:
        self.pieces = list(pieces)
        self.special = {t: b for t, b in (special or {}).items() if b != self.piece(t)}

    @property
    def size(self) -> int:
        return len(self.pieces)

    def valid(self, token: int) -> bool:
        return 0 <= token < len(self.pieces)

    def piece(self, token: int) -> bytes:
        return self.pieces[token] if self.valid(token) else b""

    def join(self, tokens: Iterable[int], special: bool = False) -> bytes:
        if special and self.special:
            return b"".join(self.special.get(t) or self.piece(t) for t in tokens)
        return b"".join(self.piece(t) for t in tokens)

    def text(self, tokens: Iterable[int], special: bool = False) -> str:
        return self.join(tokens, special).decode("utf-8", "replace")


class TextStream:
    """Feed generated token ids one at a time; get back the text that may be sent now."""

    def __init__(self, vocabulary: Vocabulary, stops: Sequence[str] = ()) -> None:
        self.vocabulary = vocabulary
        self.matcher = StopMatcher(stops)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    def feed(self, token: int) -> str:
        if self.matcher.stopped:
            return ""
        return self.matcher.feed(self._decoder.decode(self.vocabulary.piece(token), final=False))

    def finish(self) -> str:
        """End of generation: release what is held (an incomplete character becomes U+FFFD)."""
        if self.matcher.stopped:
            return ""
        tail = self.matcher.feed(self._decoder.decode(b"", final=True))
        return tail + self.matcher.flush()
