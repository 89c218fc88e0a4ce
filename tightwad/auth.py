"""Bearer-token auth shared by every Tightwad server: loopback by default, a token beyond it.

Each server keeps its own error body (OpenAI-shaped for the engine and proxy, plain for the swarm),
so the middleware takes the rejection to send.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Collection

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tightwad.manifest import is_loopback

__all__ = ["BearerAuth", "is_loopback"]


class BearerAuth:
    """Pure ASGI middleware: every HTTP path but `open_paths` needs `Authorization: Bearer <token>`,
    compared in constant time."""

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        open_paths: Collection[str],
        rejection: Callable[[], Response],
    ) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.open_paths = frozenset(open_paths)
        self.rejection = rejection

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await self.rejection()(scope, receive, send)
                return
        await self.app(scope, receive, send)
