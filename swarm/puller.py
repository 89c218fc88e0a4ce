"""The puller: one file, fetched piece by piece from every peer that holds pieces of it.

The decisions and the state are pure and live elsewhere (piecebook.py: where each piece stands
and which comes next; tally.py: bytes and pieces moved; scoring.py: which peer is trusted and how
fast; delta.py: which bytes already exist locally). This module does the I/O: have-map refresh,
parallel range requests, verification, commits, endgame races, and the final atomic rename. Every
piece's SHA-256 is checked before it is recorded or served to anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tightwad.errors import TightwadError
from tightwad.swarm.assign import plan_requests
from tightwad.swarm.bitfield import Bitfield
from tightwad.swarm.client import NotHeld, PeerError, SwarmClient, Unauthorized
from tightwad.swarm.delta import Fetch, is_fetch_only, plan_all
from tightwad.swarm.library import Entry, Library, store_manifest
from tightwad.swarm.piecebook import PieceBook
from tightwad.swarm.pieces import PieceManifest, check_file_name, fingerprint, is_sha256
from tightwad.swarm.progress import EventLog, NoProgress, ProgressView
from tightwad.swarm.reuse import LocalSourceGone, assemble_local, content_index, existing_copy, feed_local
from tightwad.swarm.scoring import PeerScore
from tightwad.swarm.storage import (
    DownloadCorrupt,
    NoSpace,
    PartialDownload,
    discard_state,
    is_no_space,
    reject_manifest,
    rejected_manifests,
    saved_manifest,
)
from tightwad.swarm.tally import Tally
from tightwad.swarm.tracker import normalise_peer_url

FLUSH = 1 << 20  # hash and write received bytes in 1 MiB batches, in a worker thread
ANNOUNCE_EVERY = 30.0
MANIFEST_SAMPLE = 8  # peers asked for the manifest, to compare what they say before trusting one


class PullError(TightwadError):
    """The download cannot finish; the message says what is missing and what to check."""


class ManifestContradicted(PullError):
    """Every peer is banned for pieces that did not match our manifest, and some of them serve a
    different manifest of the file: ours is the likelier liar, so it is dropped for the next pull."""


class _Corrupt(TightwadError):
    """A piece from a peer did not match its SHA-256 (counts towards the peer's ban)."""


class _LocalStale(TightwadError):
    """The local part of a piece could not be read (the local file shrank or went): not the peer's
    fault; the piece is fetched whole."""


@dataclass
class PullOptions:
    peers: list[str] = field(default_factory=list)
    trackers: list[str] = field(default_factory=list)
    token: str | None = None
    token_hosts: frozenset[str] | None = None  # where the token may go (None: every peer and tracker)
    slots_per_peer: int = 2  # parallel requests to one peer: more only slow each piece down (see bench)
    refresh: float = 1.0  # seconds between have-map refreshes
    tracker_refresh: float = 5.0
    stall_timeout: float = 120.0  # give up after this long without a byte of progress
    corrupt_limit: int = 2  # corrupt pieces before a peer is banned
    endgame_memory: int = 256 << 20  # endgame duplicates are buffered in memory, up to this much
    reuse: list[Path] = field(default_factory=list)  # more folders whose files' bytes may be reused
    advertise: str | None = None  # our own server's URL, announced to trackers
    rng_seed: int | None = None


@dataclass
class PeerState:
    url: str
    score: PeerScore
    have: Bitfield | None = None  # None: unknown (not yet asked, or unreachable)
    active: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    reason: str = ""  # why it was banned
    manifest: str | None = None  # the fingerprint of the manifest it served, if we asked


@dataclass
class PullResult:
    path: Path
    manifest: PieceManifest
    seconds: float
    bytes_fetched: int  # bytes received from peers, including failed and duplicate requests
    bytes_local: int  # bytes rebuilt from local files (delta) instead of fetched
    pieces_fetched: int
    pieces_local: int
    pieces_resumed: int
    peers: dict[str, dict[str, Any]]

    def summary(self) -> str:
        mb = 1e6
        used = sum(1 for p in self.peers.values() if p["pieces"])
        return (
            f"{self.manifest.name}: {self.manifest.size / mb:.1f} MB in {self.seconds:.1f}s, "
            f"{self.bytes_fetched / mb:.1f} MB fetched from {used} "
            f"peers, {self.bytes_local / mb:.1f} MB reused locally, {self.pieces_resumed} pieces resumed"
        )


class BackgroundDigest:
    """Hashes the file's verified prefix in a worker thread, one run at a time, so the final check is
    nearly free. A run takes in whatever prefix is verified when it starts; later pieces start the
    next run."""

    def __init__(self) -> None:
        self.running = False
        self.task: asyncio.Future[None] | None = None  # held so the loop does not drop the task

    def advance(self, download: PartialDownload) -> None:
        if self.running:
            return
        self.running = True

        async def run() -> None:
            try:
                await asyncio.to_thread(download.advance_digest)
            finally:
                self.running = False

        self.task = asyncio.ensure_future(run())


class Puller:
    """One pull: finds the manifest, opens (or resumes) the partial file, keeps every usable peer's
    request slots busy, and renames the verified file into place."""

    def __init__(
        self,
        folder: Path,
        options: PullOptions,
        *,
        sha256: str | None = None,
        name: str | None = None,
        manifest: PieceManifest | None = None,
        library: Library | None = None,
        events: EventLog | None = None,
        progress: ProgressView | None = None,
        on_state: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if not (sha256 or name or manifest):
            raise ValueError("say which file: a sha256, a name or a manifest")
        if name is not None:
            check_file_name(name)  # the final path is ours to decide: it must stay in the folder
        self.folder = folder
        self.options = options
        self.want_sha256 = sha256 or (manifest.sha256 if manifest else None)
        self.want_name = name  # the final name when given (with a sha256 too); else the peers' name
        self.manifest = manifest
        self.library = library
        self.events = events or EventLog(None)
        self.progress = progress or NoProgress()
        self.on_state = on_state
        self.rng = random.Random(options.rng_seed)
        self.me = normalise_peer_url(options.advertise) if options.advertise else None
        self.client: SwarmClient | None = None
        self.download: PartialDownload | None = None
        self.book: PieceBook[asyncio.Task[None]] | None = None  # both set once the manifest is known
        self.peers: dict[str, PeerState] = {}
        for url in options.peers:
            self._add_peer(url)
        self.trackers = [u for u in (normalise_peer_url(t) for t in options.trackers) if u]
        self.tally = Tally()
        self.digest = BackgroundDigest()
        self.wake = asyncio.Event()
        self.fatal: BaseException | None = None
        self.manifest_fingerprint: str | None = None  # of a manifest chosen among peers' answers
        self._next_announce = 0.0

    # -- peers

    def _add_peer(self, url: str) -> None:
        normal = normalise_peer_url(url)
        if normal and normal != self.me and normal not in self.peers:
            self.peers[normal] = PeerState(normal, PeerScore(corrupt_limit=self.options.corrupt_limit))
            self._peers_changed()

    def _peers_changed(self) -> None:
        if self.book is not None:
            self.book.peers_changed()

    async def _discover(self, sha256: str) -> None:
        assert self.client is not None
        for tracker in self.trackers:
            try:
                for url in await self.client.tracked_peers(tracker, sha256):
                    self._add_peer(url)
            except PeerError as exc:
                self.events.emit("tracker-error", tracker=tracker, error=str(exc))

    async def _announce(self, sha256: str) -> None:
        assert self.client is not None
        if not self.me:
            return
        self._next_announce = time.monotonic() + ANNOUNCE_EVERY
        for tracker in self.trackers:
            with contextlib.suppress(PeerError):
                await self.client.announce(tracker, sha256, self.me)

    def _ban(self, peer: PeerState, reason: str) -> None:
        if not peer.score.banned or not peer.reason:
            peer.score.banned = True
            peer.reason = reason
            peer.have = None
            self._peers_changed()
            self.events.emit("peer-banned", peer=peer.url, reason=reason)

    async def _refresh_have(self, peer: PeerState, manifest: PieceManifest) -> None:
        assert self.client is not None
        try:
            peer.have = await self.client.have(peer.url, manifest.sha256, manifest.count)
        except Unauthorized as exc:
            self._ban(peer, str(exc))
        except NotHeld:
            peer.have = Bitfield(manifest.count)  # it does not have the file (yet)
        except PeerError as exc:
            if peer.have is not None or peer.score.failures == 0:
                self.events.emit("peer-unreachable", peer=peer.url, error=str(exc))
            peer.score.on_failure(time.monotonic())
            peer.have = None
        self._peers_changed()

    async def _refresh_loop(self, manifest: PieceManifest) -> None:
        # Peers that start together announce together: ask the trackers again soon, then less often.
        interval = self.options.refresh
        next_tracker = time.monotonic() + interval
        while True:
            await asyncio.sleep(self.options.refresh)
            now = time.monotonic()
            if self.trackers and now >= next_tracker:
                interval = min(2 * interval, self.options.tracker_refresh)
                next_tracker = now + interval
                await self._discover(manifest.sha256)
            if now >= self._next_announce:
                await self._announce(manifest.sha256)
            due = [p for p in self.peers.values() if p.score.usable(now)]
            await asyncio.gather(*(self._refresh_have(p, manifest) for p in due))
            self.wake.set()

    # -- finding the manifest

    async def _resolve_manifest(self) -> PieceManifest:
        """The manifest to pull: the caller's, else the one most peers agree on. A peer's manifest is
        untrusted: one whose name or size is not what was asked, that other peers contradict, or that
        proved false here before is refused, and the peer that served it is not used."""
        assert self.client is not None
        if self.manifest is not None:
            return self.manifest
        sha256 = self.want_sha256 or await self._sha_for_name()
        self.want_sha256 = sha256
        rejected = await asyncio.to_thread(rejected_manifests, self.folder, sha256)
        saved = saved_manifest(self.folder, sha256)
        if saved is not None and (fingerprint(saved) in rejected or self._not_as_asked(saved)):
            await asyncio.to_thread(discard_state, self.folder, sha256)
            saved = None
        await self._discover(sha256)
        answers, errors = await self._ask_manifests(sha256)
        if not answers and saved is not None:
            return saved  # resuming with no peer to ask: the saved one is all there is
        chosen, refused = choose_manifest(answers, want_name=self.want_name, rejected=rejected, prefer=saved)
        for url, reason in refused.items():
            self.events.emit("manifest-refused", peer=url, reason=reason)
            self._ban(self.peers[url], reason)
            errors.append(f"{url}: {reason}")
        if chosen is None:
            detail = "; ".join(errors) if errors else "no peers were given (--peer URL or --tracker URL)"
            raise PullError(f"no peer could serve a usable manifest of {sha256}: {detail}")
        if saved is not None and fingerprint(saved) != fingerprint(chosen):
            # What was saved is not what the peers say now: start over rather than trust it.
            self.events.emit("manifest-replaced", sha256=sha256)
            await asyncio.to_thread(discard_state, self.folder, sha256)
        self.manifest_fingerprint = fingerprint(chosen)
        return chosen

    def _not_as_asked(self, manifest: PieceManifest) -> bool:
        return self.want_name is not None and manifest.name != self.want_name

    async def _ask_manifests(self, sha256: str) -> tuple[dict[str, PieceManifest], list[str]]:
        """Each of the first MANIFEST_SAMPLE usable peers' manifest of `sha256` (those that hold it)."""
        assert self.client is not None
        client = self.client
        asked = [p for p in self.peers.values() if not p.score.banned][:MANIFEST_SAMPLE]
        answers: dict[str, PieceManifest] = {}
        errors: list[str] = []

        async def ask(peer: PeerState) -> None:
            try:
                manifest = await client.manifest(peer.url, sha256)
            except Unauthorized as exc:
                self._ban(peer, str(exc))
                errors.append(str(exc))
            except PeerError as exc:
                errors.append(str(exc))
            else:
                answers[peer.url] = manifest
                peer.manifest = fingerprint(manifest)

        await asyncio.gather(*(ask(p) for p in asked))
        return {p.url: answers[p.url] for p in asked if p.url in answers}, errors  # in peer order

    async def _sha_for_name(self) -> str:
        """The SHA-256 of the complete file named `want_name`, as the first peer that lists it says."""
        assert self.client is not None
        errors = []
        for peer in list(self.peers.values()):
            try:
                for item in await self.client.files(peer.url):
                    if item.get("name") == self.want_name and item.get("complete"):
                        sha256 = item.get("sha256")
                        if is_sha256(sha256):  # it names files and URLs: nothing else gets through
                            return str(sha256)
            except PeerError as exc:
                errors.append(str(exc))
        what = f"a complete file named {self.want_name!r}"
        detail = "; ".join(errors) if errors else "no peers were given (--peer URL or --tracker URL)"
        if self.peers and not errors:
            detail = "no peer lists it"
        raise PullError(f"no peer could serve the manifest of {what}: {detail}")

    # -- local bytes (delta)

    async def _local_worker(self, pieces: list[int]) -> None:
        assert self.download is not None and self.book is not None
        book = self.book
        for piece in pieces:
            steps = book.plans[piece]
            try:
                ok = await asyncio.to_thread(assemble_local, self.download, piece, steps)
            except Exception as exc:  # a local failure (disk full, ...): stop the whole pull
                self.fatal = exc
                self.wake.set()
                return
            book.local_done(piece, ok)
            if ok:
                self.download.mark_have(piece)
                self.tally.local_piece(self.download.manifest.piece_length(piece), time.monotonic())
                self.events.emit("piece-local", piece=piece)
                self.digest.advance(self.download)
            else:  # a local file changed since its manifest was taken: the book wants it fetched
                self.events.emit("piece-local-failed", piece=piece)
            self.wake.set()

    # -- fetching one piece

    async def _transfer(self, peer: PeerState, piece: int, duplicate: bool) -> tuple[int, bool]:
        """Fetch, verify and commit one piece from `peer`: (bytes received, whether this request won)."""
        assert self.client is not None and self.download is not None and self.book is not None
        download, book = self.download, self.book
        manifest = download.manifest
        start, end = manifest.span(piece)
        steps = book.steps(piece)
        writer = object()
        buffer = bytearray(end - start) if duplicate else None
        if buffer is None:
            download.claim(piece, writer)
        digest = hashlib.sha256()
        lost = False
        received = 0
        task = asyncio.current_task()
        assert task is not None

        def absorb(offset: int, data: bytes | memoryview) -> None:
            nonlocal lost
            digest.update(data)
            if buffer is not None:
                buffer[offset - start : offset - start + len(data)] = data
            elif not download.write(piece, writer, offset, data):
                lost = True

        for step in steps:
            if not isinstance(step, Fetch):
                try:
                    await asyncio.to_thread(feed_local, step, absorb)
                except LocalSourceGone as exc:
                    book.drop_plan(piece)  # as for a stale local part: next time fetch it all
                    raise _LocalStale(f"piece {piece}: {exc}; fetching it whole") from None
                continue
            position = step.offset
            pending = bytearray()
            async with self.client.byte_range(
                peer.url, manifest.sha256, step.offset, step.offset + step.length
            ) as chunks:
                async for chunk in chunks:
                    pending += chunk
                    received += len(chunk)
                    self.tally.received(task, len(chunk), received)
                    if len(pending) >= FLUSH:
                        await asyncio.to_thread(absorb, position, pending)
                        position += len(pending)
                        pending = bytearray()
            if pending:
                await asyncio.to_thread(absorb, position, pending)
        if digest.hexdigest() != manifest.pieces[piece]:
            if not is_fetch_only(steps):
                book.drop_plan(piece)  # maybe the local part was stale: next time fetch it all
                raise PeerError(f"piece {piece} rebuilt from local bytes did not verify; fetching it whole")
            raise _Corrupt(f"piece {piece} from {peer.url} does not match its SHA-256")
        if lost or not book.can_commit(piece):
            return received, False  # another request for this piece won the race
        book.begin_commit(piece)
        try:
            for url, other in book.rivals(piece, task):
                other.cancel()
                self.events.emit("fetch-cancel", piece=piece, peer=url)
            if buffer is not None:
                download.claim(piece, writer)
                await asyncio.to_thread(download.write, piece, writer, start, buffer)
            await asyncio.to_thread(download.commit, piece)
        finally:
            book.end_commit(piece)
        download.mark_have(piece)
        local = sum(step.length for step in steps if not isinstance(step, Fetch))
        self.tally.fetched_piece(local, time.monotonic())
        self.digest.advance(download)
        return received, True

    async def _fetch(self, peer: PeerState, piece: int, duplicate: bool) -> None:
        """One request, with its outcome recorded in the peer's score. Never raises but CancelledError."""
        assert self.book is not None
        book = self.book
        began = time.monotonic()
        self.events.emit("fetch", piece=piece, peer=peer.url, duplicate=duplicate)
        try:
            received, committed = await self._transfer(peer, piece, duplicate)
        except asyncio.CancelledError:
            raise
        except _Corrupt as exc:
            peer.score.on_corrupt(piece, time.monotonic())
            self.events.emit("piece-corrupt", piece=piece, peer=peer.url, error=str(exc))
            if peer.score.banned:
                self._ban(peer, f"served {peer.score.corrupt} corrupt pieces")
        except _LocalStale as exc:
            self.events.emit("piece-local-failed", piece=piece, error=str(exc))
        except Unauthorized as exc:
            self._ban(peer, str(exc))
        except NotHeld:
            if peer.have is not None:
                peer.have.discard(piece)
                book.peers_changed()
            self.events.emit("fetch-not-held", piece=piece, peer=peer.url)
        except PeerError as exc:
            peer.score.on_failure(time.monotonic())
            peer.have = None
            book.peers_changed()
            self.events.emit("fetch-error", piece=piece, peer=peer.url, error=str(exc))
        except Exception as exc:  # a local failure (disk full, ...): stop the whole pull
            self.fatal = exc
        else:
            seconds = time.monotonic() - began
            if committed:
                peer.score.on_success(received, seconds)
                self.tally.request_took(seconds)
                self.events.emit("piece-ok", piece=piece, peer=peer.url, bytes=received, duplicate=duplicate)
            else:
                self.events.emit("piece-lost-race", piece=piece, peer=peer.url, bytes=received)
        finally:
            book.finish(piece, peer.url, duplicate=duplicate)
            peer.active.pop(piece, None)
            task = asyncio.current_task()
            if task is not None:
                self.tally.request_ended(task)
            self.wake.set()

    def _start(self, peer: PeerState, piece: int, duplicate: bool) -> None:
        assert self.book is not None
        task = asyncio.ensure_future(self._fetch(peer, piece, duplicate))
        self.book.start(piece, peer.url, task, now=time.monotonic(), duplicate=duplicate)
        peer.active[piece] = task

    def _assign(self) -> None:
        """Start the requests `plan_requests` chooses: every usable peer's free slots filled."""
        assert self.book is not None
        chosen = plan_requests(
            self.book,
            list(self.peers.values()),
            self.rng,
            now=time.monotonic(),
            slots=self.options.slots_per_peer,
            min_age=max(0.5, 2 * self.tally.piece_seconds),
            memory=self.options.endgame_memory,
        )
        for peer, piece, duplicate in chosen:
            if duplicate:
                self.events.emit("endgame", piece=piece, peer=peer.url)
            self._start(peer, piece, duplicate)

    # -- the whole pull

    def _done_bytes(self) -> int:
        assert self.book is not None
        return min(self.book.manifest.size, self.book.held_bytes() + self.tally.in_progress)

    def _check_stall(self) -> None:
        assert self.book is not None
        if self.fatal is not None:
            raise self.fatal
        if self.peers and all(p.score.banned for p in self.peers.values()) and not self.book.local_pending:
            reasons = "; ".join(f"{p.url}: {p.reason}" for p in self.peers.values())
            ours = self.manifest_fingerprint
            if ours and any(p.score.corrupt and p.manifest not in (None, ours) for p in self.peers.values()):
                raise ManifestContradicted(
                    f"every peer is banned, and peers whose pieces did not match the manifest in use "
                    f"serve a different one; it is dropped, and the next pull chooses again: {reasons}"
                )
            raise PullError(f"every peer is banned or refused us: {reasons}")
        if self.tally.idle(time.monotonic()) > self.options.stall_timeout:
            missing = self.book.missing
            states = ", ".join(f"{p.url} ({_describe(p)})" for p in self.peers.values()) or "none"
            raise PullError(
                f"no progress for {self.options.stall_timeout:.0f}s with {missing} pieces missing; "
                f"peers: {states}. Start a seeder that holds the file (tightwad swarm seed FILE) "
                "or add --peer/--tracker"
            )

    def _report(self) -> None:
        assert self.download is not None
        peers_in_use = sum(1 for p in self.peers.values() if p.active)
        done = self._done_bytes()
        self.progress.update(done, peers_in_use)
        if self.on_state is not None:
            manifest = self.download.manifest
            self.on_state(
                {
                    "name": manifest.name,
                    "sha256": manifest.sha256,
                    "size": manifest.size,
                    "done": done,
                    "pieces": manifest.count,
                    "have": len(self.download.have),
                    "peers": peers_in_use,
                }
            )

    async def _open(self, manifest: PieceManifest, current: PieceManifest | None) -> Entry:
        """Open (or resume) the partial file, offer it to our server, and plan what is local."""
        download = PartialDownload(self.folder, manifest)
        self.download = download
        book: PieceBook[asyncio.Task[None]] = PieceBook(manifest, download.have)
        self.book = book
        try:
            resumed = await asyncio.to_thread(download.open)
        except NoSpace as exc:
            raise PullError(str(exc)) from None
        except OSError as exc:
            if is_no_space(exc):
                download.discard()
                raise PullError(self._no_space_message(manifest)) from exc
            raise
        self.tally.pieces_resumed = len(resumed)
        entry = Entry(manifest, download.partial_path, download.have)
        if self.library is not None:
            self.library.add(entry)
        folders = [self.folder, *self.options.reuse]
        final = self.folder / manifest.name
        index = await asyncio.to_thread(content_index, manifest, folders, current, final)
        book.plan(resumed, plan_all(manifest, index))
        self.events.emit(
            "start",
            sha256=manifest.sha256,
            pieces=manifest.count,
            resumed=len(resumed),
            local=len(book.local_pending),
            partial=book.partly_local,
        )
        self.progress.start(manifest.name, manifest.size, sum(manifest.piece_length(i) for i in resumed))
        return entry

    async def _download(self, download: PartialDownload) -> Path:
        """Fetch every missing piece, then check and rename the file into place."""
        assert self.book is not None
        book = self.book
        manifest = download.manifest
        await self._discover(manifest.sha256)
        if not self.peers and book.wanted:
            raise PullError("no peers to fetch from: give --peer URL or --tracker URL")
        await self._announce(manifest.sha256)
        unbanned = [p for p in self.peers.values() if not p.score.banned]
        await asyncio.gather(*(self._refresh_have(p, manifest) for p in unbanned))
        background = [asyncio.ensure_future(self._refresh_loop(manifest))]
        if book.local_pending:
            background.append(asyncio.ensure_future(self._local_worker(sorted(book.local_pending))))
        self.digest.advance(download)
        try:
            while not download.have.complete:
                self._check_stall()
                self._assign()
                self._report()
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout=0.25)
        finally:
            leftover = background + book.handles()
            for task in leftover:
                task.cancel()
            await asyncio.gather(*leftover, return_exceptions=True)
        self._report()
        return await asyncio.to_thread(download.finalize)

    async def run(self) -> PullResult:
        began = time.monotonic()
        async with SwarmClient(self.options.token, token_hosts=self.options.token_hosts) as client:
            self.client = client
            manifest = await self._resolve_manifest()
            self.manifest = manifest
            there, current = await asyncio.to_thread(existing_copy, self.folder, manifest)
            if there:
                self.events.emit("complete", already=True)
                return self._result(self.folder / manifest.name, manifest, began)
            entry = await self._open(manifest, current)
            assert self.download is not None
            try:
                path = await self._download(self.download)
            except BaseException as exc:
                if isinstance(exc, DownloadCorrupt | ManifestContradicted):
                    # Resuming would only verify the same lie again: forget the bytes and the manifest.
                    self.download.discard()
                    await asyncio.to_thread(reject_manifest, self.folder, manifest.sha256, manifest)
                    self._ban_vouchers(manifest)
                full = is_no_space(exc)
                if full:
                    self.download.discard()  # a half-written allocation only keeps the disk full
                self.download.close()
                if self.library is not None:
                    self.library.remove(manifest.sha256)
                self.progress.finish("stopped; the same pull resumes where this one stopped")
                if full:
                    raise PullError(self._no_space_message(manifest)) from exc
                raise
            entry.path = path
            # Cache the verified file's manifest: serving it or reusing its bytes later costs no rehash.
            await asyncio.to_thread(store_manifest, path, manifest)
        result = self._result(path, manifest, began)
        self.events.emit(
            "complete",
            seconds=round(result.seconds, 3),
            bytes_fetched=result.bytes_fetched,
            bytes_local=result.bytes_local,
            peers=result.peers,
        )
        self.progress.finish(result.summary())
        return result

    def _no_space_message(self, manifest: PieceManifest) -> str:
        return (
            f"no space left in {self.folder} while writing {manifest.name} ({manifest.size} bytes): the "
            "partial download and its saved manifest were discarded; free space and pull again"
        )

    def _ban_vouchers(self, manifest: PieceManifest) -> None:
        """Ban the peers that served a manifest that proved false."""
        false = fingerprint(manifest)
        for peer in self.peers.values():
            if peer.manifest == false:
                self._ban(peer, "served a manifest of this file that proved false")

    def _result(self, path: Path, manifest: PieceManifest, began: float) -> PullResult:
        return PullResult(
            path=path,
            manifest=manifest,
            seconds=time.monotonic() - began,
            bytes_fetched=self.tally.bytes_fetched,
            bytes_local=self.tally.bytes_local,
            pieces_fetched=self.tally.pieces_fetched,
            pieces_local=self.tally.pieces_local,
            pieces_resumed=self.tally.pieces_resumed,
            peers={
                p.url: {
                    "bytes": p.score.bytes_received,
                    "pieces": p.score.pieces_ok,
                    "corrupt": p.score.corrupt,
                    "failures": p.score.total_failures,
                    "banned": p.score.banned,
                    "rate": round(p.score.rate),
                }
                for p in self.peers.values()
            },
        )


def _describe(peer: PeerState) -> str:
    if peer.score.banned:
        return f"banned: {peer.reason}"
    return "unreachable" if peer.have is None else f"{len(peer.have)} pieces"


def choose_manifest(
    answers: Mapping[str, PieceManifest],
    *,
    want_name: str | None,
    rejected: list[str],
    prefer: PieceManifest | None,
) -> tuple[PieceManifest | None, dict[str, str]]:
    """Which peer manifest to trust, and why each refused peer was refused (pure).

    `answers` are the peers' manifests of one sha256, in peer order. Refused: a name other than the
    one asked for, a manifest that proved false here before, and a size most peers contradict (the
    size of a file with a known SHA-256 is a fact: whoever disagrees lies; a tie goes to the smaller
    size, the cheaper claim to disprove). Among the rest, most peers win; a tie goes to `prefer` (what
    a resumed download holds), then to peer order. Peers that cut the file into other pieces are not
    refused: their have-maps do not fit, so they are simply not asked for pieces.
    """
    refused: dict[str, str] = {}
    sound: dict[str, PieceManifest] = {}
    for url, manifest in answers.items():
        if want_name is not None and manifest.name != want_name:
            refused[url] = f"serves the file as {manifest.name!r}, not as {want_name!r} as asked"
        elif fingerprint(manifest) in rejected:
            refused[url] = "serves a manifest of this file that proved false here before"
        else:
            sound[url] = manifest
    if not sound:
        return None, refused
    sizes = Counter(m.size for m in sound.values())
    size = min(sizes, key=lambda n: (-sizes[n], n))
    for url, manifest in sound.items():
        if manifest.size != size:
            refused[url] = f"says the file is {manifest.size} bytes where {sizes[size]} peers say {size}"
    agreed = [m for m in sound.values() if m.size == size]
    votes = Counter(fingerprint(m) for m in agreed)
    favourite = fingerprint(prefer) if prefer is not None else None
    best = max(votes.values())
    if favourite is not None and votes.get(favourite) == best:
        return next(m for m in agreed if fingerprint(m) == favourite), refused
    return next(m for m in agreed if votes[fingerprint(m)] == best), refused
