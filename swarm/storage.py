"""A download's state on disk, beside (never under) its final name.

    MODEL_DIR/.swarm/<sha256>.partial        the bytes, written in place (a sparse file at first)
    MODEL_DIR/.swarm/<sha256>.have           which pieces are verified and on disk (JSON)
    MODEL_DIR/.swarm/<sha256>.manifest.json  the piece manifest, so a restart needs no peer to resume
    MODEL_DIR/.swarm/<sha256>.rejected       manifests of this file that proved false (never used again)

A piece is recorded in `.have` only after its bytes are flushed (fdatasync), so after a crash the
have-map never claims bytes that are not there: a restart re-fetches at most the pieces that were in
flight. The final name appears by one atomic rename, after the whole-file SHA-256 matched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

from tightwad.errors import TightwadError
from tightwad.swarm.bitfield import Bitfield
from tightwad.swarm.hashing import BLOCK
from tightwad.swarm.pieces import ManifestInvalid, PieceManifest, fingerprint

STATE_DIR = ".swarm"
REJECTED_KEPT = 16  # a forger can mint new manifests at will; remembering the last few is enough


class DownloadCorrupt(TightwadError):
    """Every piece verified but the whole file did not: the manifest the peers served is inconsistent."""


class NoSpace(TightwadError):
    """The folder has too little free space for the file; nothing was allocated."""


def state_dir(folder: Path) -> Path:
    return folder / STATE_DIR


def free_bytes(folder: Path) -> int:
    """Bytes this process may still write in `folder` (what is left for non-root users)."""
    return shutil.disk_usage(folder).free


def is_no_space(exc: BaseException | None) -> bool:
    """True when `exc`, or an exception it was raised from, is a full disk or an exhausted quota."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class PartialDownload:
    def __init__(self, folder: Path, manifest: PieceManifest) -> None:
        self.folder = folder
        self.manifest = manifest
        state = state_dir(folder)
        self.final_path = folder / manifest.name
        self.partial_path = state / f"{manifest.sha256}.partial"
        self.have_path = state / f"{manifest.sha256}.have"
        self.manifest_path = state / f"{manifest.sha256}.manifest.json"
        self.have = Bitfield(manifest.count)  # owned by the event loop thread
        self._persisted = Bitfield(manifest.count)  # owned by commit threads, under _commit_lock
        self._commit_lock = threading.Lock()
        self._piece_locks = [threading.Lock() for _ in range(manifest.count)]
        self._owners: dict[int, object] = {}
        self._fd = -1
        self._digest = hashlib.sha256()
        self._digest_frontier = 0  # pieces [0, frontier) are in `_digest`
        self._digest_lock = threading.Lock()

    # -- opening and resuming

    def open(self) -> Bitfield:
        """Create or resume the partial file; returns the pieces already verified on disk."""
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        resumed = self._load_have()
        self._check_space()
        self._fd = os.open(self.partial_path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size != self.manifest.size:
            resumed = Bitfield(self.manifest.count)  # a different or truncated file: start over
        os.ftruncate(self._fd, self.manifest.size)
        _write_atomic(self.manifest_path, json.dumps(self.manifest.to_json()))
        for index in resumed:
            self.have.add(index)
            self._persisted.add(index)
        self._write_have()
        return self.have.copy()

    def _check_space(self) -> None:
        """Refuse before allocating: a sparse file the size of a lie would fill the disk as it grows."""
        try:
            allocated = os.stat(self.partial_path).st_blocks * 512
        except FileNotFoundError:
            allocated = 0
        needed = max(0, self.manifest.size - allocated)
        free = free_bytes(self.folder)
        if free < needed:
            raise NoSpace(
                f"{self.folder}: {free} bytes free, but {self.manifest.name} needs {needed} bytes more "
                f"({self.manifest.size} bytes in all); free some space or pull into another folder"
            )

    def _load_have(self) -> Bitfield:
        empty = Bitfield(self.manifest.count)
        if not self.partial_path.exists():
            return empty
        try:
            data = json.loads(self.have_path.read_text(encoding="utf-8"))
            if (
                data.get("sha256") != self.manifest.sha256
                or data.get("pieceSize") != self.manifest.piece_size
            ):
                return empty
            return Bitfield.decode(self.manifest.count, data["have"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return empty  # no or unreadable record: nothing is trusted

    def _write_have(self) -> None:
        record = {
            "sha256": self.manifest.sha256,
            "pieceSize": self.manifest.piece_size,
            "have": self._persisted.encode(),
        }
        _write_atomic(self.have_path, json.dumps(record))

    @property
    def fd(self) -> int:
        return self._fd

    # -- writing pieces (called from worker threads)

    def claim(self, piece: int, writer: object) -> None:
        """Make `writer` the only one whose writes to `piece` land (earlier writers become no-ops)."""
        with self._piece_locks[piece]:
            self._owners[piece] = writer

    def write(self, piece: int, writer: object, offset: int, data: bytes | memoryview) -> bool:
        """pwrite `data` at `offset` if `writer` still owns `piece`; False when it no longer does."""
        with self._piece_locks[piece]:
            if self._owners.get(piece) is not writer:
                return False
            view = memoryview(data)
            while view:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
            return True

    def commit(self, piece: int) -> None:
        """Flush, then record `piece` as held (blocking; run it in a thread). Call `mark_have` after."""
        os.fdatasync(self._fd)
        with self._commit_lock:
            self._persisted.add(piece)
            self._write_have()
        with self._piece_locks[piece]:
            self._owners.pop(piece, None)

    def mark_have(self, piece: int) -> None:
        self.have.add(piece)

    def forget(self, piece: int) -> None:
        """Drop a piece from the record (a failed whole-file check); blocking."""
        with self._commit_lock:
            self._persisted.discard(piece)
            self._write_have()
        self.have.discard(piece)

    # -- whole-file digest, computed in order as the verified prefix grows

    def advance_digest(self) -> None:
        """Hash the verified pieces that extend the in-order prefix (blocking; run it in a thread)."""
        buffer = bytearray(BLOCK)
        view = memoryview(buffer)
        with self._digest_lock:
            while self._digest_frontier < self.manifest.count and self._digest_frontier in self._persisted:
                offset, end = self.manifest.span(self._digest_frontier)
                while offset < end:
                    got = os.preadv(self._fd, [view[: min(BLOCK, end - offset)]], offset)
                    if got == 0:
                        raise OSError(f"{self.partial_path} is shorter than expected")
                    self._digest.update(view[:got])
                    offset += got
                self._digest_frontier += 1

    def whole_digest(self) -> str:
        self.advance_digest()
        if self._digest_frontier != self.manifest.count:
            raise RuntimeError("the whole-file digest was asked for before every piece arrived")
        return self._digest.hexdigest()

    # -- finishing

    def finalize(self) -> Path:
        """Check the whole-file SHA-256, then rename into place atomically (blocking)."""
        digest = self.whole_digest()
        if digest != self.manifest.sha256:
            raise DownloadCorrupt(
                f"{self.manifest.name}: every piece verified but the file's SHA-256 is {digest}, not "
                f"{self.manifest.sha256}; the peers' manifest is false, so the download was discarded "
                "and that manifest will not be used again"
            )
        os.fchmod(self._fd, 0o644)  # models are read by servers that may run as another user
        os.fsync(self._fd)
        os.replace(self.partial_path, self.final_path)
        _fsync_dir(self.folder)
        self.close()
        for path in (self.have_path, self.manifest_path, rejected_path(self.folder, self.manifest.sha256)):
            path.unlink(missing_ok=True)
        return self.final_path

    def discard(self) -> None:
        self.close()
        discard_state(self.folder, self.manifest.sha256)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard_state(folder: Path, sha256: str) -> None:
    """Forget an interrupted download of `sha256`: its bytes, have-map and saved manifest."""
    for suffix in (".partial", ".have", ".manifest.json"):
        (state_dir(folder) / f"{sha256}{suffix}").unlink(missing_ok=True)


def rejected_path(folder: Path, sha256: str) -> Path:
    return state_dir(folder) / f"{sha256}.rejected"


def rejected_manifests(folder: Path, sha256: str) -> list[str]:
    """Fingerprints of the manifests of `sha256` that proved false here (see `reject_manifest`)."""
    try:
        found = json.loads(rejected_path(folder, sha256).read_text(encoding="utf-8"))["fingerprints"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [f for f in found if isinstance(f, str)] if isinstance(found, list) else []


def reject_manifest(folder: Path, sha256: str, manifest: PieceManifest) -> None:
    """Remember that `manifest` is false (its pieces verified but the whole file did not, or every
    peer's bytes contradicted it), so no later pull of `sha256` in `folder` uses it again."""
    kept = [f for f in rejected_manifests(folder, sha256) if f != fingerprint(manifest)]
    kept = [*kept, fingerprint(manifest)][-REJECTED_KEPT:]
    state_dir(folder).mkdir(parents=True, exist_ok=True)
    _write_atomic(rejected_path(folder, sha256), json.dumps({"fingerprints": kept}))


def saved_manifest(folder: Path, sha256: str) -> PieceManifest | None:
    """The manifest an interrupted download saved, so it can resume without asking a peer."""
    path = state_dir(folder) / f"{sha256}.manifest.json"
    try:
        manifest = PieceManifest.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ManifestInvalid):
        return None
    return manifest if manifest.sha256 == sha256 else None


def interrupted_downloads(folder: Path) -> list[tuple[PieceManifest, int]]:
    """(manifest, pieces held) for every resumable download in `folder`."""
    found = []
    for path in sorted(state_dir(folder).glob("*.manifest.json")):
        manifest = saved_manifest(folder, path.name.removesuffix(".manifest.json"))
        if manifest is None:
            continue
        try:
            record = json.loads((state_dir(folder) / f"{manifest.sha256}.have").read_text(encoding="utf-8"))
            held = len(Bitfield.decode(manifest.count, record["have"]))
        except (OSError, ValueError, KeyError, TypeError):
            held = 0
        found.append((manifest, held))
    return found
