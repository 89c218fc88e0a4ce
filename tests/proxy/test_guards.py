"""The proxy's guards, in process against a mock engine (httpx.MockTransport): the max_tokens limit on
every route that generates (passthrough and the gate included, under either field name), request
fields of the wrong type are 400s naming the field, a gate agent with an empty answer falls back to
the reviewer, and /health says only ok or not while its details need the token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tightwad.proxy.app import create_app
from tightwad.proxy.config import GateConfig, GateEndpointConfig, ProxyConfig
from tightwad.proxy.gate import Endpoint, Gate
from tightwad.proxy.upstream import EngineClient
from tightwad.verify_api import encode_pieces

TOKEN = "guard-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENGINE = "http://engine.internal:8080"
LIMIT = 32


class MockEngine:
    """Answers what the proxy asks the engine; remembers the bodies forwarded to it."""

    def __init__(self, healthy: bool = True) -> None:
        self.forwarded: list[dict[str, Any]] = []
        self.healthy = healthy

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path in ("/health", "/tightwad/v1/health"):
            if not self.healthy:
                error = {"message": f"rpc worker 10.0.0.7:50052 is gone ({ENGINE})", "code": "pool_failure"}
                return httpx.Response(503, json={"status": "error", "error": error})
            return httpx.Response(200, json={"status": "ok", "workers": [{"endpoint": "10.0.0.7:50052"}]})
        if path == "/v1/models":
            meta = {"n_ctx": 512, "n_vocab": 16}
            return httpx.Response(200, json={"data": [{"id": "m", "meta": meta}]})
        if path == "/detokenize":
            ids = json.loads(request.content)["tokens"]
            return httpx.Response(200, json={"pieces": encode_pieces([b"t%d" % t for t in ids])})
        if path == "/tokenize":
            return httpx.Response(200, json={"tokens": [1, 2]})
        self.forwarded.append(json.loads(request.content or b"{}"))
        return httpx.Response(200, json={"choices": [{"text": "ok", "index": 0}]})


def app_for(engine: MockEngine, **config: Any) -> Any:
    client = httpx.AsyncClient(transport=httpx.MockTransport(engine.handler), base_url=ENGINE)
    settings: dict[str, Any] = {"mode": "passthrough", "token": TOKEN, "max_tokens": LIMIT, **config}
    return create_app(ProxyConfig(ENGINE, **settings).check(), EngineClient(ENGINE, None, client))


def call(app: Any, go: Callable[[httpx.AsyncClient], Any]) -> Any:
    async def run() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return await go(client)

    return asyncio.run(run())


def post(app: Any, path: str, body: dict[str, Any]) -> httpx.Response:
    return call(app, lambda c: c.post(path, json=body, headers=AUTH))  # type: ignore[no-any-return]


# -- max_tokens on passthrough ------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_passthrough_refuses_a_token_count_over_the_limit(field: str, path: str) -> None:
    engine = MockEngine()
    ask = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    body = {**ask, field: LIMIT + 1}
    response = post(app_for(engine), path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert f"`{field}`" in error["message"] and "maxTokens" in error["message"]
    assert engine.forwarded == []  # never reached the engine


def test_passthrough_without_a_token_count_gets_the_limit() -> None:
    engine = MockEngine()
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert post(app_for(engine), "/v1/chat/completions", chat).status_code == 200
    assert post(app_for(engine), "/v1/completions", {"prompt": "hi"}).status_code == 200
    assert [body.get("max_tokens") for body in engine.forwarded] == [LIMIT, LIMIT]
    assert post(app_for(engine), "/v1/completions", {"prompt": "hi", "max_tokens": 4}).status_code == 200
    assert engine.forwarded[-1]["max_tokens"] == 4  # within the limit: sent as it came


def test_passthrough_without_a_limit_sends_the_body_unchanged() -> None:
    engine = MockEngine()
    assert post(app_for(engine, max_tokens=None), "/v1/completions", {"prompt": "hi"}).status_code == 200
    assert engine.forwarded == [{"prompt": "hi"}]


@pytest.mark.parametrize("value", ["12", 1.5, True, -1, 0])
def test_passthrough_refuses_a_token_count_that_is_not_a_positive_integer(value: Any) -> None:
    response = post(app_for(MockEngine()), "/v1/completions", {"prompt": "hi", "max_tokens": value})
    assert response.status_code == 400 and "`max_tokens`" in response.json()["error"]["message"]


# -- the gate route -----------------------------------------------------------------------------


def gate_app(handler: Callable[[httpx.Request], httpx.Response]) -> Any:
    gate_config = GateConfig([GateEndpointConfig("a", "http://a")], GateEndpointConfig("r", "http://r"))
    app = app_for(MockEngine(), gate=gate_config)
    app.state.proxy.gate = Gate(
        [Endpoint("a", "http://a")], Endpoint("r", "http://r"), transport=httpx.MockTransport(handler)
    )
    return app


def answers(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    content = '{"verdict": "approve", "reason": "fine"}' if body["messages"][0]["role"] == "system" else "5"
    return httpx.Response(200, json={"choices": [{"message": {"content": content}}]})


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_the_gate_route_refuses_a_token_count_over_the_limit(field: str) -> None:
    body = {"messages": [{"role": "user", "content": "2 + 3?"}], field: LIMIT + 1}
    response = post(gate_app(answers), "/tightwad/v1/gate/chat/completions", body)
    assert response.status_code == 400, response.text
    assert f"`{field}`" in response.json()["error"]["message"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_the_gate_route_names_a_token_count_of_the_wrong_type(field: str) -> None:
    body = {"messages": [{"role": "user", "content": "2 + 3?"}], field: "ten"}
    response = post(gate_app(answers), "/tightwad/v1/gate/chat/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert f"`{field}`" in error["message"] and error["type"] == "invalid_request_error"


def test_a_gate_agent_with_no_choices_falls_back_to_the_reviewer() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a":
            return httpx.Response(200, json={"choices": []})
        return httpx.Response(200, json={"choices": [{"message": {"content": "5"}}]})

    body = {"messages": [{"role": "user", "content": "2 + 3?"}]}
    response = post(gate_app(handler), "/tightwad/v1/gate/chat/completions", body)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["choices"][0]["message"]["content"] == "5"
    assert reply["tightwad_gate"]["verdict"] == "reject"  # the agent failed: the reviewer wrote it


@pytest.mark.parametrize(
    "reply", [{"choices": []}, {"choices": [{"message": None}]}, [], {"choices": [{"message": {}}]}]
)
def test_a_reviewer_with_a_malformed_answer_fails_closed_in_openai_shape(reply: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a":
            return answers(request)
        return httpx.Response(200, json=reply)

    body = {"messages": [{"role": "user", "content": "2 + 3?"}]}
    response = post(gate_app(handler), "/tightwad/v1/gate/chat/completions", body)
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "gate_reviewer_unavailable"


# -- /health ------------------------------------------------------------------------------------


@pytest.mark.parametrize("healthy", [True, False])
def test_health_is_a_bare_status_and_the_details_need_the_token(healthy: bool) -> None:
    app = app_for(MockEngine(healthy))

    async def go(client: httpx.AsyncClient) -> tuple[httpx.Response, ...]:
        return (
            await client.get("/health"),
            await client.get("/tightwad/v1/health"),
            await client.get("/tightwad/v1/health", headers=AUTH),
            await client.get("/health", headers=AUTH),
        )

    bare, refused, details, with_token = call(app, go)
    assert with_token.status_code == details.status_code and with_token.json() == details.json()
    assert bare.status_code == (200 if healthy else 503)
    assert "engine.internal" not in bare.text and "10.0.0.7" not in bare.text
    assert set(bare.json()) <= {"status", "error"} and bare.json()["status"] == ("ok" if healthy else "error")
    assert refused.status_code == 401
    assert details.status_code == bare.status_code and details.json()["engine"] == ENGINE
    if healthy:
        assert details.json()["workers"] == [{"endpoint": "10.0.0.7:50052"}]
    else:
        assert "10.0.0.7" in details.json()["error"]["message"]


def test_the_engine_health_details_fall_back_to_health_on_an_engine_without_the_route() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok", "workers": ["w"]})
        return httpx.Response(404, json={"error": {"message": "not found", "code": "not_found"}})

    async def go() -> dict[str, Any]:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url=ENGINE)
        return await EngineClient(ENGINE, None, client).health()

    assert asyncio.run(go())["workers"] == ["w"]
