"""Delta updates: which bytes of a wanted file already exist locally, found by content.

A new quantisation or a metadata edit shifts every tensor, so no fixed-offset piece matches the old
file; but each tensor's bytes (and the header, and zero padding) are keyed by SHA-256 in the
manifest, so they can be copied from whatever local file holds them. Pure: the plan says, for each
piece, which ranges to copy from local files, fill with zeros, or fetch; the puller executes it and
still verifies the whole piece's SHA-256, so a wrong local guess only costs a re-fetch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tightwad.swarm.pieces import PieceManifest

MERGE_BELOW = 4096  # a local run shorter than this between two fetched runs is fetched too: fewer requests


@dataclass(frozen=True)
class Copy:
    """Bytes [offset, offset+length) of the wanted file are at `source_offset` in local file `source`."""

    offset: int
    length: int
    source: Path
    source_offset: int


@dataclass(frozen=True)
class Fill:
    """Zero bytes (GGUF alignment padding)."""

    offset: int
    length: int


@dataclass(frozen=True)
class Fetch:
    """Bytes only a peer has."""

    offset: int
    length: int


Step = Copy | Fill | Fetch


class ContentIndex:
    """Where bytes with a given (SHA-256, length) live on this machine: every piece and segment of every
    local file whose manifest is known."""

    def __init__(self) -> None:
        self._where: dict[tuple[str, int], tuple[Path, int]] = {}

    def add(self, manifest: PieceManifest, path: Path) -> None:
        for index, digest in enumerate(manifest.pieces):
            start, end = manifest.span(index)
            self._where.setdefault((digest, end - start), (path, start))
        for segment in manifest.segments:
            if segment.kind != "zero":
                self._where.setdefault((segment.sha256, segment.length), (path, segment.offset))

    def find(self, sha256: str, length: int) -> tuple[Path, int] | None:
        return self._where.get((sha256, length))

    def __len__(self) -> int:
        return len(self._where)


def plan_piece(manifest: PieceManifest, index: int, local: ContentIndex) -> tuple[Step, ...]:
    """Steps that rebuild piece `index` in order; a single Fetch when nothing of it is local."""
    start, end = manifest.span(index)
    whole = local.find(manifest.pieces[index], end - start)
    if whole is not None:
        return (Copy(start, end - start, whole[0], whole[1]),)
    steps: list[Step] = []
    position = start
    for segment in manifest.segments_in(start, end):
        lo, hi = max(segment.offset, start), min(segment.end, end)
        if lo > position:  # not covered by any segment (a file without them): fetch
            steps.append(Fetch(position, lo - position))
        found = local.find(segment.sha256, segment.length) if segment.kind != "zero" else None
        if segment.kind == "zero":
            steps.append(Fill(lo, hi - lo))
        elif found is not None:
            steps.append(Copy(lo, hi - lo, found[0], found[1] + (lo - segment.offset)))
        else:
            steps.append(Fetch(lo, hi - lo))
        position = hi
    if position < end:
        steps.append(Fetch(position, end - position))
    return tuple(_merge(steps))


def _merge(steps: list[Step]) -> list[Step]:
    """Join neighbouring steps of one kind, and swallow short local runs between two fetches."""
    merged: list[Step] = []
    for step in steps:
        last = merged[-1] if merged else None
        if isinstance(step, Fetch) and isinstance(last, Fetch):
            merged[-1] = Fetch(last.offset, last.length + step.length)
        elif isinstance(step, Fill) and isinstance(last, Fill):
            merged[-1] = Fill(last.offset, last.length + step.length)
        elif (
            isinstance(step, Copy)
            and isinstance(last, Copy)
            and last.source == step.source
            and last.source_offset + last.length == step.source_offset
        ):
            merged[-1] = Copy(last.offset, last.length + step.length, last.source, last.source_offset)
        else:
            merged.append(step)
    # A short Copy/Fill sandwiched between fetches costs a second request; fetch it instead.
    result: list[Step] = []
    for i, step in enumerate(merged):
        before = result[-1] if result else None
        after = merged[i + 1] if i + 1 < len(merged) else None
        if (
            not isinstance(step, Fetch)
            and step.length < MERGE_BELOW
            and isinstance(before, Fetch)
            and isinstance(after, Fetch)
        ) or (isinstance(step, Fetch) and isinstance(before, Fetch)):
            result[-1] = Fetch(before.offset, before.length + step.length)
        else:
            result.append(step)
    return result


def fetched_bytes(steps: tuple[Step, ...]) -> int:
    return sum(step.length for step in steps if isinstance(step, Fetch))


def is_fetch_only(steps: tuple[Step, ...]) -> bool:
    return all(isinstance(step, Fetch) for step in steps)


def plan_all(manifest: PieceManifest, local: ContentIndex) -> dict[int, tuple[Step, ...]]:
    """Plans for the pieces that need fewer fetched bytes than the whole piece (the rest: plain fetch)."""
    plans = {}
    for index in range(manifest.count):
        steps = plan_piece(manifest, index, local)
        if not is_fetch_only(steps):
            plans[index] = steps
    return plans
