"""Which pieces a node holds: a fixed-length bit set with a compact wire form (base64, MSB first)."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator


class Bitfield:
    """`count` bits, all clear at first; bit i is piece i. Extra bits in the last byte stay clear."""

    __slots__ = ("_bits", "_set", "count")

    def __init__(self, count: int, indexes: Iterable[int] = ()) -> None:
        if count < 0:
            raise ValueError("a bitfield cannot have a negative length")
        self.count = count
        self._bits = bytearray((count + 7) // 8)
        self._set = 0
        for index in indexes:
            self.add(index)

    def _check(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise IndexError(f"piece {index} is outside 0..{self.count - 1}")

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self.count:
            return False
        return bool(self._bits[index >> 3] & (0x80 >> (index & 7)))

    def add(self, index: int) -> None:
        self._check(index)
        mask = 0x80 >> (index & 7)
        if not self._bits[index >> 3] & mask:
            self._bits[index >> 3] |= mask
            self._set += 1

    def discard(self, index: int) -> None:
        self._check(index)
        mask = 0x80 >> (index & 7)
        if self._bits[index >> 3] & mask:
            self._bits[index >> 3] &= ~mask & 0xFF
            self._set -= 1

    def __len__(self) -> int:
        """How many bits are set (pieces held)."""
        return self._set

    def __iter__(self) -> Iterator[int]:
        for byte_index, byte in enumerate(self._bits):
            if byte:
                for bit in range(8):
                    if byte & (0x80 >> bit):
                        yield byte_index * 8 + bit

    def select(self, indexes: Iterable[int]) -> list[int]:
        """The given indexes whose bit is set, in the given order (the fast path of a filter over
        `in`: piece choice runs it over every wanted piece for every peer)."""
        bits, count = self._bits, self.count
        return [i for i in indexes if 0 <= i < count and bits[i >> 3] & (0x80 >> (i & 7))]

    def missing(self) -> Iterator[int]:
        return (index for index in range(self.count) if index not in self)

    @property
    def complete(self) -> bool:
        return self._set == self.count

    def copy(self) -> Bitfield:
        clone = Bitfield(self.count)
        clone._bits[:] = self._bits
        clone._set = self._set
        return clone

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitfield) and other.count == self.count and other._bits == self._bits

    def __hash__(self) -> int:  # mutable; hashing by identity would be a lie
        raise TypeError("Bitfield is mutable and not hashable")

    def __repr__(self) -> str:
        return f"Bitfield({self.count}, {len(self)} set)"

    def encode(self) -> str:
        return base64.b64encode(bytes(self._bits)).decode("ascii")

    @classmethod
    def decode(cls, count: int, text: str) -> Bitfield:
        """Parse `encode()` output; raise ValueError for the wrong length or stray trailing bits."""
        raw = base64.b64decode(text.encode("ascii"), validate=True)
        if len(raw) != (count + 7) // 8:
            raise ValueError(f"a have-map of {count} pieces needs {(count + 7) // 8} bytes, got {len(raw)}")
        spare = (8 - count % 8) % 8
        if raw and spare and raw[-1] & ((1 << spare) - 1):
            raise ValueError("bits beyond the last piece are set")
        field = cls(count)
        field._bits[:] = raw
        field._set = sum(byte.bit_count() for byte in raw)
        return field
