"""The proxy's thin edges without real processes: text drafters, the engine client's chat probe,
the command line's configuration, and the network delay proxy."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from support import ROOT, netdelay
from support.proxies import cli_config

from tightwad.errors import TightwadError
from tightwad.launch import free_port
from tightwad.proxy.detok import Vocabulary
from tightwad.proxy.drafters.base import DrafterError, DraftRequest
from tightwad.proxy.drafters.text import OllamaDrafter, OpenAIDrafter
from tightwad.proxy.upstream import EngineClient, EngineUnavailable

EXAMPLE = ROOT / "examples" / "local.yaml"


def _vocab() -> Vocabulary:
    return Vocabulary([b"Hello", b" world", b""], special={2: b"<|im_end|>"})


async def _tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]  # a "tokenizer" that makes one token per character


def test_openai_drafter_continues_the_text_and_retokenizes() -> None:
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.update(
            json.loads(request.content), path=request.url.path, auth=request.headers.get("authorization")
        )
        return httpx.Response(200, json={"choices": [{"text": "abcdef"}]})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler), headers={"Authorization": "Bearer k"})
    drafter = OpenAIDrafter("http://d/v1", _tokenize, model="tiny", client=client)
    proposal = asyncio.run(drafter.propose(DraftRequest((0, 1, 2), 4, vocabulary=_vocab())))
    assert proposal.tokens == tuple(ord(c) for c in "abcd")  # re-tokenized, cut to k
    assert seen["path"] == "/v1/completions" and seen["prompt"] == "Hello world<|im_end|>"
    assert seen["model"] == "tiny" and seen["temperature"] == 0 and seen["auth"] == "Bearer k"


def test_ollama_drafter_uses_raw_generate_and_fails_clearly() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert request.url.path == "/api/generate" and body["raw"] and body["options"]["num_predict"] == 5
        return httpx.Response(200, json={"response": "xy"})

    drafter = OllamaDrafter(
        "http://o", _tokenize, model="m", client=httpx.AsyncClient(transport=httpx.MockTransport(handler))
    )
    assert asyncio.run(drafter.propose(DraftRequest((0,), 4, vocabulary=_vocab()))).tokens == (
        ord("x"),
        ord("y"),
    )
    broken = OllamaDrafter(
        "http://o",
        _tokenize,
        client=httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(500))),
    )
    with pytest.raises(DrafterError, match="HTTP 500"):
        asyncio.run(broken.propose(DraftRequest((0,), 4, vocabulary=_vocab())))


def test_engine_client_probes_chat_tokens_and_names_an_unreachable_engine() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if "messages" in body:
            return httpx.Response(
                400, json={"error": {"message": "`content` is required", "type": "x", "code": "y"}}
            )
        return httpx.Response(200, json={"tokens": [1]})

    engine = EngineClient(
        "http://e", client=httpx.AsyncClient(base_url="http://e", transport=httpx.MockTransport(handler))
    )
    assert asyncio.run(engine.chat_tokens([{"role": "user", "content": "hi"}])) is None

    def supported(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"tokens": [5, 6]})

    engine = EngineClient(
        "http://e", client=httpx.AsyncClient(base_url="http://e", transport=httpx.MockTransport(supported))
    )
    assert asyncio.run(engine.chat_tokens([{"role": "user", "content": "hi"}])) == [5, 6]
    down = EngineClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(EngineUnavailable, match="unreachable"):
        asyncio.run(down.info())


def test_cli_configuration_from_flags_and_manifest() -> None:
    config = cli_config("--target", "http://e:1", "--draft", "http://d:2")
    assert (
        config.drafters[0].kind == "llama-server" and config.port == 8088 and config.max_draft_tokens is None
    )
    config = cli_config("--target", "http://e", "--draft-kind", "ngram", "--max-draft-tokens", "5")
    assert config.drafters[0].kind == "ngram" and config.max_draft_tokens == 5
    config = cli_config("--manifest", str(EXAMPLE), "--port", "9999", "--no-pipeline")
    assert config.target_url == "http://127.0.0.1:8080" and config.port == 9999 and not config.pipeline
    with pytest.raises(TightwadError, match="--target"):
        cli_config("--draft", "http://d")
    with pytest.raises(TightwadError, match="token"):
        cli_config("--target", "http://e", "--draft", "http://d", "--host", "0.0.0.0")


def test_netdelay_adds_its_latency_each_way() -> None:
    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen()

    def serve() -> None:
        conn, _ = echo.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    listen = free_port()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    target = ("127.0.0.1", echo.getsockname()[1])
    server = asyncio.run_coroutine_threadsafe(netdelay.serve(("127.0.0.1", listen), target, 0.02), loop)
    for _ in range(100):
        try:
            sock = socket.create_connection(("127.0.0.1", listen))
            break
        except OSError:
            time.sleep(0.02)
    with sock:
        times = []
        for i in range(5):
            start = time.perf_counter()
            sock.sendall(b"ping %d" % i)
            assert sock.recv(100) == b"ping %d" % i
            times.append(time.perf_counter() - start)
    time.sleep(0.1)  # the closed connection drains through the proxy

    async def stop() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=5)
    assert server.cancelled()
    loop.call_soon_threadsafe(loop.stop)
    assert 0.038 < sorted(times)[2] < 0.1  # 2 x 20 ms, plus a little
