"""The peer server: manifests, have-maps and piece bytes over HTTP, plus a small tracker.

    GET  /swarm/v1/health                       always open (no secrets in it)
    GET  /swarm/v1/files                        what this node holds or is fetching
    GET  /swarm/v1/files/{sha256}/manifest      the piece manifest
    GET  /swarm/v1/files/{sha256}/have          {"pieces": N, "have": base64 bitfield, "complete": bool}
    GET  /swarm/v1/files/{sha256}/data          bytes; `Range: bytes=A-B` for pieces (206), whole file (200)
    GET  /swarm/v1/files/{sha256}/peers         tracker: peers that announced this file
    POST /swarm/v1/announce                     tracker: {"sha256": ..., "url": "http://host:port"}
    GET  /swarm/v1/status                       what the node (or its sidecar) is doing
    GET  /openapi.json                          open: this API's OpenAPI document (tightwad.openapi)

Files are addressed only by SHA-256, so no request names a path; the bytes come from files the
library registered. Data is streamed from disk in worker threads and stops when the client leaves.
Auth and errors are the house's (tightwad.http): a bearer token when configured, and every error in
the one OpenAI-shaped body.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from tightwad import http, openapi
from tightwad.openai import InvalidRequest, NotFound, OpenAIError
from tightwad.swarm.httprange import RangeError, content_range, parse_range
from tightwad.swarm.library import Entry, Library
from tightwad.swarm.pieces import is_sha256
from tightwad.swarm.ratelimit import TokenBucket
from tightwad.swarm.tracker import Tracker, normalise_peer_url

API = "/swarm/v1"
CHUNK = 256 << 10
OPEN_PATHS = frozenset({f"{API}/health", openapi.OPENAPI_PATH})


def _not_found(message: str) -> JSONResponse:
    return http.error_response(NotFound(message))


def _bad_request(message: str) -> JSONResponse:
    return http.error_response(InvalidRequest(message))


class FileRangeResponse(Response):
    """Bytes [start, end) of the entry's file, read in a worker thread chunk by chunk; stops as soon
    as the client disconnects, so a cancelled request costs no more disk reads or upload budget."""

    def __init__(self, entry: Entry, start: int, end: int, status: int, bucket: TokenBucket | None) -> None:
        super().__init__(status_code=status, media_type="application/octet-stream")
        self.entry, self.start, self.end, self.bucket = entry, start, end, bucket
        self.headers["content-length"] = str(end - start)
        self.headers["accept-ranges"] = "bytes"
        if status == 206:
            self.headers["content-range"] = content_range(start, end, entry.manifest.size)

    async def _open(self) -> int:
        # A download in progress is renamed into place when it completes: retry with the new path.
        for _ in range(20):
            try:
                return await anyio.to_thread.run_sync(os.open, self.entry.path, os.O_RDONLY)
            except FileNotFoundError:
                await asyncio.sleep(0.05)
        raise FileNotFoundError(self.entry.path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") == "HEAD":  # headers only: no read, no upload counted
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        fd = await self._open()
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        ledger = self.entry.ledger
        pieces = self.entry.manifest.pieces_in(self.start, self.end)
        if ledger is not None:
            ledger.begin(pieces)
        sent = False
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            position = self.start
            while position < self.end and not gone.is_set():
                chunk = await anyio.to_thread.run_sync(
                    os.pread, fd, min(CHUNK, self.end - position), position
                )
                if not chunk:
                    raise OSError(f"{self.entry.path} ended early")  # aborts the connection: no short body
                if self.bucket is not None:
                    await self.bucket.take(len(chunk))
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                position += len(chunk)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            sent = position >= self.end
        finally:
            watcher.cancel()
            os.close(fd)
            if ledger is not None:
                ledger.end(pieces, sent)


def create_app(
    library: Library,
    *,
    token: str | None = None,
    tracker: Tracker | None = None,
    bucket: TokenBucket | None = None,
    status: Callable[[], dict[str, Any]] | None = None,
) -> ASGIApp:
    """The peer server over `library`. With `token`, every request but health must carry it."""

    def entry_for(request: Request) -> Entry | JSONResponse:
        sha256 = request.path_params["sha256"]
        if not is_sha256(sha256):
            return _not_found("files are addressed by their SHA-256 (64 lowercase hex digits)")
        entry = library.get(sha256)
        if entry is None:
            return _not_found(f"this node does not hold {sha256}")
        return entry

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def files(request: Request) -> Response:
        return JSONResponse({"files": [_describe(entry) for entry in library]})

    async def manifest(request: Request) -> Response:
        entry = entry_for(request)
        if isinstance(entry, Response):
            return entry
        return JSONResponse(entry.manifest.to_json())

    async def have(request: Request) -> Response:
        entry = entry_for(request)
        if isinstance(entry, Response):
            return entry
        offered = entry.offered()
        body = {"pieces": entry.manifest.count, "have": offered.encode(), "complete": entry.complete}
        return JSONResponse(body)

    async def data(request: Request) -> Response:
        entry = entry_for(request)
        if isinstance(entry, Response):
            return entry
        size = entry.manifest.size
        header = request.headers.get("range")
        if header is None:
            if not entry.complete:
                return _not_found("the file is still downloading here; ask for pieces with a Range header")
            return FileRangeResponse(entry, 0, size, 200, bucket)
        try:
            start, end = parse_range(header, size)
        except RangeError as exc:
            unsatisfiable = OpenAIError(str(exc), status=416, code="range_not_satisfiable")
            return http.error_response(unsatisfiable, {"content-range": f"bytes */{size}"})
        if not entry.holds(start, end):
            return _not_found("this node does not hold those pieces yet; check /have")
        if entry.ledger is not None and not entry.offers(start, end):
            # Initial seeding: someone is already carrying these pieces into the swarm; take them from
            # a peer. The have-map this peer saw was stale; the answer is the same as for a missing piece.
            return _not_found("those pieces are being seeded to another peer; fetch them from the swarm")
        return FileRangeResponse(entry, start, end, 206, bucket)

    async def peers(request: Request) -> Response:
        sha256 = request.path_params["sha256"]
        if not is_sha256(sha256):
            return _not_found("files are addressed by their SHA-256 (64 lowercase hex digits)")
        return JSONResponse({"peers": tracker.peers(sha256) if tracker else []})

    async def announce(request: Request) -> Response:
        if tracker is None:
            return _not_found("this node is not a tracker")
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            return _bad_request('send JSON: {"sha256": ..., "url": "http://host:port"}')
        url = normalise_peer_url(body.get("url")) if isinstance(body, dict) else None
        if url is None or not is_sha256(body.get("sha256")):
            return _bad_request("announce needs sha256 (64 hex digits) and url (http://host:port)")
        tracker.announce(body["sha256"], url)
        return Response(status_code=204)

    async def node_status(request: Request) -> Response:
        summary: dict[str, Any] = {"files": [_describe(entry) for entry in library]}
        if status is not None:
            summary.update(status())
        return JSONResponse(summary)

    routes = [
        Route(f"{API}/health", health),
        Route(f"{API}/files", files),
        Route(f"{API}/files/{{sha256}}/manifest", manifest),
        Route(f"{API}/files/{{sha256}}/have", have),
        Route(f"{API}/files/{{sha256}}/data", data),
        Route(f"{API}/files/{{sha256}}/peers", peers),
        Route(f"{API}/announce", announce, methods=["POST"]),
        Route(f"{API}/status", node_status),
        openapi.route(openapi.swarm_document()),
    ]
    return http.app(routes, token=token, open_paths=OPEN_PATHS)


def _describe(entry: Entry) -> dict[str, Any]:
    m = entry.manifest
    return {
        "name": m.name,
        "sha256": m.sha256,
        "size": m.size,
        "pieceSize": m.piece_size,
        "pieces": m.count,
        "have": len(entry.have),
        "complete": entry.complete,
    }
