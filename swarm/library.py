"""What this node can serve: complete files (with cached piece manifests) and downloads in progress.

A complete file's manifest is cached in `FOLDER/.swarm/manifests/NAME.json` with the size and mtime
it was computed for, so a restart does not rehash gigabytes; a file that changed is hashed again.
Only regular files directly inside the folder are served, never symlinks or hidden files, so a
request can never reach outside it.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tightwad.swarm.bitfield import Bitfield
from tightwad.swarm.pieces import ManifestInvalid, PieceManifest, build_manifest, check_file_name
from tightwad.swarm.seeding import UploadLedger
from tightwad.swarm.storage import state_dir


@dataclass
class Entry:
    """One file this node serves. While downloading, `path` is the partial file and `have` grows."""

    manifest: PieceManifest
    path: Path
    have: Bitfield
    ledger: UploadLedger | None = None  # set on an origin that seeds initially (see seeding.py)

    def offered(self) -> Bitfield:
        """The have-map peers are shown."""
        return self.ledger.offer(self.have) if self.ledger is not None else self.have

    @property
    def complete(self) -> bool:
        return self.have.complete

    def offers(self, start: int, end: int) -> bool:
        """True when every piece overlapping bytes [start, end) is offered to peers right now."""
        offered = self.offered()
        return all(index in offered for index in self.manifest.pieces_in(start, end))

    def holds(self, start: int, end: int) -> bool:
        """True when every piece overlapping bytes [start, end) is verified here."""
        return all(index in self.have for index in self.manifest.pieces_in(start, end))


class Library:
    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> None:
        self._entries[entry.manifest.sha256] = entry

    def remove(self, sha256: str) -> None:
        self._entries.pop(sha256, None)

    def get(self, sha256: str) -> Entry | None:
        return self._entries.get(sha256)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)


def _cache_path(path: Path) -> Path:
    return state_dir(path.parent) / "manifests" / f"{path.name}.json"


def cached_manifest(path: Path, piece_size: int | None) -> PieceManifest | None:
    """The cached manifest of `path` if it was computed for this exact size and mtime, and for
    `piece_size` (any piece size when None: segments, used for delta reuse, do not depend on it)."""
    try:
        info = path.stat()
        record = json.loads(_cache_path(path).read_text(encoding="utf-8"))
        if (record.get("size"), record.get("mtimeNs")) != (info.st_size, info.st_mtime_ns):
            return None
        if piece_size is not None and record.get("pieceSize") != piece_size:
            return None
        manifest = PieceManifest.from_json(record["manifest"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ManifestInvalid):
        return None
    return manifest if manifest.name == path.name and manifest.size == info.st_size else None


def store_manifest(path: Path, manifest: PieceManifest, mtime_ns: int | None = None) -> bool:
    """Cache `manifest` for `path`; False (not an error) when the folder is read-only."""
    info = path.stat()
    record = {
        "size": info.st_size,
        "mtimeNs": info.st_mtime_ns if mtime_ns is None else mtime_ns,
        "pieceSize": manifest.piece_size,
        "manifest": manifest.to_json(),
    }
    cache = _cache_path(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, cache)
    except OSError:
        return False
    return True


def manifest_for(path: Path, piece_size: int, on_bytes: Callable[[int], None] | None = None) -> PieceManifest:
    """The piece manifest of a local file: cached, or computed (one read of the file) and cached."""
    manifest = cached_manifest(path, piece_size)
    if manifest is None:
        before = path.stat().st_mtime_ns
        manifest = build_manifest(path, piece_size, on_bytes=on_bytes)
        store_manifest(path, manifest, before)  # the mtime it was hashed at: a change since means rehash
    return manifest


def servable_files(folder: Path) -> list[Path]:
    """Regular, non-hidden files directly inside `folder` (symlinks are not followed)."""
    found = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    for name in names:
        try:
            check_file_name(name)
            info = os.lstat(folder / name)
        except (ManifestInvalid, OSError):
            continue
        if stat.S_ISREG(info.st_mode):
            found.append(folder / name)
    return found


def complete_entry(path: Path, manifest: PieceManifest, super_seed: bool = False) -> Entry:
    ledger = UploadLedger(manifest.count) if super_seed else None
    return Entry(manifest, path, Bitfield(manifest.count, range(manifest.count)), ledger)
