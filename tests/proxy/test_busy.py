"""A busy engine's 503 reaches the proxy's client as the engine said it: same status, body and
Retry-After, before any SSE byte, whether the proxy speculates or passes the request through."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from support.engines import EngineProcess, start_engine
from support.procs import Processes
from support.proxies import AUTH, TOKEN, ProxyProcess, start_proxy

from tightwad import models
from tightwad.toolchain import Toolchain

pytestmark = pytest.mark.integration

LONG = {
    "prompt": "Once upon a time",
    "max_tokens": 2000,
    "ignore_eos": True,
    "temperature": 0,
    "stream": True,
}


class Hold:
    """A streamed completion straight to the engine that holds its place until released."""

    def __init__(self, url: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url,))
        self._thread.start()

    def _run(self, url: str) -> None:
        with (
            httpx.Client(timeout=120) as client,
            client.stream("POST", f"{url}/v1/completions", json=LONG) as r,
        ):
            for _ in r.iter_lines():
                if self._stop.is_set():
                    return

    def release(self) -> None:
        self._stop.set()
        self._thread.join(120)


def until(engine: EngineProcess, key: str, value: int) -> None:
    deadline = time.monotonic() + 30
    while engine.get("/tightwad/v1/stats").json()[key] < value:
        assert time.monotonic() < deadline, f"the engine never had {value} {key}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def engine(toolchain: Toolchain, module_processes: Processes) -> EngineProcess:
    """One conversation sequence, room for one waiting request."""
    extra = ["--queue", "1", "--queue-timeout", "20", "--alias", "smollm2"]
    return start_engine(
        module_processes, models.resolve("smollm2-135m-q4_1"), parallel=1, ctx=4096, extra=extra
    )


@pytest.fixture(scope="module")
def proxies(engine: EngineProcess, module_processes: Processes) -> list[ProxyProcess]:
    speculating = start_proxy(module_processes, engine.url, "--draft-kind", "ngram")
    passing = start_proxy(module_processes, engine.url, "--mode", "passthrough")
    for proxy in (speculating, passing):  # learned and warmed up while the engine is free
        reply = proxy.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 0})
        assert reply.status_code == 200, reply.text
    return [speculating, passing]


@pytest.fixture
def full(engine: EngineProcess) -> Iterator[None]:
    """The engine's one sequence busy and its one queue place taken."""
    running = Hold(engine.url)
    until(engine, "active", 1)
    queued = Hold(engine.url)
    until(engine, "waiting", 1)
    yield
    running.release()
    queued.release()


def busy_reply(proxy: ProxyProcess, body: dict[str, Any]) -> httpx.Response:
    with httpx.stream("POST", f"{proxy.url}/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        r.read()
        return r


def test_the_engines_503_and_retry_after_reach_the_client(proxies: list[ProxyProcess], full: None) -> None:
    body = {"prompt": "The weather today", "max_tokens": 8, "temperature": 0}
    for proxy in proxies:
        for stream in (True, False):
            r = busy_reply(proxy, {**body, "stream": stream})
            assert r.status_code == 503, (proxy.log.read_text()[-2000:], r.text)
            assert "event-stream" not in r.headers.get("content-type", "")
            assert int(r.headers["retry-after"]) >= 1
            error = r.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "server_error"
            assert "retry after" in error["message"]


def test_the_openai_sdk_through_the_proxy_sees_the_503(proxies: list[ProxyProcess], full: None) -> None:
    client = openai.OpenAI(base_url=f"{proxies[0].url}/v1", api_key=TOKEN, max_retries=0)
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            client.completions.create(model="smollm2", prompt="Hello there", max_tokens=4, stream=True)
    finally:
        client.close()
    assert caught.value.status_code == 503
    assert int(caught.value.response.headers["retry-after"]) >= 1
