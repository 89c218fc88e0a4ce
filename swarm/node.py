"""A swarm node: a peer server over a library (seeded files, a watched folder, running downloads),
announcing itself to trackers. `seed`, `serve`, `pull --serve` and the sidecar are all this."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from tightwad.http import Server
from tightwad.swarm.client import PeerError, SwarmClient
from tightwad.swarm.library import Library, cached_manifest, complete_entry, manifest_for, servable_files
from tightwad.swarm.pieces import DEFAULT_PIECE_SIZE, PieceManifest
from tightwad.swarm.ratelimit import TokenBucket
from tightwad.swarm.server import create_app
from tightwad.swarm.tracker import Tracker

ANNOUNCE_EVERY = 30.0
RESCAN_EVERY = 10.0


@dataclass
class NodeOptions:
    bind: str = "127.0.0.1"
    port: int = 8089
    token: str | None = None
    token_hosts: frozenset[str] | None = None  # where the token may go (None: every tracker)
    piece_size: int = DEFAULT_PIECE_SIZE
    trackers: list[str] = field(default_factory=list)
    advertise: str | None = None  # the URL others reach us at; default http://BIND:PORT
    max_upload_rate: float | None = None  # bytes/s for all uploads together

    def url(self, port: int | None = None) -> str | None:
        if self.advertise:
            return self.advertise.rstrip("/")
        if self.bind in ("0.0.0.0", "::", ""):
            return None  # we do not know which of our addresses peers can reach: say --advertise
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"http://{host}:{port or self.port}"


def hash_with_rate(path: Path, piece_size: int, console: Console | None) -> PieceManifest:
    """The file's manifest (cached, or hashed now with its rate printed)."""
    began = time.perf_counter()
    manifest = manifest_for(path, piece_size)
    seconds = time.perf_counter() - began
    if console is not None:
        if seconds > 0.5:
            rate = manifest.size / seconds / 1e9
            console.print(
                f"hashed {path.name}: {manifest.size / 1e6:.1f} MB in {seconds:.1f}s ({rate:.2f} GB/s)"
            )
        kind = f"{len(manifest.segments)} content segments" if manifest.segments else "no GGUF layout"
        console.print(f"{manifest.name} sha256 {manifest.sha256}: {manifest.count} pieces, {kind}")
    return manifest


class Node:
    """A running peer server plus its announcements; use as `async with Node(...) as node`."""

    def __init__(
        self,
        options: NodeOptions,
        library: Library | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.options = options
        self.library = library if library is not None else Library()
        bucket = TokenBucket(options.max_upload_rate) if options.max_upload_rate else None
        app = create_app(self.library, token=options.token, tracker=Tracker(), bucket=bucket, status=status)
        # In our loop, beside a puller; the house's loopback rule refuses a bind with no token here.
        self.server = Server(
            app, options.bind, options.port, token=options.token, lifespan="off", graceful_timeout=2
        )
        self._announcer: asyncio.Task[None] | None = None

    @property
    def url(self) -> str | None:
        return self.options.url(self.server.port)

    async def __aenter__(self) -> Node:
        await self.server.start()
        if self.options.trackers and self.url:
            self._announcer = asyncio.ensure_future(self._announce_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._announcer is not None:
            self._announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._announcer
        await self.server.stop()

    async def _announce_loop(self) -> None:
        async with SwarmClient(self.options.token, token_hosts=self.options.token_hosts) as client:
            while True:
                for entry in self.library:
                    for tracker in self.options.trackers:
                        with contextlib.suppress(PeerError):
                            await client.announce(tracker.rstrip("/"), entry.manifest.sha256, self.url or "")
                await asyncio.sleep(ANNOUNCE_EVERY)

    async def wait(self) -> None:
        await self.server.wait()


async def watch_folder(
    library: Library, folder: Path, piece_size: int, console: Console | None, super_seed: bool = True
) -> None:
    """Keep the library in step with the complete files in `folder` (new, changed, removed). Files
    found here are seeded initially (see seeding.py) unless `super_seed` is off."""
    while True:
        present = set()
        for path in servable_files(folder):
            manifest = cached_manifest(path, piece_size)
            if manifest is None:  # new or changed: hash it (once), and say so
                manifest = await asyncio.to_thread(hash_with_rate, path, piece_size, console)
            present.add(manifest.sha256)
            known = library.get(manifest.sha256)
            if known is None or (known.complete and known.path != path):
                library.add(complete_entry(path, manifest, super_seed))
        for entry in library:
            if entry.complete and entry.path.parent == folder and entry.manifest.sha256 not in present:
                library.remove(entry.manifest.sha256)
        await asyncio.sleep(RESCAN_EVERY)
