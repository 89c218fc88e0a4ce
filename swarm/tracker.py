"""A minimal tracker: which peer URLs announced that they hold (or are fetching) which file.

Every swarm server is also a tracker, so the origin of a file can introduce its downloaders to each
other. Entries expire unless re-announced (`DEFAULT_TTL`), so a dead peer drops out by itself, and
a file nobody announces any more is forgotten. Anyone who can reach a tracker can announce, so what
it holds is capped: `MAX_FILES` files (the one announced least recently is forgotten first) and
`MAX_PEERS_PER_FILE` peers per file (the stalest is forgotten first). A tracker is a hint, not a
registry: a forgotten peer comes back with its next announce (every 30 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import urlsplit

DEFAULT_TTL = 90.0
MAX_PEERS_PER_FILE = 200
MAX_FILES = 1000


def normalise_peer_url(url: object) -> str | None:
    """`http(s)://host:port` without a path or trailing slash, or None if it is not such a URL."""
    if not isinstance(url, str) or len(url) > 300:
        return None
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username or parts.password:
        return None
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return None
    return f"{parts.scheme}://{parts.netloc}"


class Tracker:
    def __init__(self, ttl: float = DEFAULT_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        # sha256 -> peer url -> last announce; files in order of their latest announce (oldest first)
        self._seen: dict[str, dict[str, float]] = {}
        self._next_sweep = 0.0

    @property
    def files(self) -> int:
        return len(self._seen)

    def announce(self, sha256: str, url: str) -> None:
        now = self._clock()
        self._sweep(now)
        peers = self._seen.pop(sha256, None)
        if peers is None:
            peers = {}
            while len(self._seen) >= MAX_FILES:
                del self._seen[next(iter(self._seen))]  # the file announced least recently
        self._seen[sha256] = peers  # (re)inserted last: the dict's order is the announce order
        peers.pop(url, None)
        peers[url] = now
        if len(peers) > MAX_PEERS_PER_FILE:
            del peers[next(iter(peers))]  # the stalest: peers are in announce order too

    def peers(self, sha256: str) -> list[str]:
        now = self._clock()
        peers = self._seen.get(sha256, {})
        for url in [url for url, seen in peers.items() if now - seen > self.ttl]:
            del peers[url]
        if not peers:
            self._seen.pop(sha256, None)
        return sorted(peers)

    def _sweep(self, now: float) -> None:
        """Forget expired announcements of every file; at most twice per TTL, so announces stay cheap."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.ttl / 2
        for sha256, peers in list(self._seen.items()):
            for url in [url for url, seen in peers.items() if now - seen > self.ttl]:
                del peers[url]
            if not peers:
                del self._seen[sha256]
