"""A minimal tracker: which peer URLs announced that they hold (or are fetching) which file.

Every swarm server is also a tracker, so the origin of a file can introduce its downloaders to each
other. Entries expire unless re-announced, so a dead peer drops out by itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import urlsplit

DEFAULT_TTL = 90.0
MAX_PEERS_PER_FILE = 200


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
        self._seen: dict[str, dict[str, float]] = {}  # sha256 -> peer url -> last announce

    def announce(self, sha256: str, url: str) -> None:
        peers = self._seen.setdefault(sha256, {})
        peers[url] = self._clock()
        if len(peers) > MAX_PEERS_PER_FILE:  # forget the stalest; a tracker is a hint, not a registry
            del peers[min(peers, key=peers.__getitem__)]

    def peers(self, sha256: str) -> list[str]:
        now = self._clock()
        peers = self._seen.get(sha256, {})
        for url in [url for url, seen in peers.items() if now - seen > self.ttl]:
            del peers[url]
        return sorted(peers)
