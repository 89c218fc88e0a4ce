"""The HTTP house (tightwad.http): one bearer check with the loopback rule, one error shape, and the
same server serving in a loop and on a thread."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from tightwad import http
from tightwad.openai import InvalidRequest


async def ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def refuse(request: Request) -> Response:
    raise InvalidRequest("`x` is wrong", param="x")


async def crash(request: Request) -> Response:
    raise RuntimeError("boom")


ROUTES = [
    Route("/open", ok),
    Route("/ok", ok, methods=["GET", "PUT"]),
    Route("/refuse", refuse),
    Route("/crash", crash),
]
SHAPE = {"message", "type", "param", "code"}


class Client:
    """Requests to an app in this process, as a client would see them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def request(self, method: str, path: str, token: str | None = None) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.request(method, path, headers=headers)

        return asyncio.run(go())

    def get(self, path: str, token: str | None = None) -> httpx.Response:
        return self.request("GET", path, token)

    def put(self, path: str, token: str | None = None) -> httpx.Response:
        return self.request("PUT", path, token)


def test_every_error_has_the_one_shape() -> None:
    client = Client(http.app(ROUTES))
    refused = client.get("/refuse")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "x"
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    crashed = client.get("/crash")
    assert crashed.status_code == 500 and "boom" in crashed.json()["error"]["message"]
    for response in (refused, missing, crashed):
        assert set(response.json()["error"]) == SHAPE


def test_the_token_is_required_except_on_open_paths() -> None:
    client = Client(http.app(ROUTES, token="s3cret", open_paths=["/open"]))
    denied = client.get("/ok")
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert denied.headers["www-authenticate"] == "Bearer"
    assert client.get("/ok", token="wrong").status_code == 401
    assert client.get("/ok", token="s3cret").status_code == 200
    assert client.get("/open").status_code == 200


def test_guarded_requests_only_need_the_token() -> None:
    app = http.app(ROUTES, token="s3cret", guarded=lambda method, path: method == "PUT")
    client = Client(app)
    assert client.get("/ok").status_code == 200
    assert client.put("/ok").status_code == 401
    assert client.put("/ok", token="s3cret").status_code == 200


def test_the_loopback_rule() -> None:
    http.check_bind("127.0.0.1", None)
    http.check_bind("::1", None)
    http.check_bind("0.0.0.0", "token")
    with pytest.raises(http.ServeError, match="without a token"):
        http.check_bind("0.0.0.0", None)
    with pytest.raises(http.ServeError, match="without a token"):
        http.Server(http.app(ROUTES), "192.168.1.10", 0)


def test_a_server_in_the_loop_and_on_a_thread() -> None:
    async def in_loop() -> None:
        server = http.Server(http.app(ROUTES), "127.0.0.1", 0, lifespan="off")
        await server.start()
        try:
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"{server.url}/ok")).json() == {"ok": True}
            busy = http.Server(http.app(ROUTES), "127.0.0.1", server.port)
            with pytest.raises(http.ServeError, match="cannot listen"):
                await busy.start()
        finally:
            await server.stop()

    asyncio.run(in_loop())
    threaded = http.Server(http.app(ROUTES), "127.0.0.1", 0)
    threaded.start_thread()
    try:
        for _ in range(200):
            if threaded.started:
                break
            asyncio.run(asyncio.sleep(0.02))
        assert httpx.get(f"{threaded.url}/ok", timeout=10).json() == {"ok": True}
    finally:
        threaded.stop_thread()
