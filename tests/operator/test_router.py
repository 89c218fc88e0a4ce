"""The engine router's guards, in process (httpx.ASGITransport, a mock engine behind it): a body
limit before anything is buffered, the route (where it points, and re-pointing it) behind the token,
an open probe path that names no address, and the loopback rule at start."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tightwad.launch import free_port
from tightwad.operator import health
from tightwad.operator import router as router_module
from tightwad.operator.router import EngineBackend, Router, create_app
from tightwad.operator.units import Kind, Unit

TOKEN = "route-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENGINE = "http://10.0.0.9:18080"


def call(router: Router, go: Callable[[httpx.AsyncClient], Any]) -> Any:
    seen: list[int] = []

    def engine(request: httpx.Request) -> httpx.Response:
        seen.append(len(request.content))
        return httpx.Response(200, stream=httpx.ByteStream(b"{}"))  # streamed back, like an engine

    router.client = httpx.AsyncClient(transport=httpx.MockTransport(engine))

    async def run() -> Any:
        transport = httpx.ASGITransport(app=create_app(router))
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            return await go(client)

    return asyncio.run(run()), seen


def routed(token: str | None = TOKEN, **kwargs: Any) -> Router:
    return Router(EngineBackend(ENGINE, "engine-a"), token, **kwargs)


def test_a_body_over_the_limit_is_refused_before_it_is_buffered_or_forwarded() -> None:
    router = routed(max_body_bytes=1024)

    async def go(client: httpx.AsyncClient) -> tuple[httpx.Response, ...]:
        declared = await client.post("/v1/completions", content=b"x" * 4096)

        async def chunks() -> Any:  # no content-length: refused while it arrives
            for _ in range(8):
                yield b"x" * 512

        streamed = await client.post("/v1/completions", content=chunks())
        small = await client.post("/v1/completions", content=b"x" * 100)
        return declared, streamed, small

    (declared, streamed, small), seen = call(router, go)
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "request_too_large"
    assert small.status_code == 200 and seen == [100]
    assert router.inflight == {} or not any(router.inflight.values())


def test_re_pointing_takes_a_bounded_body() -> None:
    router = routed()
    huge = b'{"backend": "' + b"x" * (router_module.ROUTE_BODY_BYTES + 1) + b'"}'
    response, _ = call(router, lambda c: c.put(router_module.ROUTE_PATH, content=huge, headers=AUTH))
    assert response.status_code == 413 and router.backend is not None and router.backend.url == ENGINE


def test_the_route_needs_the_token_to_read_or_change_it() -> None:
    router = routed()

    async def go(client: httpx.AsyncClient) -> tuple[httpx.Response, ...]:
        path = router_module.ROUTE_PATH
        return (
            await client.get(path),
            await client.put(path, json={"backend": "http://evil:1", "unit": "x"}),
            await client.get(path, headers=AUTH),
        )

    (read, change, allowed), _ = call(router, go)
    assert read.status_code == 401 and change.status_code == 401
    assert router.backend is not None and router.backend.url == ENGINE
    assert allowed.json() == {"backend": ENGINE, "unit": "engine-a", "inflight": {}}


def test_the_probe_path_is_open_and_names_no_address() -> None:
    router = routed()
    response, _ = call(router, lambda c: c.get(router_module.HEALTH_PATH))
    assert response.status_code == 200 and "10.0.0.9" not in response.text
    assert response.json() == {"status": "ok", "unit": "engine-a", "inflight": {}}
    unit = Unit("engine-router", Kind.ROUTER, "local", "process", "127.0.0.1", {"port": 1})
    assert health.http_path(unit) == router_module.HEALTH_PATH  # what the operator's probes read


def test_the_router_refuses_to_listen_beyond_loopback_without_a_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TIGHTWAD_TOKEN", raising=False)
    assert router_module.main(["--host", "0.0.0.0", "--port", str(free_port())]) == 1
    assert "beyond loopback" in capsys.readouterr().err


def test_a_request_whose_body_arrives_during_a_swap_goes_to_the_new_engine() -> None:
    """The operator re-points the route, sees the old engine drained and stops it: a request that
    was still uploading its body when that happened must not be sent to the stopped engine."""
    router = routed()
    hosts: list[str] = []

    def engine(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(200, stream=httpx.ByteStream(b"{}"))

    router.client = httpx.AsyncClient(transport=httpx.MockTransport(engine))
    half_sent = asyncio.Event()
    swapped = asyncio.Event()

    async def body() -> Any:
        yield b'{"prompt": '
        half_sent.set()
        await swapped.wait()
        yield b'"hi"}'

    async def operator(client: httpx.AsyncClient) -> dict[str, Any]:
        await half_sent.wait()
        await asyncio.sleep(0.05)  # the router is now reading the body
        moved = await client.put(
            router_module.ROUTE_PATH,
            json={"backend": "http://10.0.0.10:18080", "unit": "engine-b"},
            headers=AUTH,
        )
        assert moved.status_code == 200
        probe = (await client.get(router_module.HEALTH_PATH)).json()
        swapped.set()
        return probe

    async def run() -> tuple[httpx.Response, dict[str, Any]]:
        transport = httpx.ASGITransport(app=create_app(router))
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            return await asyncio.gather(client.post("/v1/completions", content=body()), operator(client))

    response, probe = asyncio.run(run())
    assert response.status_code == 200
    assert response.headers[router_module.ENGINE_HEADER] == "engine-b"
    assert "engine-a" not in probe["inflight"]  # the operator may stop engine-a now
    assert hosts == ["10.0.0.10"]
