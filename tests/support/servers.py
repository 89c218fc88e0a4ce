"""A small ASGI app served on a thread of the test process, through the same `tightwad.http.Server`
every Tightwad server uses (loopback, a free port)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp

from tightwad.http import Server


class ThreadServer:
    """`with ThreadServer(app) as server:` ... `server.url` ... stopped on exit."""

    def __init__(self, app: ASGIApp, token: str | None = None) -> None:
        self.server = Server(app, "127.0.0.1", 0, token=token)

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> ThreadServer:
        self.server.start_thread(name="test-server")
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop_thread(timeout=10)
