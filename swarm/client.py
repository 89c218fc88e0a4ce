"""Talking to peers and trackers over HTTP (httpx, one pooled async client per pull)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from tightwad.errors import TightwadError
from tightwad.openai import error_message
from tightwad.swarm.bitfield import Bitfield
from tightwad.swarm.pieces import ManifestInvalid, PieceManifest
from tightwad.swarm.server import API


class PeerError(TightwadError):
    """A peer failed a request (unreachable, refused, bad answer); the peer is backed off."""


class NotHeld(PeerError):
    """The peer does not hold what we asked for (its have-map was stale): no penalty."""


class Unauthorized(PeerError):
    """The peer wants a different token: a configuration problem, reported to the user."""


def timeouts(read: float = 20.0) -> httpx.Timeout:
    # No total deadline: a 64 MiB piece over a slow link is fine as long as bytes keep coming.
    return httpx.Timeout(connect=5.0, read=read, write=10.0, pool=None)


class SwarmClient:
    """Talks to peers and trackers. The cluster token goes only where it belongs: to every URL when
    `token_hosts` is None (a user naming peers by hand), else only to those hosts (the cluster's
    own), never to a peer or tracker that someone merely wrote into a manifest."""

    def __init__(
        self,
        token: str | None = None,
        read_timeout: float = 20.0,
        token_hosts: frozenset[str] | None = None,
    ) -> None:
        self.token = token
        self.token_hosts = token_hosts
        self.http = httpx.AsyncClient(
            auth=self._authorize,
            timeout=timeouts(read_timeout),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
            follow_redirects=False,
            trust_env=False,  # peers are on the cluster network; never route them through a proxy
        )

    def _authorize(self, request: httpx.Request) -> httpx.Request:
        host = request.url.host
        if self.token and (self.token_hosts is None or host in self.token_hosts):
            request.headers["authorization"] = f"Bearer {self.token}"
        return request

    async def __aenter__(self) -> SwarmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def _json(self, url: str) -> Any:
        try:
            response = await self.http.get(url)
        except httpx.HTTPError as exc:
            raise PeerError(f"{url}: {type(exc).__name__} {exc}".strip()) from exc
        _raise_for(response, url)
        try:
            return response.json()
        except ValueError:
            raise PeerError(f"{url}: the answer is not JSON; is this a tightwad swarm server?") from None

    async def files(self, peer: str) -> list[dict[str, Any]]:
        body = await self._json(f"{peer}{API}/files")
        files = body.get("files") if isinstance(body, dict) else None
        if not isinstance(files, list):
            raise PeerError(f"{peer}: malformed file list")
        return [f for f in files if isinstance(f, dict)]

    async def manifest(self, peer: str, sha256: str) -> PieceManifest:
        body = await self._json(f"{peer}{API}/files/{sha256}/manifest")
        try:
            manifest = PieceManifest.from_json(body)
        except ManifestInvalid as exc:
            raise PeerError(f"{peer}: {exc}") from None
        if manifest.sha256 != sha256:
            raise PeerError(f"{peer}: served the manifest of {manifest.sha256} when asked for {sha256}")
        return manifest

    async def have(self, peer: str, sha256: str, count: int) -> Bitfield:
        body = await self._json(f"{peer}{API}/files/{sha256}/have")
        try:
            if body["pieces"] != count:
                raise ValueError(f"{body['pieces']} pieces, expected {count}")
            return Bitfield.decode(count, body["have"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PeerError(f"{peer}: malformed have-map ({exc})") from None

    async def tracked_peers(self, tracker: str, sha256: str) -> list[str]:
        body = await self._json(f"{tracker}{API}/files/{sha256}/peers")
        peers = body.get("peers") if isinstance(body, dict) else None
        return [p for p in peers if isinstance(p, str)] if isinstance(peers, list) else []

    async def announce(self, tracker: str, sha256: str, url: str) -> None:
        try:
            response = await self.http.post(f"{tracker}{API}/announce", json={"sha256": sha256, "url": url})
        except httpx.HTTPError as exc:
            raise PeerError(f"{tracker}: {type(exc).__name__}") from exc
        _raise_for(response, tracker)

    @contextlib.asynccontextmanager
    async def byte_range(
        self, peer: str, sha256: str, start: int, end: int
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Stream bytes [start, end) of a file from a peer; the chunks must add up exactly."""
        url = f"{peer}{API}/files/{sha256}/data"
        try:
            async with self.http.stream(
                "GET", url, headers={"range": f"bytes={start}-{end - 1}"}
            ) as response:
                if response.status_code != 206:
                    await response.aread()
                    _raise_for(response, url)
                    raise PeerError(f"{url}: answered {response.status_code}, not 206 Partial Content")
                expected = f"bytes {start}-{end - 1}/"
                if not response.headers.get("content-range", "").startswith(expected):
                    raise PeerError(f"{url}: wrong Content-Range {response.headers.get('content-range')!r}")
                yield _exactly(response, end - start, url)
        except httpx.HTTPError as exc:
            raise PeerError(f"{url}: {type(exc).__name__} {exc}".strip()) from exc


async def _exactly(response: httpx.Response, length: int, url: str) -> AsyncIterator[bytes]:
    received = 0
    async for chunk in response.aiter_raw():
        received += len(chunk)
        if received > length:
            raise PeerError(f"{url}: sent more bytes than asked for")
        yield chunk
    if received != length:
        raise PeerError(f"{url}: the transfer stopped after {received} of {length} bytes")


def _raise_for(response: httpx.Response, url: str) -> None:
    if response.status_code < 400:
        return
    if response.status_code == 401:
        raise Unauthorized(f"{url}: the peer wants a bearer token; set TIGHTWAD_TOKEN to the cluster's token")
    if response.status_code == 404:
        raise NotHeld(f"{url}: {_message(response)}")
    raise PeerError(f"{url}: HTTP {response.status_code} {_message(response)}")


def _message(response: httpx.Response) -> str:
    try:
        return error_message(response.json())  # the house's error shape (tightwad.openai)
    except ValueError:
        return response.text[:200]
