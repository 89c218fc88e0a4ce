"""Local bytes a download can use instead of fetching: a copy already under the final name, and the
pieces and content segments of every local file whose manifest is known (delta updates). Blocking
functions; the puller runs them in worker threads."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from tightwad.errors import TightwadError
from tightwad.swarm.delta import ContentIndex, Copy, Fill, Step
from tightwad.swarm.hashing import BLOCK
from tightwad.swarm.library import cached_manifest, manifest_for, servable_files
from tightwad.swarm.pieces import PieceManifest
from tightwad.swarm.storage import PartialDownload

Absorb = Callable[[int, bytes | memoryview], None]


class LocalSourceGone(TightwadError, OSError):  # OSError: readers of local files catch that
    """A local file is shorter than its manifest says (it changed); the piece is fetched instead."""


def existing_copy(folder: Path, manifest: PieceManifest) -> tuple[bool, PieceManifest | None]:
    """(the wanted file is already in place, the manifest of whatever file holds its name now). A file
    under the name is hashed if its manifest is not cached: it is the likeliest source of a delta."""
    final = folder / manifest.name
    if not final.is_file() or final.is_symlink():
        return False, None
    current = manifest_for(final, manifest.piece_size)
    return current.sha256 == manifest.sha256, current


def content_index(
    manifest: PieceManifest, folders: Iterable[Path], current: PieceManifest | None, final: Path
) -> ContentIndex:
    """Index the file under the final name (`current`) and every file in `folders` whose manifest is
    cached (others are not hashed here: a folder of 40 GB models would take minutes)."""
    index = ContentIndex()
    if current is not None:
        index.add(current, final)
    for folder in folders:
        for path in servable_files(folder):
            known = cached_manifest(path, None) if path != final else None
            if known is not None:
                index.add(known, path)
    return index


def feed_local(step: Copy | Fill, absorb: Absorb) -> None:
    """Feed a Copy or Fill step's bytes to `absorb` in 1 MiB blocks."""
    offset, remaining = step.offset, step.length
    if isinstance(step, Fill):
        zeros = memoryview(bytes(min(BLOCK, remaining)))
        while remaining:
            take = min(len(zeros), remaining)
            absorb(offset, zeros[:take])
            offset, remaining = offset + take, remaining - take
        return
    source = step.source_offset
    try:
        f = open(step.source, "rb", buffering=0)  # noqa: SIM115 - closed by the `with` below
    except FileNotFoundError:
        raise LocalSourceGone(f"{step.source} is gone since its manifest was taken") from None
    with f:
        while remaining:
            data = os.pread(f.fileno(), min(BLOCK, remaining), source)
            if not data:
                raise LocalSourceGone(f"{step.source} is shorter than its manifest says")
            absorb(offset, data)
            offset, source, remaining = offset + len(data), source + len(data), remaining - len(data)


def assemble_local(download: PartialDownload, piece: int, steps: tuple[Step, ...]) -> bool:
    """Rebuild `piece` from local bytes alone, verify and commit it. False when it did not verify (a
    local file changed since its manifest was taken) or could not be read."""
    writer = object()
    download.claim(piece, writer)
    digest = hashlib.sha256()

    def absorb(offset: int, data: bytes | memoryview) -> None:
        digest.update(data)
        download.write(piece, writer, offset, data)

    try:
        for step in steps:
            if not isinstance(step, Copy | Fill):
                raise ValueError("a local-only plan has no fetch steps")
            feed_local(step, absorb)
    except OSError:
        return False
    if digest.hexdigest() != download.manifest.pieces[piece]:
        return False
    download.commit(piece)
    return True
