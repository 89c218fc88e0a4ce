"""HTTP `Range: bytes=...` parsing (RFC 9110, single ranges only: pieces are contiguous)."""

from __future__ import annotations

import re

from tightwad.errors import TightwadError

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class RangeError(TightwadError, ValueError):  # ValueError: what a parse failure is
    """Answer 416: the range is malformed, multi-part or outside the file."""


def parse_range(header: str, size: int) -> tuple[int, int]:
    """`(start, end)`, end exclusive, for a `Range` header against a file of `size` bytes."""
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if not match or (not match.group(1) and not match.group(2)):
        raise RangeError(f"unsupported range {header!r}: send one range, bytes=START-END")
    first, last = match.group(1), match.group(2)
    if not first:  # suffix: the last N bytes
        length = int(last)
        if length == 0:
            raise RangeError("an empty suffix range selects nothing")
        return max(size - length, 0), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if start >= size or end <= start:
        raise RangeError(f"range {header!r} is outside the file of {size} bytes")
    return start, end


def content_range(start: int, end: int, size: int) -> str:
    return f"bytes {start}-{end - 1}/{size}"
