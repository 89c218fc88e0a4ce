"""The piece manifest: what a file is (name, size, SHA-256), how it is cut into fixed-size pieces
(each with its SHA-256), and, for GGUF files, its content segments (header, each tensor's data, the
gaps between), each with its SHA-256, so bytes can be found again by content after they move.

Pure data plus one builder that reads the file once. A manifest from a peer is untrusted input:
`from_json` validates every field, and `check_file_name` keeps names inside the download folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tightwad.errors import TightwadError
from tightwad.swarm.gguf_layout import read_layout
from tightwad.swarm.hashing import hash_file

FORMAT = 1
DEFAULT_PIECE_SIZE = 64 << 20
MIN_PIECE_SIZE = 16 << 10
MAX_PIECE_SIZE = 1 << 30
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ZERO_CHECK_LIMIT = 16 << 20  # gaps are alignment padding (< 64 bytes); bigger ones are just content

SegmentKind = Literal["header", "tensor", "zero", "gap"]


class ManifestInvalid(TightwadError):
    """A piece manifest that cannot be trusted or used; the message says which field is wrong."""


def is_sha256(text: object) -> bool:
    # fullmatch: with match, `$` also matches before a trailing newline
    return isinstance(text, str) and bool(_HEX64.fullmatch(text))


def check_file_name(name: object) -> str:
    """`name` if it is a plain file name that stays inside a folder; otherwise ManifestInvalid.

    Peers are untrusted: a name like `../../etc/cron.d/x`, `/abs`, `.hidden` or `a/b` is refused
    (hidden names are ours: the download state lives in `.swarm/`).
    """
    if not isinstance(name, str) or not name or len(name.encode()) > 255:
        raise ManifestInvalid("the file name must be 1 to 255 bytes")
    if name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ManifestInvalid(f"refusing file name {name!r}: it must be a plain name, not a path")
    if any(ord(c) < 32 for c in name):
        raise ManifestInvalid(f"refusing file name {name!r}: it contains control characters")
    return name


@dataclass(frozen=True)
class Segment:
    """A byte range of the file keyed by its content: the GGUF header, one tensor's data, or a gap."""

    offset: int
    length: int
    sha256: str
    kind: SegmentKind
    name: str = ""

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class PieceManifest:
    name: str
    size: int
    sha256: str
    piece_size: int
    pieces: tuple[str, ...]
    segments: tuple[Segment, ...] = ()
    _segment_starts: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_segment_starts", [s.offset for s in self.segments])

    @property
    def count(self) -> int:
        return len(self.pieces)

    def span(self, index: int) -> tuple[int, int]:
        """`(start, end)` of piece `index`, end exclusive."""
        start = index * self.piece_size
        return start, min(start + self.piece_size, self.size)

    def piece_length(self, index: int) -> int:
        start, end = self.span(index)
        return end - start

    def pieces_in(self, start: int, end: int) -> range:
        """Indexes of the pieces that bytes [start, end) touch."""
        if end <= start:
            return range(0)
        return range(start // self.piece_size, (end - 1) // self.piece_size + 1)

    def segments_in(self, start: int, end: int) -> list[Segment]:
        """Segments overlapping bytes [start, end), in order."""
        first = max(bisect_right(self._segment_starts, start) - 1, 0)
        found = []
        for segment in self.segments[first:]:
            if segment.offset >= end:
                break
            if segment.end > start:
                found.append(segment)
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "pieceSize": self.piece_size,
            "pieces": list(self.pieces),
            "segments": [[s.offset, s.length, s.sha256, s.kind, s.name] for s in self.segments],
        }

    @classmethod
    def from_json(cls, data: Any) -> PieceManifest:
        """Validate and load a manifest from an untrusted source."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestInvalid(
                f"not a format-{FORMAT} piece manifest; is the peer a tightwad swarm server?"
            )
        name = check_file_name(data.get("name"))
        size, piece_size = data.get("size"), data.get("pieceSize")
        if not isinstance(size, int) or size < 0:
            raise ManifestInvalid("size must be a non-negative integer")
        if not isinstance(piece_size, int) or not MIN_PIECE_SIZE <= piece_size <= MAX_PIECE_SIZE:
            raise ManifestInvalid(f"pieceSize must be between {MIN_PIECE_SIZE} and {MAX_PIECE_SIZE} bytes")
        if not is_sha256(data.get("sha256")):
            raise ManifestInvalid("sha256 must be 64 lowercase hex digits")
        pieces = data.get("pieces")
        if not isinstance(pieces, list) or not all(is_sha256(p) for p in pieces):
            raise ManifestInvalid("pieces must be a list of SHA-256 hex digests")
        if len(pieces) != -(-size // piece_size):
            raise ManifestInvalid(
                f"{len(pieces)} pieces do not cover {size} bytes in {piece_size}-byte pieces"
            )
        segments = _load_segments(data.get("segments", []), size)
        return cls(name, size, data["sha256"], piece_size, tuple(pieces), segments)


def fingerprint(manifest: PieceManifest) -> str:
    """What a manifest says about the bytes (everything but the name): equal for honest peers that
    cut the same file into the same pieces, so peers' manifests can be compared and a false one
    remembered."""
    body = manifest.to_json()
    del body["name"]
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _load_segments(raw: Any, size: int) -> tuple[Segment, ...]:
    if not isinstance(raw, list):
        raise ManifestInvalid("segments must be a list")
    segments = []
    position = 0
    for item in raw:
        if not (isinstance(item, list) and len(item) == 5):
            raise ManifestInvalid("each segment is [offset, length, sha256, kind, name]")
        offset, length, digest, kind, name = item
        if not (isinstance(offset, int) and isinstance(length, int) and length > 0 and offset == position):
            raise ManifestInvalid("segments must be non-empty and cover the file in order without gaps")
        if (
            not is_sha256(digest)
            or kind not in ("header", "tensor", "zero", "gap")
            or not isinstance(name, str)
        ):
            raise ManifestInvalid(f"segment at offset {offset} is malformed")
        segments.append(Segment(offset, length, digest, kind, name))
        position = offset + length
    if segments and position != size:
        raise ManifestInvalid("segments must end where the file ends")
    return tuple(segments)


def _segment_plan(path: Path, size: int) -> list[tuple[int, int, SegmentKind, str]]:
    """(offset, length, kind, name) covering the file, from its GGUF layout; [] for other files."""
    layout = read_layout(path)
    if layout is None:
        return []
    plan: list[tuple[int, int, SegmentKind, str]] = [(0, layout.data_offset, "header", "header")]
    position = layout.data_offset
    for tensor in sorted(layout.tensors, key=lambda t: t.offset):
        if tensor.offset < position:
            return []  # overlapping tensors: not a layout we can key by content
        if tensor.offset > position:
            plan.append((position, tensor.offset - position, "gap", ""))
        if tensor.length:
            plan.append((tensor.offset, tensor.length, "tensor", tensor.name))
        position = tensor.offset + tensor.length
    if position < size:
        plan.append((position, size - position, "gap", ""))
    return [item for item in plan if item[1] > 0]


def build_manifest(
    path: Path,
    piece_size: int = DEFAULT_PIECE_SIZE,
    name: str | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> PieceManifest:
    """Hash `path` once into its piece manifest (whole file, pieces, and content segments for GGUF)."""
    if not MIN_PIECE_SIZE <= piece_size <= MAX_PIECE_SIZE:
        raise ManifestInvalid(f"piece size must be between {MIN_PIECE_SIZE} and {MAX_PIECE_SIZE} bytes")
    name = check_file_name(name or path.name)
    size = path.stat().st_size
    piece_bounds = [*range(0, size, piece_size), size] if size else [0]
    plan = _segment_plan(path, size)
    splits = [piece_bounds]
    if plan:
        splits.append([0, *(offset + length for offset, length, _, _ in plan)])
    whole, (pieces, *rest) = hash_file(path, splits, on_bytes)
    digests = rest[0] if rest else []
    segments = []
    for (offset, length, kind, seg_name), digest in zip(plan, digests, strict=True):
        if (
            kind == "gap"
            and length <= _ZERO_CHECK_LIMIT
            and digest == hashlib.sha256(bytes(length)).hexdigest()
        ):
            kind = "zero"
        segments.append(Segment(offset, length, digest, kind, seg_name))
    return PieceManifest(name, size, whole, piece_size, tuple(pieces), tuple(segments))
